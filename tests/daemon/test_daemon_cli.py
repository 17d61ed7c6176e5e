"""balloonctl as operators run it: the installed command in a subprocess,
against the real daemon (the module's `daemon`: vm0 and vm1).

Each test checks what the command did or printed against the daemon's API:
--json before and after the command, $BALLOOND_API, set, pfns, and watch
redrawing until its count or until Ctrl-C. The policy commands are tested in
test_daemon_surfaces.py, on a daemon whose policy has a pretend host.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

BALLOONCTL = Path(sys.executable).with_name("balloonctl")
MIB = 1 << 20


def balloonctl(*args: str, api: str | None = None, env: dict[str, str] | None = None,
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the installed balloonctl; `api` is put in $BALLOOND_API (None: unset)."""
    assert BALLOONCTL.exists(), f"balloonctl is not installed next to {sys.executable}"
    full = {k: v for k, v in os.environ.items() if k != "BALLOOND_API"}
    if api is not None:
        full["BALLOOND_API"] = api
    full.update(env or {})
    return subprocess.run([str(BALLOONCTL), *args], env=full, capture_output=True, text=True, timeout=timeout)


def ok_json(p: subprocess.CompletedProcess[str]) -> Any:
    assert p.returncode == 0, f"rc {p.returncode}: {p.stderr}"
    assert p.stderr == "", p.stderr
    return json.loads(p.stdout)


def one_line_error(p: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert p.returncode == code, f"rc {p.returncode}: {p.stdout} {p.stderr}"
    assert p.stdout == "" and p.stderr.startswith("balloonctl: ") and p.stderr.count("\n") == 1, p.stderr
    assert "Traceback" not in p.stderr
    return p.stderr


@pytest.fixture
def target_reset(daemon):
    yield
    for name in ("vm0", "vm1"):
        daemon.api.set_target(name, 0)


def test_json_is_accepted_before_and_after_the_command(daemon, target_reset):
    daemon.api.set_target("vm1", 3 * MIB)
    before = ok_json(balloonctl("--api", daemon.api_path, "--json", "status"))
    after = ok_json(balloonctl("status", "--json", "--api", daemon.api_path))
    assert [vm["name"] for vm in before] == [vm["name"] for vm in after] == ["vm0", "vm1"]
    assert [vm["target_bytes"] for vm in after] == [0, 3 * MIB]
    detail = ok_json(balloonctl("status", "vm1", "--json", "--api", daemon.api_path))
    assert detail["name"] == "vm1" and detail["target_bytes"] == 3 * MIB
    assert detail.keys() >= {"connected", "actual_bytes", "ballooned_bytes", "stats", "counters"}


def test_status_without_json_is_a_table(daemon, target_reset):
    daemon.api.set_target("vm0", 2 * MIB)
    p = balloonctl("--api", daemon.api_path, "status")
    assert p.returncode == 0, p.stderr
    header, *rows = p.stdout.splitlines()
    assert header.split()[:3] == ["VM", "KIND", "CONN"]
    assert [row.split()[0] for row in rows] == ["vm0", "vm1"]
    assert "2.0 MiB" in rows[0] and "2.0 MiB" not in rows[1]
    with pytest.raises(json.JSONDecodeError):
        json.loads(p.stdout)


def test_balloond_api_sets_the_default_socket(daemon, tmp_path):
    vms = ok_json(balloonctl("status", "--json", api=daemon.api_path))
    assert [vm["name"] for vm in vms] == ["vm0", "vm1"]
    # the variable is what balloonctl used: a wrong one is named in the error
    missing = str(tmp_path / "elsewhere.sock")
    assert missing in one_line_error(balloonctl("status", api=missing))
    # and --api, before or after the command, wins over it
    for args in (["--api", daemon.api_path, "status", "--json"], ["status", "--json", "--api", daemon.api_path]):
        assert [vm["name"] for vm in ok_json(balloonctl(*args, api=missing))] == ["vm0", "vm1"]
    # an empty variable is no socket path: the packaged default applies
    assert "/run/balloond/api.sock" in one_line_error(balloonctl("status", env={"BALLOOND_API": ""}))


def test_set_and_pfns(daemon, connect):
    fe = connect()
    api = daemon.api_path
    reply = ok_json(balloonctl("set", "vm0", "1M", "--json", "--api", api))
    assert reply["name"] == "vm0" and reply["target_bytes"] == MIB
    assert daemon.api.vm("vm0")["target_bytes"] == MIB
    assert fe.num_pages() == 256
    p = balloonctl("--api", api, "set", "vm0", "512K")
    assert p.returncode == 0 and p.stdout == "vm0: balloon target set to 512.0 KiB\n", (p.stdout, p.stderr)
    assert daemon.api.vm("vm0")["target_bytes"] == 512 << 10

    first = fe.first_free_pfn
    fe.ram.touch(range(first, first + 128))
    fe.inflate(range(first, first + 128))
    daemon.wait_vm("vm0", lambda s: s["ballooned_bytes"] == 128 * 4096, what="128 frames ballooned")
    listed = ok_json(balloonctl("pfns", "vm0", "--json", "--api", api))
    assert listed == daemon.api.pfns("vm0") == {"count": 128, "ranges": [[first, 128]]}
    p = balloonctl("--api", api, "pfns", "vm0")
    assert p.returncode == 0
    assert p.stdout.splitlines() == ["128 pages ballooned in 1 ranges",
                                     f"  {first:#x}-{first + 127:#x}  (128 pages)"]


def test_bad_input_is_one_line(daemon):
    api = daemon.api_path
    assert "lots" in one_line_error(balloonctl("set", "vm0", "lots", "--api", api))
    assert "nosuch" in one_line_error(balloonctl("status", "nosuch", "--api", api))
    assert "nosuch" in one_line_error(balloonctl("set", "nosuch", "1M", "--api", api))
    assert daemon.api.vm("vm0")["target_bytes"] == 0
    # usage errors are argparse's: exit 2, nothing run
    for args in (["watch", "vm0", "--interval", "0"], ["watch", "vm0", "--count", "-1"], ["status", "--jsn"]):
        p = balloonctl(*args, "--api", api)
        assert p.returncode == 2 and "Traceback" not in p.stderr and p.stdout == "", (args, p.stderr)
        assert p.stderr.splitlines()[-1].startswith("balloonctl"), p.stderr


def test_watch_prints_count_refreshes_and_exits(daemon, target_reset):
    daemon.api.set_target("vm0", 4 * MIB)
    t0 = time.monotonic()
    p = balloonctl("watch", "vm0", "--count", "3", "--interval", "0.3", "--json", "--api", daemon.api_path)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert [(v["name"], v["target_bytes"]) for v in lines] == [("vm0", 4 * MIB)] * 3
    assert elapsed >= 2 * 0.3, f"3 refreshes 0.3 s apart took {elapsed:.2f}s"
    p = balloonctl("--api", daemon.api_path, "watch", "vm0", "--count", "2", "--interval", "0.1")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "\x1b[" not in p.stdout, "no screen clearing when the output is not a terminal"
    assert len(lines) == 6 and lines[0] == lines[3] and lines[0].split()[0] == "VM", lines
    assert lines[1].split()[0] == "vm0" and lines[2] == lines[5]
    assert lines[2].startswith("[") and lines[2].endswith("] 0 B of 4.0 MiB"), lines[2]


def test_watch_follows_changes_until_ctrl_c(daemon, target_reset):
    proc = subprocess.Popen([str(BALLOONCTL), "watch", "vm0", "--json", "--interval", "0.1", "--api", daemon.api_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["name"] == "vm0" and first["target_bytes"] == 0
        daemon.api.set_target("vm0", 6 * MIB)
        deadline = time.monotonic() + 10
        while json.loads(proc.stdout.readline())["target_bytes"] != 6 * MIB:
            assert time.monotonic() < deadline, "watch never showed the new target"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert all(json.loads(line)["name"] == "vm0" for line in out.splitlines())
