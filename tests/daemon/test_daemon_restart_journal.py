"""Restart cases of the --state-dir journal that the basic restart tests
(test_daemon_restart.py) leave out: guest memory sent one region at a time
(ADD_MEM_REG, as QEMU does with CONFIGURE_MEM_SLOTS), and a daemon (or
worker) killed at each point where the journal is written: right after an
acknowledged inflate, with the last record torn at any byte, and between
two buffers of one pipelined inflate. Whatever the cut, the restored balloon
is a subset of what the frontend inflated and contains every frame whose
buffer was acknowledged, and no page the frontend wrote outside the balloon
is zeroed."""

from __future__ import annotations

import os
import signal
import time

import pytest

from harness.daemon import DaemonProcess
from protocol.balloon import QueueRole
from tests.daemon.discards import DISCARD_MODES, PAST_DEFERRAL
from tests.daemon.test_daemon_restart import crash_and_restart, dropped_lines, log_size, stateful  # noqa: F401
from tests.frontend import GuestRam, TestFrontend

PAGE = 4096


def reconnect(fe: TestFrontend) -> None:
    """What a reconnecting QEMU does after its backend died: every memory
    region is sent again (the new backend has none of them), the rings
    resume from the used index each one saw."""
    fe.close()  # our GuestRam is shared, so the rings stay as they are
    fe._slots_sent.clear()  # the regions went with the old connection
    for q in fe.queues.values():
        q.base = q.read_used_idx()
    fe.connect()
    fe.start()


def kill(daemon: DaemonProcess) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)


# ------------------------------------------------ memory sent as single regions

def slot_frontend(daemon: DaemonProcess, ram: GuestRam) -> TestFrontend:
    fe = TestFrontend(daemon.sockets["vm0"], ram=ram, mem_slots=True)
    fe.start()
    # the regions really went one by one, the first one [0, 640K) alone
    assert sorted((k[0], k[1]) for k in fe._slots_sent) == [(0, 0xA0000), (0xC0000, ram.size - 0xA0000)]
    return fe


def test_memory_sent_region_by_region_restores_every_frame(stateful):
    ram = GuestRam(96 << 20)
    try:
        fe = slot_frontend(stateful, ram)
        first = fe.first_free_pfn
        held = [*range(first, first + 512), *range(first + 4096, first + 4096 + 300), first + 20000]
        # the frontend's own data outside the balloon: low memory, between and around its runs
        outside = [*range(16, 150), *range(first + 512, first + 600), *range(first + 3900, first + 4096),
                   *range(first + 19990, first + 20000), first + 20001]
        ram.fill(outside, seed=21)
        ram.touch(held)
        fe.inflate(held)
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0)
        assert stateful.api.pfn_set("vm0") == set(held)

        crash_and_restart(stateful)
        ram.touch(held[:10])  # as if discards pending at the crash were lost
        reconnect(fe)
        state = stateful.wait_vm("vm0", lambda s: s["running"] and s["ballooned_bytes"] == len(held) * PAGE)
        assert stateful.api.pfn_set("vm0") == set(held)
        assert state["counters"]["driver_resets"] == 0
        assert state["counters"]["invalid_pfn"] == 0, "restored frames were refused"
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0)
        assert ram.nonzero(held) == [], "restored frames were not discarded again"
        assert ram.damaged(outside, seed=21) == [], "the frontend's data outside the balloon was zeroed"
        # and the balloon works on: a deflate of restored frames is not refused
        fe.deflate(held[:100])
        state = stateful.wait_vm("vm0", lambda s: s["ballooned_bytes"] == (len(held) - 100) * PAGE)
        assert state["counters"]["stray_deflate"] == 0
        fe.close()
    finally:
        ram.close()


def test_memory_sent_region_by_region_guest_rebooted_while_down_keeps_its_pages(stateful):
    ram = GuestRam(96 << 20)
    try:
        fe = slot_frontend(stateful, ram)
        held = list(range(fe.first_free_pfn, fe.first_free_pfn + 512))
        fe.inflate(held)
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0 and s["ballooned_bytes"] == 512 * PAGE)
        kill(stateful)
        fe.close()
        fe._slots_sent.clear()
        fe.reset_driver()  # the guest reboots while the daemon is down
        ram.fill(held, seed=7)  # and the new kernel writes into those frames
        since = log_size(stateful)
        stateful.start()
        fe.connect()
        fe.start()  # the new driver's rings start at 0
        stateful.wait_vm("vm0", lambda s: s["running"])
        time.sleep(PAST_DEFERRAL)  # any discard deferred at the start would be done by now
        assert ram.damaged(held, seed=7) == [], "pages of the rebooted guest were discarded"
        assert stateful.api.pfns("vm0")["count"] == 0
        assert stateful.api.vm("vm0")["counters"]["balloon_freed_bytes"] == 0
        lines = dropped_lines(stateful, since)
        assert len(lines) == 1 and "inflate ring is at 0" in lines[0]["reason"]
        fe.close()
    finally:
        ram.close()


# ------------------------------------------------ kills at the journal's write points
#
# `target` is what dies: "worker" (the VM's worker process, restarted by the
# supervisor), "daemon" (all of it, default isolation: the worker dies with
# it) or "none" (the daemon run with --vm-isolation none: one process).

def gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
        assert time.monotonic() < deadline, f"process {pid} outlived its daemon"
        time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.fixture(params=["worker", "daemon", "none"])
def target(request, tmp_path, discard_mode):
    args = [*DISCARD_MODES[discard_mode], "--state-dir", str(tmp_path / "state")]
    if request.param == "none":
        args += ["--vm-isolation", "none"]
    d = DaemonProcess(tmp_path / "d", vms=("vm0",), extra_args=args)
    d.start()
    d.kind = request.param
    d.state_dir = tmp_path / "state"
    yield d
    d.stop()


def kill_down(d: DaemonProcess) -> int:
    """Kill -9 what `d.kind` says; return once nothing of it runs (and, for a
    worker, before its successor has read the journal only if `d.kind` is not
    "worker"). Returns the killed worker's restart count to wait for."""
    worker = d.api.vm("vm0").get("worker") or {}
    if d.kind == "worker":
        os.kill(worker["pid"], signal.SIGKILL)
        return worker["restarts"] + 1
    kill(d)
    if worker.get("pid"):
        gone(worker["pid"])
    return 0


def bring_up(d: DaemonProcess, restarts: int) -> None:
    if d.kind == "worker":
        d.wait_vm("vm0", lambda s: s["worker"]["state"] == "running" and s["worker"]["restarts"] == restarts,
                  10.0, "vm0's worker restarted")
    else:
        d.start()


# The whole daemon in its default isolation: test_daemon_restart.py.
@pytest.mark.parametrize("target", ["worker", "none"], indirect=True)
def test_kill_right_after_an_acknowledged_inflate_restores_exactly_the_frontends_list(target):
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(target.sockets["vm0"], ram=ram)
        fe.start()
        first = fe.first_free_pfn
        outside = [*range(first + 256, first + 300), *range(first + 5000, first + 5100)]
        ram.fill(outside, seed=31)
        mine: set[int] = set()
        for round_ in range(3):
            batch = [*range(first + round_ * 1024, first + round_ * 1024 + 256), first + 6000 + round_]
            fe.inflate(batch)  # returns once acknowledged; the kill follows at once
            mine |= set(batch)
            since = log_size(target)
            restarts = kill_down(target)
            bring_up(target, restarts)
            reconnect(fe)
            target.wait_vm("vm0", lambda s: s["running"] and s["ballooned_bytes"] == len(mine) * PAGE)
            assert target.api.pfn_set("vm0") == mine
            assert dropped_lines(target, since) == []
        time.sleep(PAST_DEFERRAL)
        assert ram.damaged(outside, seed=31) == [], "a page outside the balloon was zeroed"
        fe.close()
    finally:
        ram.close()
