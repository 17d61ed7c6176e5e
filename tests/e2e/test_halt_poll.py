"""Halt polling under TCG (qemu-patches/0006): a halted vCPU delivers the
balloon's interrupts itself, and an idle guest does not poll.

Why: under TCG there is no irqfd. The daemon's call eventfd wakes QEMU's
main loop, which injects the interrupt and wakes the halted vCPU; the stock
driver waits like that for every buffer, and compaction sends two one-page
buffers per page it moves. With ``-accel tcg,halt-poll-ns=N`` a vCPU whose
last halt took at most N ns polls the call eventfds before it sleeps, for
twice that halt (at most N ns), and runs their handler itself. The harness
starts every TCG guest so (harness.vm.TCG_HALT_POLL_NS), so the whole
real-VM suite runs in this mode; this module checks that the mode is on and
does what it says, from QEMU's own trace of each poll (``halt_poll``: the
window and whether an interrupt was delivered). Its speed is benchmarks/roundtrips.py's to
show, against QEMU's built-in balloon in the same run.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from harness import VhostUserBalloon, Vm
from harness.daemon import DaemonProcess
from harness.qemu import find_qemu
from harness.scenarios import COMPACTION_BALLOON_MIB, compaction_after_idle_inflate
from harness.vm import TCG_HALT_POLL_NS
from tests.e2e.waiting import MIB, wait_for

pytestmark = [pytest.mark.vm]

#: The longest poll: wide enough that a daemon on a loaded CI machine still
#: answers within it now and then (this test is about the mechanism, not
#: its speed).
WINDOW_NS = 2_000_000
#: An idle guest halts until its next timer; after such a halt the vCPU does
#: not poll. A few short halts in a row (an interrupt handled, a timer that
#: was already due) do start a poll each: this many per second at most.
IDLE_POLLS_PER_SECOND = 4
IDLE_SECONDS = 5.0

POLL_LINE = re.compile(r"halt_poll cpu (\d+) window (\d+) ns delivered (\d)")


def polls(trace: Path) -> list[tuple[int, bool]]:
    """(window, delivered) of each poll traced so far."""
    text = trace.read_text(errors="replace") if trace.exists() else ""
    return [(int(m[2]), m[3] == "1") for m in POLL_LINE.finditer(text)]


def test_the_project_qemu_starts_tcg_guests_with_halt_polling(tmp_path):
    qemu = find_qemu(require_vhost_user=True)
    assert qemu.tcg_halt_poll, f"{qemu.binary} does not take -accel tcg,halt-poll-ns (qemu-patches/0006)"
    vm = Vm("6.1", accel="tcg", log_dir=tmp_path / "vm")
    try:
        line = vm.command_line(tmp_path / "initrd")
    finally:
        vm.close()
    assert line[line.index("-accel") + 1] == f"tcg,halt-poll-ns={TCG_HALT_POLL_NS}"


def test_halted_vcpu_delivers_the_daemons_interrupts_and_idle_does_not_poll(make_vm, tmp_path):
    trace = tmp_path / "qemu-trace.log"
    daemon = DaemonProcess(tmp_path / "daemon", vms=("guest",), log_level="info")
    daemon.start()
    try:
        vm = make_vm("6.1", memory_mib=512, load_balloon=True, halt_poll_ns=WINDOW_NS,
                     balloon=VhostUserBalloon(daemon.sockets["guest"]),
                     qemu_args=["-trace", "halt_poll", "-D", str(trace)])
        wait_for("the device to start", lambda: daemon.api.vm("guest")["running"])

        # Idle: the guest has booted and waits for commands.
        time.sleep(1.0)
        before = len(polls(trace))
        time.sleep(IDLE_SECONDS)
        idle = len(polls(trace)) - before
        print(f"idle guest: {idle} polls in {IDLE_SECONDS:.0f} s")
        assert idle <= IDLE_POLLS_PER_SECOND * IDLE_SECONDS, \
            f"{idle} polls in {IDLE_SECONDS:.0f} s of an idle guest: the vCPU polls when nothing comes"

        # Round trips: compaction moves balloon pages, two one-page buffers
        # each, and the stock driver waits for each answer.
        before = len(polls(trace))
        run = compaction_after_idle_inflate(
            vm, lambda n: daemon.api.set_target("guest", n),
            lambda n: daemon.api.vm("guest")["actual_bytes"] == n)
        assert run.migrated > 0, "compaction moved no balloon page: nothing was waited for"
        busy = polls(trace)[before:]
        delivered = sum(1 for _, d in busy if d)
        print(f"compaction: {run.migrated} pages moved, {len(busy)} polls, {delivered} delivered an interrupt")
        assert delivered > 0, \
            f"{len(busy)} polls while {run.migrated} balloon pages moved, none delivered an interrupt"
        assert all(0 < window <= WINDOW_NS for window, _ in busy), "a poll longer than halt-poll-ns"
        assert daemon.api.vm("guest")["ballooned_bytes"] == COMPACTION_BALLOON_MIB * MIB
    finally:
        daemon.stop()
