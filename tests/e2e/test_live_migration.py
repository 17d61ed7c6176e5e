"""Live migration of a VM whose balloon balloond serves (qemu-patches/0003).

One daemon serves both ends, on two sockets ("src" and "dst"), as a host
would serve a VM migrating between two of its QEMUs; the destination QEMU is
started with the source's arguments plus -incoming. A 1 GiB 6.12 guest holds
a data pattern (guesttool hold) and a 384 MiB balloon when it migrates.

What must hold afterwards: the destination's daemon has adopted the balloon
(the same frames as the source's), the guest did not lose its balloon (its
target travelled with it), the destination's RAM file has at most
1 GiB - 0.95 x balloon allocated, the pattern is intact, and the balloon
still inflates and deflates on the destination.

With QEMU's skip-file-holes capability (qemu-patches/0004) the ballooned
pages are not allocated on either side while the VM migrates: both RAM
files stay within the same bound throughout, sampled as QEMU copies. Both
ends are named: the destination says which VM it came from, the source
(one daemon serves both) which VM it went to.

A cancelled migration and one whose destination dies midway leave the source
running with its balloon, its pattern and its memory savings (without
skip-file-holes, reading RAM for the migration allocated every ballooned
page again; the daemon discards them again when QEMU's dirty logging ends).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from harness import VhostUserBalloon, Vm
from harness.daemon import DaemonProcess
from harness.ram_sampler import PeakAllocation
from harness.scenarios import settle_percpu_lists
from tests.e2e.conftest import ENGINES, assert_served_by
from tests.e2e.waiting import MIB, wait_for

pytestmark = [pytest.mark.vm]

#: Both engines migrate a VM: the tests that take the module's `daemon` run once per
#: engine, and so does the restart test, which starts its own daemon.
E2E_ENGINES = ENGINES

GUEST_MIB = 1024
BALLOON_MIB = 384
HOLD_MIB = 128
SEED = 12


def balloon_reached(daemon: DaemonProcess, vm: str, mib: int) -> Any:
    state = daemon.api.vm(vm)
    return (state["actual_bytes"] == mib * MIB and state["ballooned_bytes"] == mib * MIB
            and state["pending_discard_bytes"] == 0) and state


def allocation_bound(balloon_mib: int) -> int:
    return GUEST_MIB * MIB - int(0.95 * balloon_mib * MIB)


#: What the guest may newly write while it migrates (its kernel, the command
#: agent and the hold's process keep running; a page they touch that was a
#: hole becomes data) on top of what it had allocated when the migration
#: began. Measured on the TCG guest of these tests: no growth at 0.1 MiB
#: resolution over a 3 s migration; the slack leaves room for a busier guest.
GUEST_ACTIVITY_SLACK = 16 * MIB

#: Slow enough that QEMU copies RAM for several seconds, long enough to
#: sample both RAM files many times as it goes.
SAMPLED_BANDWIDTH = 64 * MIB


def skip_file_holes(vm: Vm) -> None:
    """QEMU's skip-file-holes capability (qemu-patches/0004): holes of the
    RAM file are neither read nor sent."""
    vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "skip-file-holes", "state": True}])


def balloonctl(daemon: DaemonProcess, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "balloond.services.cli", "--api", daemon.api_path, *args],
                          capture_output=True, text=True, check=True, timeout=30).stdout


@pytest.fixture
def daemon(tmp_path: Path, engine: str):
    """One daemon serving both ends on `engine`."""
    args = [] if engine == "pure" else ["--engine", engine]
    proc = DaemonProcess(tmp_path / "daemon", vms=("src", "dst"), extra_args=args, log_level="info")
    proc.start()
    yield proc
    proc.stop()
    assert_served_by(proc, engine)


def source(make_vm, daemon: DaemonProcess) -> tuple[Vm, int]:
    """The 1 GiB guest on "src", with its pattern and its 384 MiB balloon."""
    vm = make_vm("6.12", name="src", memory_mib=GUEST_MIB, load_balloon=True,
                 balloon=VhostUserBalloon(daemon.sockets["src"]))
    wait_for("the source's device to start", lambda: daemon.api.vm("src")["running"])
    hold = vm.start_hold(HOLD_MIB, SEED)
    daemon.api.set_target("src", BALLOON_MIB * MIB)
    wait_for("the source to reach its balloon", lambda: balloon_reached(daemon, "src", BALLOON_MIB), 300)
    assert vm.memfd_allocated_bytes() <= allocation_bound(BALLOON_MIB)
    return vm, hold


def destination(tmp_path: Path, daemon: DaemonProcess, src: Vm, name: str = "dst",
                chardev_options: str = "") -> tuple[Vm, str]:
    """A QEMU waiting for the source's state, with the same arguments."""
    uri = f"unix:{tempfile.mkdtemp(prefix='bd-mig-')}/incoming.sock"
    vm = Vm(src.kernel, name=name, memory_mib=GUEST_MIB, load_balloon=True, log_dir=tmp_path / name,
            balloon=VhostUserBalloon(daemon.sockets["dst"], chardev_options=chardev_options), incoming=uri)
    vm.start()
    return vm, uri


def test_precopy_moves_the_balloon_and_the_guest_keeps_its_data(make_vm, daemon: DaemonProcess, tmp_path: Path):
    src, hold = source(make_vm, daemon)
    frames = daemon.api.pfn_set("src")
    assert len(frames) == BALLOON_MIB * 256
    dst, uri = destination(tmp_path, daemon, src)
    try:
        # Postcopy is refused: the daemon does not serve page faults for QEMU.
        with pytest.raises(Exception, match="not capable of postcopy"):
            dst.qmp("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
        skip_file_holes(src)
        src.qmp("migrate-set-parameters", {"max-bandwidth": SAMPLED_BANDWIDTH})
        before = src.memfd_allocated_bytes()
        with PeakAllocation(src, dst) as peak:
            info = src.migrate_to(uri)
        assert info["status"] == "completed", info
        # Neither side allocated the balloon while QEMU copied RAM: the
        # source did not read its holes, the destination received nothing
        # for them (without skip-file-holes both reach the whole 1 GiB).
        print(f"peak RAM file while migrating ({peak.samples} samples, {info['total-time']} ms): "
              f"source {peak.peak[0] / MIB:.1f} MiB (at the start {before / MIB:.1f} MiB), "
              f"destination {peak.peak[1] / MIB:.1f} MiB, with a {BALLOON_MIB} MiB balloon "
              f"(RAM - 0.95 x balloon: {allocation_bound(BALLOON_MIB) / MIB:.0f} MiB)")
        assert peak.samples > 20, "the migration was too quick to be sampled"
        # At most what the source held when it began (itself at most
        # RAM - 0.95 x balloon: source()), and what the guest wrote since.
        for side, value in zip(("source", "destination"), peak.peak):
            assert value <= before + GUEST_ACTIVITY_SLACK, \
                (f"the {side}'s RAM file reached {value / MIB:.0f} MiB while migrating a {BALLOON_MIB} MiB balloon "
                 f"({before / MIB:.0f} MiB allocated at the start)")
        wait_for("the guest to run on the destination", lambda: dst.qmp("query-status")["status"] == "running", 60)
        assert src.qmp("query-status")["status"] == "postmigrate"

        # The destination adopted the balloon: the very same frames, and the
        # guest's driver finds the same target (no deflate after the move).
        state = wait_for("the destination's device to run with the balloon",
                         lambda: (s := balloon_reached(daemon, "dst", BALLOON_MIB)) and s["running"] and s, 120)
        assert daemon.api.pfn_set("dst") == frames
        assert state["counters"]["migrations_in"] == 1
        assert daemon.api.vm("src")["counters"]["migrations_out"] == 1
        assert daemon.api.vm("src")["ballooned_bytes"] == BALLOON_MIB * MIB  # both sides' APIs agree
        # balloonctl names both ends (one daemon serves them: it pairs them).
        host = socket.gethostname()
        assert f"migrated in from VM src on host {host}" in balloonctl(daemon, "status", "dst")
        assert f"migrated out to VM dst on host {host}" in balloonctl(daemon, "status", "src")

        # QEMU's loading wrote a zero page for every ballooned frame, which
        # allocates in the destination's memfd; the daemon discarded them.
        allocated = dst.memfd_allocated_bytes()
        assert allocated <= allocation_bound(BALLOON_MIB), \
            f"destination RAM file holds {allocated / MIB:.0f} MiB with a {BALLOON_MIB} MiB balloon"
        print(f"migration: total {info['total-time']} ms, downtime {info['downtime']} ms; "
              f"destination RAM file {allocated / MIB:.0f} MiB with a {BALLOON_MIB} MiB balloon "
              f"(bound {allocation_bound(BALLOON_MIB) / MIB:.0f} MiB)")

        ok, bad = dst.verify_hold(hold)
        assert ok, f"{bad} pages of the guest's pattern changed in the migration"

        # The balloon still works on the destination, both ways.
        daemon.api.set_target("dst", 512 * MIB)
        wait_for("an inflate on the destination", lambda: balloon_reached(daemon, "dst", 512), 300)
        assert dst.memfd_allocated_bytes() <= allocation_bound(512)
        daemon.api.set_target("dst", 128 * MIB)
        wait_for("a deflate on the destination", lambda: balloon_reached(daemon, "dst", 128), 300)
        ok, bad = dst.verify_hold(hold)
        assert ok, f"{bad} pages of the pattern changed after the destination's inflate and deflate"
    finally:
        dst.kill()
        src.kill()  # stopped for good (postmigrate): its guest now runs on the destination


def assert_source_still_works(daemon: DaemonProcess, src: Vm, hold: int) -> None:
    """The VM stayed on the source: it runs, keeps balloon and data, its
    ballooned pages (read back in for the migration) are discarded again,
    and its balloon still moves."""
    assert src.qmp("query-status")["status"] == "running"
    wait_for("the source to be running with its balloon", lambda: (s := balloon_reached(daemon, "src", BALLOON_MIB))
             and s["running"] and s, 60)
    wait_for("the source's ballooned pages to be discarded again",
             lambda: src.memfd_allocated_bytes() <= allocation_bound(BALLOON_MIB), 60)
    assert daemon.api.vm("src")["counters"]["rediscards_after_migration"] >= 1
    ok, bad = src.verify_hold(hold)
    assert ok, f"{bad} pages of the pattern changed"
    daemon.api.set_target("src", 448 * MIB)
    wait_for("an inflate on the source", lambda: balloon_reached(daemon, "src", 448), 300)
    daemon.api.set_target("src", 320 * MIB)
    wait_for("a deflate on the source", lambda: balloon_reached(daemon, "src", 320), 300)


def pause_before_switchover(src: Vm) -> None:
    """Hold the migration once RAM is copied and the VM stopped, before the
    device state goes (QEMU's pause-before-switchover): a migration that ends
    there went through everything a completed one does on the source, the
    first pass that reads every ballooned page included."""
    src.qmp("migrate-set-capabilities", capabilities=[{"capability": "pause-before-switchover", "state": True}])


def wait_paused(src: Vm) -> None:
    """Until the switchover; then the source's RAM file is checked: QEMU read
    every page for the migration, and a read of a hole in a shared memory
    file allocates a page, so the balloon is back (docs/migration.md)."""
    wait_for("the migration to reach the switchover", lambda: src.qmp("query-migrate")["status"] == "pre-switchover",
             300)
    allocated = src.memfd_allocated_bytes()
    print(f"source RAM file at the switchover: {allocated / MIB:.0f} MiB with a {BALLOON_MIB} MiB balloon")
    assert allocated > allocation_bound(BALLOON_MIB), "QEMU no longer reads ballooned pages back in: docs/migration.md"


def test_a_cancelled_migration_leaves_the_source_working(make_vm, daemon: DaemonProcess):
    src, hold = source(make_vm, daemon)
    pause_before_switchover(src)
    src.migrate_to("exec:cat > /dev/null", wait=False)
    wait_paused(src)
    assert not daemon.api.vm("src")["running"], "the VM stopped for the switchover, and the device with it"
    src.qmp("migrate_cancel")
    info = src.wait_migration(60)
    assert info["status"] == "cancelled", info
    assert_source_still_works(daemon, src, hold)


def test_a_migration_whose_destination_dies_leaves_the_source_working(make_vm, daemon: DaemonProcess,
                                                                      tmp_path: Path):
    src, hold = source(make_vm, daemon)
    dst, uri = destination(tmp_path, daemon, src)
    pause_before_switchover(src)
    src.migrate_to(uri, wait=False)
    wait_paused(src)
    dst.kill()
    src.qmp("migrate-continue", state="pre-switchover")
    info = src.wait_migration(120)
    assert info["status"] == "failed", info
    assert_source_still_works(daemon, src, hold)


def test_balloon_page_moves_during_the_migration_are_not_lost(make_vm, daemon: DaemonProcess, tmp_path: Path):
    """Our guest driver (with the migrate queue) while memory compaction
    keeps moving balloon pages as the VM migrates: every move the source's
    daemon acknowledged before the switchover travels in the device state,
    every used-ring write it made went into QEMU's dirty log (or the guest
    would wait for ever on the destination), and the moves after it reach
    the destination's daemon. Afterwards both sides agree frame for frame."""
    from tests.e2e.test_guest_driver import MODULE, build_module, guest_pfns, guest_stats

    ko = build_module("6.12")
    src = make_vm("6.12", name="src", memory_mib=GUEST_MIB, modules=[ko],
                  balloon=VhostUserBalloon(daemon.sockets["src"]))
    src.sh(f"insmod /lib/modules/{MODULE}.ko migrate_ext=1")
    wait_for("the driver to start the device", lambda: daemon.api.vm("src")["running"])
    hold = src.start_hold(64, SEED)
    # Fragment first, so that balloon pages land where compaction finds them.
    src.sh("guesttool fragment 200 > /tmp/frag.log 2>&1 & echo $! > /tmp/frag.pid; "
           "while ! grep -q READY /tmp/frag.log; do sleep 0.2; done", timeout=300)
    balloon_mib = 256
    daemon.api.set_target("src", balloon_mib * MIB)
    wait_for("the source to reach its balloon", lambda: balloon_reached(daemon, "src", balloon_mib), 300)
    src.sh("kill $(cat /tmp/frag.pid); sleep 0.5")
    settle_percpu_lists(src)  # the holes off the per-CPU lists, where compaction can fill them
    src.sh("(while :; do echo 1 > /proc/sys/vm/compact_memory; sleep 0.05; done) > /dev/null 2>&1 & "
           "echo $! > /tmp/compact.pid")

    uri = f"unix:{tempfile.mkdtemp(prefix='bd-mig-')}/incoming.sock"
    dst = Vm(src.kernel, name="dst", memory_mib=GUEST_MIB, modules=[ko], log_dir=tmp_path / "dst",
             balloon=VhostUserBalloon(daemon.sockets["dst"]), incoming=uri)
    dst.start()
    try:
        # Slow enough that compaction runs through many of QEMU's passes.
        src.qmp("migrate-set-parameters", {"max-bandwidth": 32 * MIB})
        # Pages ballooned at the start are left out; those compaction gives
        # back to the guest and it writes are dirty and sent: the data check
        # below holds with skip-file-holes too.
        skip_file_holes(src)
        moves_before = daemon.api.vm("src")["migrations"]
        info = src.migrate_to(uri)
        assert info["status"] == "completed", info
        moved_while_migrating = daemon.api.vm("src")["migrations"] - moves_before
        wait_for("the guest to run on the destination", lambda: dst.qmp("query-status")["status"] == "running", 60)
        dst.sh("kill $(cat /tmp/compact.pid); sleep 0.5")

        def agree() -> bool:
            # Reading the guest's list also tells the host of every move not
            # told yet; a compaction pass cut short by the kill may still be
            # sending departures, so look until both sides have settled.
            pfns = guest_pfns(dst)
            return daemon.api.pfn_set("dst") == pfns and daemon.api.vm("dst")["pending_discard_bytes"] == 0

        settled = False
        for _ in range(20):
            if agree():
                settled = True
                break
            time.sleep(0.5)
        pfns = guest_pfns(dst)
        state = daemon.api.vm("dst")
        stats = guest_stats(dst)
        print(f"balloon pages the source's daemon saw move while migrating: {moved_while_migrating}; "
              f"guest: {stats.get('migrated')} moved in all")
        assert moved_while_migrating > 0, "compaction moved no balloon page during the migration"
        ours = daemon.api.pfn_set("dst")
        assert settled and ours == pfns, (f"the destination's daemon lost balloon page moves: {len(ours - pfns)} frames only "
                              f"it has, {len(pfns - ours)} only the guest has; guest {stats}; "
                              f"source {daemon.api.vm('src')['counters']}; destination {state['counters']}")
        assert state["ballooned_bytes"] == balloon_mib * MIB
        assert state["counters"]["bad_migration"] == 0 and state["counters"]["guest_errors"] == 0
        assert int(stats["migrate_failures"]) == 0
        assert dst.memfd_allocated_bytes() <= allocation_bound(balloon_mib)
        ok, bad = dst.verify_hold(hold)
        assert ok, f"{bad} pages of the guest's data changed"
    finally:
        dst.kill()
        src.kill()


def test_a_daemon_restarted_after_the_migration_restores_the_migrated_balloon(make_vm, tmp_path: Path,
                                                                              engine: str):
    """With --state-dir the destination's journal holds the adopted balloon
    from the first start on: a daemon killed right after the migration comes
    back with the same frames for the same QEMU (which reconnects), and the
    balloon goes on working."""
    daemon = DaemonProcess(tmp_path / "daemon", vms=("src", "dst"), log_level="info",
                           extra_args=["--engine", engine, "--state-dir", str(tmp_path / "state")])
    daemon.start()
    try:
        src, hold = source(make_vm, daemon)
        frames = daemon.api.pfn_set("src")
        dst, uri = destination(tmp_path, daemon, src, chardev_options="reconnect-ms=200")
        try:
            info = src.migrate_to(uri)
            assert info["status"] == "completed", info
            wait_for("the destination's device to run with the balloon",
                     lambda: (s := balloon_reached(daemon, "dst", BALLOON_MIB)) and s["running"], 120)
            src.kill()
            daemon.kill()
            daemon.start()
            wait_for("QEMU to reconnect and the device to start again",
                     lambda: (s := daemon.api.vm("dst"))["connected"] and s["running"], 60)
            assert dst.running, "the destination QEMU died when the daemon restarted"
            assert daemon.api.pfn_set("dst") == frames, "the restarted daemon lost the migrated balloon"
            wait_for("the restored balloon", lambda: balloon_reached(daemon, "dst", BALLOON_MIB), 60)
            assert dst.memfd_allocated_bytes() <= allocation_bound(BALLOON_MIB)
            daemon.api.set_target("dst", 448 * MIB)
            wait_for("an inflate after the restart", lambda: balloon_reached(daemon, "dst", 448), 300)
            daemon.api.set_target("dst", 320 * MIB)
            wait_for("a deflate after the restart", lambda: balloon_reached(daemon, "dst", 320), 300)
            assert daemon.api.vm("dst")["counters"]["stray_deflate"] == 0
            ok, bad = dst.verify_hold(hold)
            assert ok, f"{bad} pages of the pattern changed"
        finally:
            dst.kill()
            src.kill()
    finally:
        daemon.stop()
    assert_served_by(daemon, engine)


class DaemonWithoutDeviceState(DaemonProcess):
    """balloond (all VMs in one process) that does not offer
    VHOST_USER_PROTOCOL_F_DEVICE_STATE: a backend that cannot hand its
    state over, as every backend of the generic device was before."""

    CODE = (
        "import sys\n"
        "from balloond.engine import connection\n"
        "from protocol.vhost_user import ProtocolFeature\n"
        "connection.VhostUserConnection.__init__.__kwdefaults__['protocol_features'] &= "
        "~(1 << ProtocolFeature.DEVICE_STATE)\n"
        "from balloond.services.daemon import main\n"
        "sys.exit(main())\n"
    )

    @property
    def argv(self) -> list[str]:
        python, _, _, *rest = super().argv
        return [python, "-c", self.CODE, *rest, "--vm-isolation", "none"]


def test_a_backend_without_device_state_keeps_the_vm_from_migrating(vm_environment, tmp_path: Path):
    """The QEMU patch changes nothing for such a backend: migration is
    refused, with the reason, and the VM goes on."""
    daemon = DaemonWithoutDeviceState(tmp_path / "daemon", vms=("vm",), log_level="info")
    daemon.start()
    vm = Vm("6.12", name="blocked", memory_mib=256, load_balloon=True, log_dir=tmp_path / "vm",
            balloon=VhostUserBalloon(daemon.sockets["vm"]), qemu_args=["-S"])
    try:
        vm.start()
        wait_for("QEMU to connect", lambda: daemon.api.vm("vm")["connected"], 60)
        with pytest.raises(Exception, match="does not support device state transfer"):
            vm.qmp("migrate", uri="exec:cat > /dev/null")
        assert vm.qmp("query-status")["status"] == "prelaunch"
        assert vm.qmp("query-migrate").get("status", "none") == "none"
    finally:
        vm.kill()
        daemon.stop()
