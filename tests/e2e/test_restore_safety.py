"""A journalled balloon must never be restored onto a guest that may be using
its frames: real 6.12 guests whose balloon driver is a new instance (a guest
rebooted while the daemon was down; a new QEMU on the same RAM file) fill
their memory with checksummed pages *before* the driver loads, then load it.
The daemon must drop the journal (one warning line), keep its balloon empty,
discard nothing, and every page must read back as written.

page_poison=1: the guests poison free pages, so free page reporting never
discards anything and the host's RAM allocation is stable to measure.
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest

from harness import GuestError, VhostUserBalloon
from harness.daemon import DaemonProcess
from tests.e2e.conftest import assert_served_by
from tests.e2e.waiting import MIB, wait_for

pytestmark = [pytest.mark.vm, pytest.mark.slow]

KERNEL = "6.12"
RAM_MIB = 512
BALLOON = 128 * MIB
#: Guest memory left free by the pattern (the kernel and the agent need some).
SPARE_MIB = 64
#: How much the host's RAM allocation may move without a discard (page
#: tables, the driver's own allocations, rounding).
SLACK = 16 * MIB

DROPPED = "state journal dropped: its frames are not restored, nothing discarded"
RESTORED = "balloon restored from the state directory"


#: (isolation, engine): the device (and its journal) runs in a worker
#: process per VM, or in the daemon itself; all must refuse a new driver
#: instance. libvhost-user only with workers (the daemon refuses it with
#: --vm-isolation none).
SETUPS = [("process", "pure"), ("none", "pure"), ("process", "libvhost-user")]
setups = pytest.mark.parametrize(("isolation", "engine"), SETUPS,
                                 ids=[f"isolation-{i}-engine-{e}" for i, e in SETUPS])


def start_daemon(tmp_path: Path, isolation: str, engine: str) -> DaemonProcess:
    daemon = DaemonProcess(tmp_path / "daemon", vms=("guest",), log_level="info",
                           extra_args=["--state-dir", str(tmp_path / "state"), "--vm-isolation", isolation,
                                       "--engine", engine])
    daemon.start()
    return daemon


def inflate_to(daemon: DaemonProcess, target: int, timeout: float = 120) -> None:
    daemon.api.set_target("guest", target)

    def reached() -> bool:
        v = daemon.api.vm("guest")
        return v["running"] and v["actual_bytes"] == target and v["ballooned_bytes"] == target \
            and v["pending_discard_bytes"] == 0

    wait_for(f"the balloon to reach {target // MIB} MiB", reached, timeout)


def fill_before_driver(vm) -> tuple[int, int]:
    """With no balloon driver loaded, hold checksummed pages over all but
    SPARE_MIB of the guest's available memory: (hold pid, MiB held)."""
    status, _ = vm.run("[ -d /sys/module/virtio_balloon ]")
    assert status != 0, "the balloon driver is loaded already: the pattern would not come first"
    mib = vm.meminfo()["MemAvailable"] // 1024 - SPARE_MIB
    assert mib > BALLOON // MIB * 2, f"only {mib} MiB to fill"
    return vm.start_hold(mib, seed=11), mib


def settle_records(daemon: DaemonProcess, since: int) -> list[dict]:
    return [r for r in daemon.log_records(since) if r.get("event") in (DROPPED, RESTORED)]


def load_driver_and_check(vm, daemon: DaemonProcess, since: int, hold: int, held_mib: int,
                          reason: str) -> None:
    """Load the balloon driver (the device starts and the daemon decides about
    its journal), then: every held page intact, the journal dropped for
    `reason`, the daemon's balloon empty, no RAM given back to the host."""
    before = vm.memfd_allocated_bytes()
    try:
        # Short guest timeouts: a guest whose pages were discarded under it
        # crashes or hangs, and that must fail fast.
        order = vm.image.module_load_order("virtio_balloon")
        vm.sh("\n".join(f"insmod /lib/modules/{m}.ko || exit 1" for m in order), timeout=20)
        decided = wait_for("the daemon to decide about its journal",
                           lambda: settle_records(daemon, since), 60)
        # Anything the decision queued for discard is done by now.
        def discards_done() -> bool:
            if not vm.running:
                raise GuestError("QEMU exited: the guest died")
            v = daemon.api.vm("guest")
            return v["running"] and v["pending_discard_bytes"] == 0

        wait_for("pending discards to finish", discards_done, 30)
        ok, bad = vm.verify_hold(hold, timeout=60)
    except GuestError as exc:
        console = "\n".join(vm.console_log.read_text(errors="replace").splitlines()[-15:])
        pytest.fail(f"the guest broke once its balloon driver loaded ({exc}); the daemon decided: "
                    f"{settle_records(daemon, since)}\nconsole:\n{console}")
    assert ok, (f"{bad} of the {held_mib * 256} pages the new driver instance's guest wrote were "
                f"damaged; the daemon decided: {decided}")
    assert [r["event"] for r in decided] == [DROPPED], decided
    assert decided[0].get("reason", "").startswith(reason), decided[0]
    assert decided[0].get("vm") == "guest", decided[0]
    state = daemon.api.vm("guest")
    assert state["ballooned_bytes"] == 0 and daemon.api.pfns("guest")["count"] == 0, state
    after = vm.memfd_allocated_bytes()
    assert after >= before - SLACK, \
        f"the host's RAM allocation fell from {before // MIB} to {after // MIB} MiB: frames were discarded"


def still_balloons(vm, daemon: DaemonProcess, hold: int) -> None:
    """The VM works on: one inflation and deflation with the new driver."""
    vm.sh(f"kill {hold}")
    inflate_to(daemon, 64 * MIB)
    assert daemon.api.pfns("guest")["count"] == 64 * MIB // 4096
    inflate_to(daemon, 0)
    assert daemon.api.pfns("guest")["count"] == 0


@setups
def test_guest_rebooted_while_the_daemon_was_down(make_vm, tmp_path, isolation, engine):
    daemon = start_daemon(tmp_path, isolation, engine)
    try:
        # The driver is loaded by hand, not at boot: the rebooted kernel must
        # not load it before the pattern is written.
        vm = make_vm(KERNEL, memory_mib=RAM_MIB, cmdline=["page_poison=1"],
                     balloon=VhostUserBalloon(daemon.sockets["guest"], chardev_options="reconnect-ms=200"))
        vm.load_module("virtio_balloon")
        inflate_to(daemon, BALLOON)
        qemu_pid = vm.qemu_pid
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        # The balloon's frames are holes in guest RAM; the new kernel knows
        # nothing of them and uses them as ordinary free memory.
        vm.reset()
        hold, held = fill_before_driver(vm)
        since = daemon.log_size()
        daemon.start()
        wait_for("QEMU to reconnect", lambda: daemon.api.vm("guest")["connected"], 60)
        daemon.api.set_target("guest", 0)
        load_driver_and_check(vm, daemon, since, hold, held, "the inflate ring is at 0")
        assert vm.qemu_pid == qemu_pid and vm.running
        still_balloons(vm, daemon, hold)
        assert_served_by(daemon, engine)
    finally:
        daemon.stop()


@setups
def test_new_qemu_on_the_same_ram_file(make_vm, tmp_path, isolation, engine):
    ram = Path("/dev/shm") / f"balloond-test-{os.getpid()}-{uuid.uuid4().hex[:8]}.ram"
    daemon = start_daemon(tmp_path, isolation, engine)
    try:
        first = make_vm(KERNEL, memory_mib=RAM_MIB, load_balloon=True, cmdline=["page_poison=1"],
                        memory_path=ram, balloon=VhostUserBalloon(daemon.sockets["guest"]))
        inflate_to(daemon, BALLOON)
        assert ram.stat().st_blocks * 512 <= RAM_MIB * MIB - BALLOON + SLACK
        first.qmp("quit")
        wait_for("the first QEMU to exit", lambda: not first.running, 30)
        first.kill()
        daemon.wait_disconnected("guest", 10)
        # The daemon runs on; its journal still holds the first guest's balloon.
        daemon.api.set_target("guest", 0)
        second = make_vm(KERNEL, memory_mib=RAM_MIB, cmdline=["page_poison=1"], name="second",
                         memory_path=ram, balloon=VhostUserBalloon(daemon.sockets["guest"]))
        hold, held = fill_before_driver(second)
        since = daemon.log_size()
        load_driver_and_check(second, daemon, since, hold, held, "another QEMU process")
        still_balloons(second, daemon, hold)
        assert_served_by(daemon, engine)
    finally:
        daemon.stop()
        ram.unlink(missing_ok=True)
