"""Operator surfaces of the real daemon, each checked by its effect.

* PUT /v1/policy and balloonctl policy on/off: a policy that is on sets the
  VM's target; off, it stops (no more decisions, a target set by hand stays).
* PUT /v1/vms/{name}/policy and balloonctl policy vm: the VM's settings are
  the inputs of the next decision (GET /v1/policy) and move its target.
* --stats-interval 0: the device never asks the guest for statistics.
* --poll-us and --discard-delay-ms: the ends of their ranges are served,
  values past them are refused with one line and exit code 2.
* systemd's watchdog: WATCHDOG=1 on $NOTIFY_SOCKET at half $WATCHDOG_USEC,
  from the event loop, so a loop that hangs stops pinging.

The policy daemon has one VM whose "guest" (a TestFrontend) has its 256 MiB
resident and reports 64 MiB used, on a pretend host of 288 MiB
(--policy-simulate-host): 32 MiB available, below the 64 MiB reserve, so an
enabled policy always wants to inflate. The frontend never follows the
target, so each inflate is one 16 MiB step and then the policy waits for it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from balloond.services import config as daemon_config
from balloond.services.daemon import Daemon
from harness.loop_thread import LoopThread
from protocol.balloon import StatTag
from tests.daemon.conftest import bug_records
from tests.daemon.harness import REPO, ApiError, DaemonProcess
from tests.daemon.test_daemon_cli import balloonctl, ok_json, one_line_error
from tests.frontend import PAGE_SIZE, TestFrontend

MIB = 1 << 20
RAM = 256 * MIB
USED = 64 * MIB
STEP = 16 * MIB
INTERVAL = 0.25

POLICY_TOML = f"""
[policy]
interval = {INTERVAL}
host_reserve = "64M"
hysteresis = "32M"
step = "16M"
idle_step = "8M"
dead_band = "2M"
headroom = "16M"
headroom_percent = 0
stats_max_age = 3600
"""


@dataclass
class PolicyRig:
    daemon: DaemonProcess
    fe: TestFrontend

    def policy(self) -> dict[str, Any]:
        return self.daemon.api.get("/v1/policy")

    def target(self) -> int:
        return self.daemon.api.vm("vm0")["target_bytes"]

    def policy_targets(self, since: int) -> list[dict[str, Any]]:
        return [r for r in self.daemon.log_records(since) if r.get("event") == "policy target"]

    def decision(self, after_tick: int) -> dict[str, Any]:
        """vm0's part of the first decision made after tick `after_tick`."""
        snap = self.daemon.wait_for(lambda: (s := self.policy())["ticks"] > after_tick and s,
                                    5, f"a policy decision after tick {after_tick}")
        return next(v for v in snap["last"]["vms"] if v["name"] == "vm0")

    def set_enabled(self, enabled: bool) -> dict[str, Any]:
        return self.daemon.api.put("/v1/policy", {"enabled": enabled})


@pytest.fixture(scope="module")
def rig() -> Iterator[PolicyRig]:
    workdir = tempfile.mkdtemp(prefix="balloond-surfaces-")
    toml = os.path.join(workdir, "policy.toml")
    with open(toml, "w") as f:
        f.write(POLICY_TOML)
    # --stats-interval 0: the stats primed at start are the only ones, and
    # stats_max_age keeps them fresh for the policy
    daemon = DaemonProcess(workdir, vms=("vm0",), stats_interval=0,
                           extra_args=["--config", toml, "--policy-simulate-host", f"{(RAM + 32 * MIB) >> 20}M",
                                       "--discard-delay-ms", "0"])
    daemon.start()
    fe = TestFrontend(daemon.sockets["vm0"], ram_size=RAM, connect=False)
    try:
        fe.connect()
        fe.probe()
        fe.ram.populate(fe.first_free_pfn, RAM // PAGE_SIZE - fe.first_free_pfn)
        fe.prime_stats({StatTag.TOTAL_MEMORY: RAM, StatTag.AVAILABLE_MEMORY: RAM - USED,
                        StatTag.FREE_MEMORY: RAM - USED, StatTag.MAJOR_FAULTS: 0})
        fe.start()
        daemon.wait_vm("vm0", lambda s: s["connected"] and s["stats_updated_at"] and s["resident_bytes"] > RAM - 8 * MIB,
                       what="the guest connected, with stats and its RAM resident")
        yield PolicyRig(daemon, fe)
    finally:
        fe.close()
        alive = daemon.alive
        bugs = bug_records(daemon.log_records())
        code = daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert alive and code == 0, f"balloond died or exited with {code}:\n{daemon.log_tail()}"
    assert not bugs, f"balloond logged internal errors: {bugs[:3]}"


def test_put_policy_turns_the_policy_on_and_off(rig):
    d = rig.daemon
    assert rig.set_enabled(False)["enabled"] is False
    d.api.set_target("vm0", 0)
    ticks = rig.policy()["ticks"]
    time.sleep(4 * INTERVAL)
    assert rig.policy()["ticks"] == ticks and rig.target() == 0, "a disabled policy still decided"

    since = d.log_size()
    reply = rig.set_enabled(True)
    assert reply["enabled"] is True and rig.policy()["enabled"] is True
    d.wait_for(lambda: rig.target() == STEP, 5, "the policy to inflate vm0 by one step")
    [line] = rig.policy_targets(since)
    assert (line["vm"], line["action"], line["target_bytes"]) == ("vm0", "inflate", STEP)

    reply = rig.set_enabled(False)
    assert reply["enabled"] is False and rig.policy()["enabled"] is False
    d.api.set_target("vm0", 0)  # the policy, were it on, would set STEP again within one interval
    since, ticks = d.log_size(), rig.policy()["ticks"]
    time.sleep(6 * INTERVAL)
    assert rig.target() == 0 and rig.policy()["ticks"] == ticks and rig.policy_targets(since) == []

    rig.set_enabled(True)
    d.wait_for(lambda: rig.target() == STEP, 5, "the policy, on again, to inflate vm0")
    rig.set_enabled(False)


def test_put_policy_refuses_what_is_not_a_boolean(rig):
    rig.set_enabled(False)
    for body in ({"enabled": "yes"}, {"enabled": 1}, {}, ["enabled"]):
        status, reply = rig.daemon.api.call("PUT", "/v1/policy", body)
        assert status == 400 and set(reply) == {"error"}, (body, status, reply)
    assert rig.policy()["enabled"] is False


def test_put_vm_policy_changes_the_next_decision(rig):
    d = rig.daemon
    rig.set_enabled(False)
    d.api.set_target("vm0", STEP)
    reply = d.api.put("/v1/vms/vm0/policy", {"max_bytes": 8 * MIB, "shares": 2})
    assert reply["max_bytes"] == 8 * MIB and reply["shares"] == 2.0 and reply["enabled"] is True
    assert rig.policy()["vm_settings"]["vm0"] == reply
    try:
        ticks = rig.policy()["ticks"]
        rig.set_enabled(True)
        v = rig.decision(ticks)
        assert (v["inputs"]["max_bytes"], v["inputs"]["hard_max_balloon_bytes"], v["inputs"]["shares"]) == \
            (8 * MIB, 8 * MIB, 2.0)
        assert (v["action"], v["old_target_bytes"], v["new_target_bytes"]) == ("deflate", STEP, 8 * MIB), v
        assert rig.target() == 8 * MIB

        # policy off for this VM: it is skipped and a target set by hand stays
        rig.set_enabled(False)
        assert d.api.put("/v1/vms/vm0/policy", {"enabled": False, "max_bytes": None})["enabled"] is False
        d.api.set_target("vm0", 0)
        ticks = rig.policy()["ticks"]
        rig.set_enabled(True)
        v = rig.decision(ticks)
        assert v["action"] == "skip" and v["new_target_bytes"] == 0, v
        time.sleep(3 * INTERVAL)
        assert rig.target() == 0
    finally:
        rig.set_enabled(False)
        d.api.put("/v1/vms/vm0/policy", {"enabled": True, "max_bytes": None, "shares": 1})


def test_put_vm_policy_refuses_bad_settings_and_unknown_vms(rig):
    d = rig.daemon
    before = rig.policy()["vm_settings"]["vm0"]
    for body in ({"shares": 0}, {"min_bytes": -1}, {"min_bytes": "1G"}, {"enabled": "no"}, {"colour": "red"}, [1]):
        status, reply = d.api.call("PUT", "/v1/vms/vm0/policy", body)
        assert status == 400 and set(reply) == {"error"}, (body, status, reply)
    with pytest.raises(ApiError) as err:
        d.api.put("/v1/vms/nosuch/policy", {"shares": 2})
    assert err.value.status == 404
    assert rig.policy()["vm_settings"]["vm0"] == before


def test_balloonctl_policy_commands(rig):
    d, api = rig.daemon, rig.daemon.api_path
    rig.set_enabled(False)
    shown = ok_json(balloonctl("policy", "--json", "--api", api))
    assert shown["enabled"] is False and shown.keys() == rig.policy().keys()
    p = balloonctl("--api", api, "policy", "on")
    assert p.returncode == 0 and p.stdout.startswith("policy: on"), (p.stdout, p.stderr)
    assert rig.policy()["enabled"] is True
    assert ok_json(balloonctl("--json", "--api", api, "policy", "off"))["enabled"] is False
    assert rig.policy()["enabled"] is False
    p = balloonctl("--api", api, "policy", "show")
    assert p.returncode == 0 and p.stdout.startswith("policy: off"), p.stdout

    try:
        reply = ok_json(balloonctl("policy", "vm", "vm0", "--min-memory", "200M", "--max-balloon", "none",
                                   "--shares", "3", "--json", "--api", api))
        want = {"enabled": True, "min_bytes": 200 * MIB, "max_bytes": None, "shares": 3.0, "headroom_bytes": None}
        assert reply == want and rig.policy()["vm_settings"]["vm0"] == want
        # the guest keeps 200 MiB: the most the policy may take is its RAM - 200 MiB
        ticks = rig.policy()["ticks"]
        rig.set_enabled(True)
        i = rig.decision(ticks)["inputs"]
        assert RAM - MIB <= i["guest_ram_bytes"] <= RAM, i
        assert (i["min_bytes"], i["hard_max_balloon_bytes"], i["shares"]) == \
            (200 * MIB, i["guest_ram_bytes"] - 200 * MIB, 3.0), i
        rig.set_enabled(False)
        p = balloonctl("--api", api, "policy", "vm", "vm0", "--disable")
        assert p.returncode == 0 and p.stdout.startswith("vm0: enabled=False"), (p.stdout, p.stderr)
        assert rig.policy()["vm_settings"]["vm0"]["enabled"] is False
    finally:
        rig.set_enabled(False)
        d.api.put("/v1/vms/vm0/policy", {"enabled": True, "min_bytes": 0, "shares": 1})
    assert "policy vm NAME" in one_line_error(balloonctl("--api", api, "policy", "vm"))
    assert "lots" in one_line_error(balloonctl("--api", api, "policy", "vm", "vm0", "--min-memory", "lots"))
    assert "shares" in one_line_error(balloonctl("--api", api, "policy", "vm", "vm0", "--shares", "-1"))
    assert rig.policy()["vm_settings"]["vm0"]["shares"] == 1.0


# ------------------------------------------------------------ stats interval 0


def test_stats_interval_zero_never_asks_for_stats(tmp_path):
    daemon = DaemonProcess(tmp_path, vms=("vm0",), stats_interval=0)
    daemon.start()
    fe = TestFrontend(daemon.sockets["vm0"], connect=False)
    try:
        fe.connect()
        fe.probe()
        fe.prime_stats({StatTag.FREE_MEMORY: 7 * MIB})
        fe.start()
        # the buffer Linux primes at probe is read, and then kept: no request
        state = daemon.wait_vm("vm0", lambda s: s["stats"].get("free_memory") == 7 * MIB, what="the primed stats")
        assert state["stats_interval"] == 0
        # longer than the default interval (5 s): 0 is "never", not "the default"
        assert not fe.stats_requested(timeout=5.5), "the device asked for stats with --stats-interval 0"
        assert daemon.api.vm("vm0")["counters"]["stats_buffers"] == 1
        # the same device asks once an interval is set at run time
        daemon.api.put("/v1/vms/vm0/stats-interval", {"seconds": 0.2})
        assert fe.serve_stats({StatTag.FREE_MEMORY: 8 * MIB}, timeout=3), "no request at a 0.2 s interval"
        daemon.wait_vm("vm0", lambda s: s["stats"].get("free_memory") == 8 * MIB, what="the new stats")
        # and stops again at 0 (the buffer it holds now stays with it)
        daemon.api.put("/v1/vms/vm0/stats-interval", {"seconds": 0})
        fe.stats_requested(timeout=0.5)  # one request may have been on its way
        if fe._stats_head is None:  # it was: hand the buffer back, as Linux would
            fe.answer_stats({StatTag.FREE_MEMORY: 9 * MIB})
        assert not fe.stats_requested(timeout=1.5), "the device kept asking after the interval went back to 0"
    finally:
        fe.close()
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    assert not bug_records(daemon.log_records())


# ------------------------------------------------------------ --poll-us, --discard-delay-ms


def balloond(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "balloond", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("flag, value", [
    ("--poll-us", "-1"), ("--poll-us", "100001"), ("--poll-us", "nan"), ("--poll-us", "fast"),
    ("--discard-delay-ms", "-0.5"), ("--discard-delay-ms", "10001"), ("--discard-delay-ms", "nan"),
    ("--discard-delay-ms", "inf"), ("--stats-interval", "nan"), ("--stats-interval", "-1"),
])
def test_out_of_range_values_are_refused_in_one_line(tmp_path, flag, value):
    p = balloond("--vm", f"a={tmp_path / 'a.sock'}", f"{flag}={value}")
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("balloond: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert flag in p.stderr, p.stderr
    assert not (tmp_path / "a.sock").exists()


@pytest.mark.parametrize("key, value", [("poll_us", "100001"), ("discard_delay_ms", "-1"), ("poll_us", "nan")])
def test_out_of_range_values_in_the_config_file_are_refused(tmp_path, key, value):
    (tmp_path / "b.toml").write_text(f"{key} = {value}\n")
    p = balloond("--vm", f"a={tmp_path / 'a.sock'}", "--config", str(tmp_path / "b.toml"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert key.replace("_", "-") in p.stderr


def test_the_ends_of_the_ranges_are_served(tmp_path):
    """--poll-us 100000 and --discard-delay-ms 10000 are allowed, and a
    frontend is served with them (a deflate is not held by the delay)."""
    daemon = DaemonProcess(tmp_path, vms=("vm0",), extra_args=["--poll-us", "100000", "--discard-delay-ms", "10000"])
    daemon.start()
    try:
        with TestFrontend(daemon.sockets["vm0"]) as fe:
            fe.start()
            first = fe.first_free_pfn
            fe.ram.touch(range(first, first + 64))
            fe.inflate(range(first, first + 64))
            daemon.wait_vm("vm0", lambda s: s["ballooned_bytes"] == 64 * PAGE_SIZE, what="64 frames ballooned")
            fe.deflate(range(first, first + 64))
            daemon.wait_vm("vm0", lambda s: s["ballooned_bytes"] == 0, what="the deflate")
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log_tail()
    assert not bug_records(daemon.log_records())


# ------------------------------------------------------------ systemd watchdog


class NotifiedDaemon(DaemonProcess):
    """The daemon started with systemd's notify variables (the harness drops
    NOTIFY_SOCKET from the environment it passes on, so `env` sets them)."""

    def __init__(self, workdir: str, notify_env: dict[str, str]) -> None:
        super().__init__(workdir, vms=("vm0",))
        self.notify_env = notify_env

    @property
    def argv(self) -> list[str]:
        return ["env", *(f"{k}={v}" for k, v in self.notify_env.items()), *super().argv]


class NotifySocket:
    """What systemd listens on: a datagram socket; records (time, message)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[tuple[float, str]] = []

    def collect(self, seconds: float) -> list[tuple[float, str]]:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            self.messages.append((time.monotonic(), data.decode()))
        return self.messages

    def pings(self) -> list[float]:
        return [t for t, m in self.messages if "WATCHDOG=1" in m.splitlines()]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="bd-notify-")  # short: sun_path holds 108 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_watchdog_pings_at_half_the_interval_until_stopped(notify_dir):
    notify = NotifySocket(notify_dir)
    daemon = NotifiedDaemon(notify_dir, {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "300000"})
    try:
        daemon.start()
        notify.collect(2.5)
        assert notify.messages[0][1].startswith("READY=1"), notify.messages[:3]
        pings = notify.pings()
        assert 10 <= len(pings) <= 20, f"{len(pings)} pings in 2.5 s at a 0.15 s period"
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert 0.12 <= statistics.median(gaps) <= 0.2 and max(gaps) < 0.3, gaps
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(10) == 0
        notify.collect(0.3)
        assert any(m == "STOPPING=1" for _, m in notify.messages), notify.messages[-3:]
        stopped_at = next(t for t, m in notify.messages if m == "STOPPING=1")
        assert not [t for t in notify.pings() if t > stopped_at + 0.05], "pings after STOPPING=1"
    finally:
        daemon.stop()
        notify.close()


@pytest.mark.parametrize("env", [
    {"WATCHDOG_USEC": "300000", "WATCHDOG_PID": "1"},  # meant for another process
    {},  # no watchdog configured
    {"WATCHDOG_USEC": "soon"},  # nonsense: ignored, and the daemon runs
])
def test_no_pings_unless_the_watchdog_is_ours(notify_dir, env):
    notify = NotifySocket(notify_dir)
    daemon = NotifiedDaemon(notify_dir, {"NOTIFY_SOCKET": notify.path, **env})
    try:
        daemon.start()
        notify.collect(1.0)
        assert notify.messages and notify.messages[0][1].startswith("READY=1"), notify.messages
        assert notify.pings() == []
        assert daemon.alive
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
        notify.close()
    if env.get("WATCHDOG_USEC") == "soon":
        assert any(r.get("event", "").startswith("WATCHDOG_USEC is not") for r in daemon.log_records())


def test_a_hung_event_loop_stops_the_pings(notify_dir, monkeypatch):
    """The pings come from the event loop: blocking it for a second leaves a
    gap of a second, which is what lets systemd see a hung daemon."""
    notify = NotifySocket(notify_dir)
    monkeypatch.setenv("NOTIFY_SOCKET", notify.path)
    settings, _ = daemon_config.load(["--vm", f"a={notify_dir}/a.sock"])
    loop = LoopThread("watchdog")
    task = None
    try:
        async def start() -> Any:
            import asyncio
            return asyncio.ensure_future(Daemon(settings)._watchdog(0.1))

        task = loop.call(start())
        notify.collect(0.6)
        loop.loop.call_soon_threadsafe(time.sleep, 1.0)  # the loop hangs for a second
        notify.collect(1.6)
        gaps = [b - a for a, b in zip(notify.pings(), notify.pings()[1:])]
        assert len(gaps) >= 8, gaps
        long = [g for g in gaps if g > 0.3]
        assert len(long) == 1 and 0.9 <= long[0] <= 1.3, gaps
        assert statistics.median(gaps) < 0.2
    finally:
        if task is not None:
            loop.loop.call_soon_threadsafe(task.cancel)
        loop.close()
        notify.close()
