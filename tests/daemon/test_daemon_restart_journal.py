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

import array
import os
import signal
import time

import pytest

from harness.daemon import DaemonProcess
from protocol.balloon import QueueRole
from tests.daemon.discards import DISCARD_MODES, PAST_DEFERRAL
from tests.daemon.harness import crash_and_restart
from tests.daemon.test_daemon_restart import dropped_lines, log_size
from tests.frontend import GuestRam, TestFrontend
from tests.daemon.conftest import ENGINES

#: Device behaviour: the same tests on both vhost-user engines.
DAEMON_ENGINES = ENGINES

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
    """Kill -9 what `d.kind` says. A whole daemon: return once its worker is
    gone too (the state files are then ours to cut). A worker: the supervisor
    restarts it at once; returns the restart count to wait for."""
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


#: One log record of a batch of one inflate buffer of 256 frames:
#: header (kind, length, CRC32) + ring index + 256 frames, 8 bytes each.
BATCH_RECORD = 9 + 8 * 257


@pytest.mark.parametrize("target", ["daemon", "none"], indirect=True)
def test_the_last_record_torn_at_any_byte_drops_the_journal_and_discards_nothing(target):
    """The kill leaves the last batch's record cut short (a header torn, a
    payload torn, only the header left): replay stops before it with the
    batch before it whole, the ring is one batch past the journal's history,
    so the journal is dropped: nothing restored, nothing discarded, the
    frontend's data intact."""
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(target.sockets["vm0"], ram=ram)
        fe.start()
        first = fe.first_free_pfn
        outside = [*range(16, 150), *range(first + 8192, first + 8400)]
        ram.fill(outside, seed=41)
        for i, cut in enumerate([1, 8, BATCH_RECORD - 9, BATCH_RECORD - 1]):
            fe.inflate(range(first + i * 1024 + 512, first + i * 1024 + 768))  # kept whole
            fe.inflate(range(first + i * 1024, first + i * 1024 + 256))  # its record torn
            kill_down(target)
            (log,) = target.state_dir.glob("vm0.log.*")
            data = log.read_bytes()
            tail = data[-BATCH_RECORD:]
            assert tail[0] == ord("I") and int.from_bytes(tail[1:5], "little") == 8 * 257, "not the batch's record"
            log.write_bytes(data[:-cut])
            since = log_size(target)
            target.start()
            reconnect(fe)
            target.wait_vm("vm0", lambda s: s["running"])
            time.sleep(PAST_DEFERRAL)
            state = target.api.vm("vm0")
            assert target.api.pfns("vm0")["count"] == 0, f"cut {cut}: a journal behind the ring was restored"
            assert state["counters"]["balloon_freed_bytes"] == 0, f"cut {cut}: something was discarded"
            assert ram.damaged(outside, seed=41) == [], f"cut {cut}: a page outside the balloon was zeroed"
            records = target.log_records(since)
            assert [r for r in records if "bad record" in r.get("event", "")], f"cut {cut}: the torn record went unseen"
            lines = dropped_lines(target, since)
            assert len(lines) == 1 and "inflate ring is at" in lines[0]["reason"]
        fe.close()
    finally:
        ram.close()


def submit(fe: TestFrontend, buffers: list[list[int]]) -> None:
    """Put inflate buffers on the ring, one kick each, without waiting."""
    q = fe.queue(QueueRole.INFLATE)
    for slot, chunk in zip(fe._pfn_slot_gpas(QueueRole.INFLATE), buffers):
        fe.ram.write(slot, array.array("I", chunk).tobytes())
        q.put_avail(q.add([(slot, len(chunk) * 4, False)], slot))
        q.kick()


@pytest.mark.parametrize("pause", [0.0, 0.002])
def test_kill_between_two_buffers_of_a_pipelined_inflate(target, pause):
    """Buffers several at a time: the kill lands after some were acknowledged,
    with others still on the ring (processed or not, maybe recorded but not
    returned). The restored set holds every acknowledged frame and nothing
    the frontend did not submit; the buffers left on the ring are done after
    the reconnect, and then the balloon is exactly what was submitted."""
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(target.sockets["vm0"], ram=ram)
        fe.start()
        first = fe.first_free_pfn
        per = 64
        done = list(range(first, first + 8 * per))
        tail = [list(range(first + 4096 + k * per, first + 4096 + (k + 1) * per)) for k in range(4)]
        outside = [*range(16, 150), *range(first + 8 * per, first + 4096), *range(first + 4096 + 4 * per, first + 5000)]
        ram.fill(outside, seed=51)
        fe.inflate(done, per_buffer=per, inflight=4)
        q = fe.queue(QueueRole.INFLATE)
        base = q.read_used_idx()
        submit(fe, tail[:2])
        time.sleep(pause)
        restarts = kill_down(target)
        acked = q.read_used_idx() - base  # of the tail's buffers
        since = log_size(target)
        bring_up(target, restarts)
        reconnect(fe)
        expect = set(done) | set(tail[0]) | set(tail[1])
        target.wait_vm("vm0", lambda s: s["running"] and s["ballooned_bytes"] == len(expect) * PAGE)
        assert target.api.pfn_set("vm0") == expect
        assert dropped_lines(target, since) == []
        (restored,) = [r for r in target.log_records(since) if r.get("event") == "balloon restored from the state directory"]
        assert len(done) + acked * per <= restored["frames"] <= len(expect)
        deadline = time.monotonic() + 5
        while q.read_used_idx() != base + 2:  # the buffers left on the ring came back
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # ... the very buffers submitted by hand, each once
        tail_slots = fe._pfn_slot_gpas(QueueRole.INFLATE)[:2]
        assert sorted(u.token for u in q.get_used()) == sorted(tail_slots)
        # and the ring goes on: the rest of the pipelined inflate
        fe.inflate([p for chunk in tail[2:] for p in chunk], per_buffer=per, inflight=4)
        expect |= set(tail[2]) | set(tail[3])
        target.wait_vm("vm0", lambda s: s["ballooned_bytes"] == len(expect) * PAGE)
        time.sleep(PAST_DEFERRAL)
        assert ram.damaged(outside, seed=51) == [], "a page outside the balloon was zeroed"
        fe.close()
    finally:
        ram.close()
