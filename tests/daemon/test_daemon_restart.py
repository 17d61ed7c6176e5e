"""A daemon killed with SIGKILL and started again finds each VM's balloon in
--state-dir and carries on with the same QEMU (here: the test frontend,
reconnecting as QEMU's fixed vhost-user-base does: the same guest RAM and
rings, each ring resuming from the used index it saw)."""

from __future__ import annotations

import signal

import pytest

from harness.daemon import DaemonProcess
from tests.daemon.discards import DISCARD_MODES
from tests.frontend import GuestRam, TestFrontend

PAGE = 4096


@pytest.fixture
def stateful(tmp_path, discard_mode):
    args = [*DISCARD_MODES[discard_mode], "--state-dir", str(tmp_path / "state")]
    d = DaemonProcess(tmp_path / "d", vms=("vm0",), extra_args=args)
    d.start()
    yield d
    d.stop()


def crash_and_restart(daemon: DaemonProcess) -> None:
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    daemon.start()


def reconnect(fe: TestFrontend) -> None:
    """What a reconnecting QEMU does after its backend died."""
    fe.close()  # our GuestRam is shared, so the rings stay as they are
    for q in fe.queues.values():
        q.base = q.read_used_idx()
    fe.connect()
    fe.start()


def test_balloon_and_target_survive_sigkill(stateful, tmp_path):
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(stateful.sockets["vm0"], ram=ram)
        fe.start()
        first = fe.first_free_pfn
        held = list(range(first, first + 512)) + list(range(first + 4096, first + 4096 + 300))
        ram.touch(held)
        fe.inflate(held)
        stateful.api.set_target("vm0", 8 << 20)
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0)
        assert stateful.api.pfn_set("vm0") == set(held)

        crash_and_restart(stateful)
        assert stateful.api.vm("vm0")["target_bytes"] == 8 << 20  # known before QEMU is back
        ram.touch(held[:10])  # as if discards pending at the crash were lost
        reconnect(fe)
        state = stateful.wait_vm("vm0", lambda s: s["ballooned_bytes"] == len(held) * PAGE)
        assert stateful.api.pfn_set("vm0") == set(held)
        assert state["counters"]["driver_resets"] == 0
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0)
        assert ram.nonzero(held) == [], "restored frames were not discarded again"

        # and it keeps working: deflate some, inflate others, crash again
        fe.deflate(held[:100])
        more = list(range(first + 8192, first + 8192 + 256))
        fe.inflate(more)
        crash_and_restart(stateful)
        reconnect(fe)
        expect = set(held[100:]) | set(more)
        stateful.wait_vm("vm0", lambda s: s["ballooned_bytes"] == len(expect) * PAGE)
        assert stateful.api.pfn_set("vm0") == expect
        fe.close()
    finally:
        ram.close()


def test_a_new_guest_after_a_restart_starts_with_an_empty_balloon(stateful):
    fe = TestFrontend(stateful.sockets["vm0"])
    fe.start()
    fe.inflate(range(fe.first_free_pfn, fe.first_free_pfn + 256))
    fe.close()
    crash_and_restart(stateful)
    fe2 = TestFrontend(stateful.sockets["vm0"])  # another QEMU: another memfd
    fe2.start()
    state = stateful.api.vm("vm0")
    assert state["ballooned_bytes"] == 0 and stateful.api.pfns("vm0")["count"] == 0
    fe2.close()
