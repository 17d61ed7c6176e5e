"""--max-guest-ram and the engine's counters, through the real daemon.

The cap is what bounds the daemon's per-VM bookkeeping (bitmaps, mappings)
against a frontend that sends a memory table of terabytes of sparse memfd;
an operator who knows the largest guest lowers it. A frontend over the cap
is closed with one log line naming the cap; one under it is served.

The engine's own refusals (an interrupt not sent because the call eventfd
was full, a config change the backend channel had no room for) are counted
per connection and shown with the device's counters in the API and as
metrics events, so an operator sees a frontend that misbehaves.
"""

from __future__ import annotations

import re
import socket

import pytest

from tests.frontend import DaemonHungUp, Nack, Request, TestFrontend
from tests.daemon.conftest import ENGINES

#: Device behaviour: the same tests on both vhost-user engines.
DAEMON_ENGINES = ENGINES

CAP = 128 << 20


@pytest.fixture(scope="module")
def daemon_options():
    return {"extra_args": ["--max-guest-ram", "128M"]}


def test_a_frontend_over_the_cap_is_closed_with_one_line_naming_it(daemon, connect):
    since = daemon.log_size()
    fe = TestFrontend(daemon.sockets["vm0"], ram_size=256 << 20, connect=False)
    try:
        fe.connect()
        with pytest.raises((DaemonHungUp, Nack, ConnectionError)):
            fe.start()
        assert fe.hung_up(2.0), "the daemon kept a frontend over --max-guest-ram"
    finally:
        fe.close()
    daemon.wait_disconnected("vm0")
    lines = [r for r in daemon.log_records(since)
             if "exceeds the guest RAM cap" in str(r.get("reason", "")) + str(r.get("error", ""))]
    assert len(lines) == 1, lines
    assert f"{CAP:#x}" in str(lines[0].get("reason", "")) + str(lines[0].get("error", ""))
    assert lines[0].get("vm") == "vm0"
    # The VM's socket still serves a guest under the cap.
    small = connect("vm0", ram_size=64 << 20)
    pfn = small.first_free_pfn
    small.ram.touch([pfn])
    small.inflate([pfn])
    assert daemon.api.vm("vm0")["guest_ram_bytes"] == sum(r.size for r in small.ram.regions)
    assert daemon.api.pfn_set("vm0") == {pfn}
    small.deflate([pfn])


def _events(daemon, vm: str) -> dict[str, float]:
    out = {}
    for kind, value in re.findall(rf'balloond_vm_events_total\{{kind="(\w+)",vm="{vm}"\}} (\S+)', daemon.api.metrics()):
        out[kind] = float(value)
    return out


def test_backend_channel_full_is_counted_in_the_api_and_metrics(daemon, connect):
    fe = connect("vm0")
    state = daemon.api.vm("vm0")
    assert state["counters"]["backend_full"] == 0 and state["counters"]["calls_skipped"] == 0
    assert _events(daemon, "vm0")["backend_full"] == 0.0
    ours, shared = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fe.request(Request.SET_BACKEND_REQ_FD, b"", [shared.fileno()])
    shared.setblocking(False)
    try:
        while True:
            shared.send(b"\0" * 4096)
    except BlockingIOError:
        pass
    try:
        daemon.api.set_target("vm0", 16 << 20)
        state = daemon.wait_vm("vm0", lambda s: s["counters"]["backend_full"] >= 1, 3.0, "backend_full counted")
        assert _events(daemon, "vm0")["backend_full"] >= 1.0
        assert "calls_skipped" in _events(daemon, "vm0")
    finally:
        ours.close()
        shared.close()


@pytest.mark.parametrize("value", ["0", "512K", "1P", "lots"])
def test_a_bad_cap_is_one_line_and_exit_2(tmp_path, value):
    import subprocess
    import sys

    from tests.daemon.harness import REPO

    p = subprocess.run([sys.executable, "-m", "balloond", "--vm", f"a={tmp_path / 'a.sock'}", "--max-guest-ram", value],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("balloond: ") and p.stderr.count("\n") == 1, p.stderr
    assert "Traceback" not in p.stderr
