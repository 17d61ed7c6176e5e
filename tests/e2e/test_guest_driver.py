"""Our guest driver (guest-driver/) on real guests: compaction moves balloon
pages, and the daemon's set of ballooned frames follows every move.

Each scenario runs on Debian's 6.1, 6.12 and 7.3 kernels, with balloond's
migrate extension (one {old, new} record per move) and without it (the
driver falls back to the standard inflate-new/deflate-old pair), and with
the driver's page layers: its own movable_operations (used up to 6.16) and
the kernel's balloon core (the only way from 6.17, where a module can no
longer register movable_operations).  On 6.1 and 6.12 the balloon-core layer
is forced (BALLOOND_BALLOON_CORE=1), so its 6.x API runs in CI too; 7.3 has
only the balloon core, in its reworked 7.x form (<linux/balloon.h>), and runs
it with and without the extension.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import pytest

from harness import VhostUserBalloon, find_kernel
from protocol import extension as wire
from harness.daemon import DaemonProcess
from harness.scenarios import settle_percpu_lists
from tests.e2e.conftest import ENGINES, KERNEL_SERIES
from tests.e2e.waiting import MIB, wait_for

pytestmark = pytest.mark.vm
#: Our driver (the migrate queue, compaction, unloading) on both vhost-user engines.
E2E_ENGINES = ENGINES

REPO = Path(__file__).resolve().parents[2]
MODULE = "balloond_balloon"


#: PFNs per inflate/deflate buffer of Linux's own driver
#: (VIRTIO_BALLOON_ARRAY_PFNS_MAX), which ours keeps to without the extension.
STOCK_PFNS_PER_BUFFER = 256

#: The driver's page layers and the make variables that select them.
LAYERS = {"movable-ops": [], "balloon-core": ["BALLOOND_BALLOON_CORE=1"]}


def only_balloon_core(kernel: str) -> bool:
    """From 7.x a module cannot register movable_operations: the driver
    builds the balloon-core layer whatever is asked."""
    return int(kernel.split(".")[0]) >= 7


def cases(combos: list[tuple], core_combos: list[tuple]) -> list:
    """(kernel, *values) parameters from (name, *values) combos: ``combos``
    on 6.x, ``core_combos`` on 7.x, where the movable-ops layer cannot be."""
    return [pytest.param(k, *values, id=f"linux-{k}-{name}")
            for k in KERNEL_SERIES
            for name, *values in (core_combos if only_balloon_core(k) else combos)]


@cache
def build_module(kernel: str, layer: str = "movable-ops") -> Path:
    if only_balloon_core(kernel):
        layer = "balloon-core"
    release = find_kernel(kernel).release
    outdir = Path(tempfile.gettempdir()) / f"balloond-guest-driver-{os.getuid()}" / layer
    out = subprocess.run(["sh", str(REPO / "guest-driver" / "build.sh"), "-o", str(outdir), release,
                          "W=1", *LAYERS[layer]], capture_output=True, text=True)
    assert out.returncode == 0, f"guest driver build failed for {release}:\n{out.stderr[-3000:]}"
    log = out.stderr
    assert "warning:" not in log, f"the guest driver builds with warnings on {release}:\n{log[-3000:]}"
    return Path(out.stdout.strip().splitlines()[-1])


def guest_stats(vm) -> dict[str, str]:
    out = vm.sh("cat /sys/kernel/debug/balloond/stats")
    return dict(re.findall(r"^(\w+): (\S+)$", out, re.M))


def guest_pfns(vm) -> set[int]:
    return {int(x) for x in vm.sh("cat /sys/kernel/debug/balloond/pfns", timeout=120).split()}


def vmstat(vm, key: str) -> int:
    m = re.search(rf"^{key} (\d+)$", vm.sh("cat /proc/vmstat"), re.M)
    return int(m.group(1)) if m else 0


def boot_with_driver(make_vm, daemon, kernel: str, ext: bool, layer: str = "movable-ops"):
    ko = build_module(kernel, layer)
    vm = make_vm(kernel, memory_mib=512, balloon=VhostUserBalloon(daemon.sockets["guest"]), modules=[ko])
    # the stock virtio_balloon is never loaded in this guest; ours binds the device
    vm.sh(f"insmod /lib/modules/{MODULE}.ko migrate_ext={1 if ext else 0}")
    assert guest_stats(vm)["page_layer"] == ("balloon-core" if only_balloon_core(kernel) else layer)
    return vm


COMPACTION_CASES = cases(
    [("extension", True, "movable-ops"), ("fallback", False, "movable-ops"), ("balloon-core", True, "balloon-core")],
    [("balloon-core-extension", True, "balloon-core"), ("balloon-core-fallback", False, "balloon-core")],
)


@pytest.mark.parametrize(("kernel", "ext", "layer"), COMPACTION_CASES)
def test_compaction_moves_balloon_pages_and_the_daemon_follows(make_vm, daemon, kernel, ext, layer):
    vm = boot_with_driver(make_vm, daemon, kernel, ext, layer)
    wait_for("the driver to start the device", lambda: daemon.api.vm("guest")["running"])
    features = daemon.api.vm("guest")["features"]
    assert ("BALLOOND_MIGRATE_VQ" in features) == ext
    assert guest_stats(vm)["ext_negotiated"] == ("yes" if ext else "no")

    pid = vm.start_hold(64)  # checksummed data that must survive everything below
    vm.sh("guesttool dirty 200", timeout=300)  # make guest RAM resident on the host
    # Fragment memory first, so the balloon's pages land in the holes, spread
    # over the whole zone; freeing the fragmenter's pages afterwards leaves
    # balloon pages where the compaction scanners find them.
    vm.sh("guesttool fragment 200 > /tmp/frag.log 2>&1 & echo $! > /tmp/frag.pid; "
          "while ! grep -q READY /tmp/frag.log; do sleep 0.2; done", timeout=300)
    resident_before = vm.memfd_allocated_bytes()
    balloon = 96 * MIB
    buffers_before = daemon.api.vm("guest")["counters"]["inflate_buffers"]
    daemon.api.set_target("guest", balloon)
    wait_for("the balloon to reach its target",
             lambda: (v := daemon.api.vm("guest"))["actual_bytes"] == balloon and v["ballooned_bytes"] == balloon)
    wait_for("pending discards", lambda: daemon.api.vm("guest")["pending_discard_bytes"] == 0, 10)
    freed_by_inflate = resident_before - vm.memfd_allocated_bytes()
    assert freed_by_inflate >= 0.95 * balloon
    # With the extension the driver fills buffers of wire.PFNS_PER_BUFFER
    # frames, without it the stock STOCK_PFNS_PER_BUFFER: more than that per
    # buffer on average is only possible with the larger ones.
    batch = wire.PFNS_PER_BUFFER if ext else STOCK_PFNS_PER_BUFFER
    assert int(guest_stats(vm)["batch"]) == batch
    buffers = daemon.api.vm("guest")["counters"]["inflate_buffers"] - buffers_before
    per_buffer = balloon // 4096 / buffers
    assert (per_buffer > STOCK_PFNS_PER_BUFFER) == ext and per_buffer <= batch, f"{buffers} inflate buffers for {balloon // 4096} frames"

    vm.sh("kill $(cat /tmp/frag.pid); sleep 0.5")
    # The fragmenter's pages go to per-CPU free lists first, where
    # compaction's free scanner cannot take them: started at once, a
    # compaction may find no free page, its scanners meet at the first
    # pageblocks and no balloon page is even isolated.
    percpu = settle_percpu_lists(vm)
    before = int(guest_stats(vm)["migrated"])
    for _ in range(4):
        vm.sh("echo 1 > /proc/sys/vm/compact_memory", timeout=300)
    stats = guest_stats(vm)
    migrated = int(stats["migrated"]) - before
    assert migrated > 0, f"compaction moved no balloon page ({percpu} pages on per-CPU lists): {stats}"
    assert vmstat(vm, "balloon_migrate") >= migrated
    assert int(stats["migrate_failures"]) == 0

    # Reading pfns first tells the host of every move not told yet (split
    # migrations tell a move's destination late, see the driver's README).
    pfns = guest_pfns(vm)
    wait_for("pending discards", lambda: daemon.api.vm("guest")["pending_discard_bytes"] == 0, 10)
    state = daemon.api.vm("guest")
    stats = guest_stats(vm)
    if ext and stats["ext_split"] == "yes":
        # one arrival per move, but for a destination moved again before it was told
        assert state["migrations"] == int(stats["ext_arrivals"]) >= 0.95 * migrated
        assert state["counters"]["departures"] == int(stats["ext_departures"])
        assert int(stats["fallback_pairs"]) == 0
    elif ext:
        assert state["migrations"] >= migrated
        assert int(stats["ext_records"]) >= migrated and int(stats["fallback_pairs"]) == 0
    else:
        assert state["migrations"] >= migrated
        assert int(stats["fallback_pairs"]) >= migrated and int(stats["ext_records"]) == 0
    # exactly the same frames on both sides
    assert daemon.api.pfn_set("guest") == pfns
    assert state["ballooned_bytes"] == balloon
    # every frame that entered the balloon had its host memory released
    assert state["host_freed_bytes"] >= 0.95 * balloon
    assert state["counters"]["bad_migration"] == 0 and state["counters"]["guest_errors"] == 0

    ok, bad = vm.verify_hold(pid)
    assert ok, f"{bad} pages of the guest's data changed"
    print(f"\n{kernel} {layer} {'extension' if ext else 'fallback'}: {migrated} balloon pages migrated, "
          f"daemon counted {state['migrations']}, PFN sets equal ({len(guest_pfns(vm))} frames)")


@pytest.mark.parametrize(("kernel", "layer"), cases([(layer, layer) for layer in LAYERS], [("balloon-core", "balloon-core")]))
def test_unloading_with_a_full_balloon_returns_every_page(make_vm, daemon, kernel, layer):
    vm = boot_with_driver(make_vm, daemon, kernel, ext=True, layer=layer)
    total = vm.meminfo()["MemTotal"]
    daemon.api.set_target("guest", 64 * MIB)
    wait_for("the balloon to fill", lambda: daemon.api.vm("guest")["ballooned_bytes"] == 64 * MIB)
    vm.sh(f"rmmod {MODULE}", timeout=300)
    wait_for("the daemon's set to empty", lambda: daemon.api.pfns("guest")["count"] == 0, 60)
    assert vm.meminfo()["MemTotal"] >= total
    assert daemon.api.vm("guest")["counters"]["stray_deflate"] == 0


@pytest.mark.parametrize(("kernel", "layer"), cases([(layer, layer) for layer in LAYERS], [("balloon-core", "balloon-core")]))
def test_deflating_and_unloading_while_compaction_moves_balloon_pages(make_vm, daemon, kernel, layer):
    """Compaction keeps moving balloon pages while the balloon deflates and
    then while the driver unloads. With split migrations (movable-ops) the
    moves' destinations are told late and departed pages come back as
    returns: a deflate must tell them first (never naming a frame the host
    has not heard of), and an unload, whose drain runs with the delayed
    telling stopped, must still give every page back. The daemon must have
    refused nothing and end with an empty balloon, and the guest's data
    must be intact."""
    vm = boot_with_driver(make_vm, daemon, kernel, ext=True, layer=layer)
    wait_for("the driver to start the device", lambda: daemon.api.vm("guest")["running"])
    pid = vm.start_hold(48)
    vm.sh("guesttool fragment 200 > /tmp/frag.log 2>&1 & echo $! > /tmp/frag.pid; "
          "while ! grep -q READY /tmp/frag.log; do sleep 0.2; done", timeout=300)
    daemon.api.set_target("guest", 96 * MIB)
    wait_for("the balloon to reach its target",
             lambda: (v := daemon.api.vm("guest"))["actual_bytes"] == 96 * MIB and v["ballooned_bytes"] == 96 * MIB)
    before = daemon.api.vm("guest")["migrations"]
    # holes for compaction to fill, then compaction without pause; the holes
    # must have left the per-CPU free lists first (see settle_percpu_lists:
    # on 6.12 a compaction started at once may find none and move nothing)
    vm.sh("kill $(cat /tmp/frag.pid); sleep 0.5")
    settle_percpu_lists(vm)
    vm.sh("(while :; do echo 1 > /proc/sys/vm/compact_memory; done) > /dev/null 2>&1 & echo $! > /tmp/compact.pid")
    # the count once it is above 0 (wait_for returns the first truthy value)
    moved_before_deflating = wait_for("compaction to move balloon pages",
                                      lambda: int(guest_stats(vm)["migrated"]), 120)
    # Small steps, so the deflates fall among the compaction's moves. While
    # compaction runs, the daemon's count may lag the guest's by the moves
    # not yet told (split migrations tell a move's destination late), so the
    # guest's `actual` is what each step waits for; once compaction pauses,
    # the late tellings must bring the two to the same balloon.
    for mib in range(92, 63, -4):
        daemon.api.set_target("guest", mib * MIB)
        wait_for("the balloon to deflate while compaction runs",
                 lambda mib=mib: daemon.api.vm("guest")["actual_bytes"] == mib * MIB, 300)
    vm.sh("kill $(cat /tmp/compact.pid); sleep 0.2")
    wait_for("the daemon's balloon to match the guest's once compaction pauses",
             lambda: daemon.api.vm("guest")["ballooned_bytes"] == 64 * MIB, 60)
    vm.sh("(while :; do echo 1 > /proc/sys/vm/compact_memory; done) > /dev/null 2>&1 & echo $! > /tmp/compact.pid")
    stats = guest_stats(vm)
    assert int(stats["migrated"]) > moved_before_deflating, \
        f"compaction moved no balloon page while deflating ({moved_before_deflating} before): {stats}"
    vm.sh(f"rmmod {MODULE}", timeout=300)
    wait_for("the daemon's set to empty", lambda: daemon.api.pfns("guest")["count"] == 0, 60)
    vm.sh("kill $(cat /tmp/compact.pid)")
    state = daemon.api.vm("guest")
    counters = state["counters"]
    assert counters["stray_deflate"] == 0, "a deflate named a frame the host did not count"
    assert counters["bad_migration"] == 0 and counters["guest_errors"] == 0
    assert state["migrations"] > before, f"compaction moved no balloon page meanwhile: {stats}"
    ok, bad = vm.verify_hold(pid)
    assert ok, f"{bad} pages of the guest's data changed"
    print(f"\n{kernel} {layer}: {state['migrations'] - before} moves counted by the daemon while deflating "
          f"and unloading; driver stats before unloading {stats}")



#: Each page layer's own way of listing frames: the movable-ops layer tries
#: balloon_lock for a while, the 7.x balloon core walks its record without it.
ABSENT_HOST_CASES = [p for p in cases([("movable-ops", "movable-ops")], [("balloon-core", "balloon-core")])
                     if p.values[0] != "6.1"]


@pytest.mark.parametrize(("kernel", "layer"), ABSENT_HOST_CASES)
def test_reading_the_frames_never_waits_for_an_absent_host(make_vm, tmp_path, kernel, layer):
    """A read of the driver's frame list while an inflate buffer waits for a
    host that is away (the daemon killed mid-inflation, QEMU reconnecting)
    returns: the buffer in flight holds balloon_lock until the host is back,
    so the read must not wait for that lock. Then the daemon comes back, the
    balloon reaches its target and the two sets agree."""
    daemon = DaemonProcess(tmp_path / "daemon", vms=("guest",), log_level="info",
                           extra_args=["--state-dir", str(tmp_path / "state")])
    daemon.start()
    try:
        ko = build_module(kernel, layer)
        vm = make_vm(kernel, memory_mib=512, modules=[ko],
                     balloon=VhostUserBalloon(daemon.sockets["guest"], chardev_options="reconnect-ms=200"))
        vm.sh(f"insmod /lib/modules/{MODULE}.ko")
        assert guest_stats(vm)["page_layer"] == layer
        wait_for("the device to start", lambda: daemon.api.vm("guest")["running"])
        target = 0
        for _ in range(5):
            start, target = target, target + 128 * MIB
            daemon.api.set_target("guest", target)
            mid = wait_for("the balloon to move", lambda: (b := daemon.api.vm("guest")["ballooned_bytes"]) > start
                           and (b,), 60, 0.01)[0]
            if mid < target:
                daemon.kill()
                break
            wait_for("the balloon to settle", lambda: int(guest_stats(vm)["pages"]) * 4096 == target)
        else:
            pytest.fail("no inflation could be caught midway")
        held = int(guest_stats(vm)["pages"])
        assert held * 4096 < target, "the guest reached its target without the daemon"
        vm.sh("(cat /sys/kernel/debug/balloond/pfns > /tmp/pfns; echo $? > /tmp/pfns.done) </dev/null >/dev/null 2>&1 &")
        wait_for("the frame list read with the daemon away",
                 lambda: vm.sh("cat /tmp/pfns.done 2>/dev/null; true").strip() == "0", 30)
        listed = int(vm.sh("wc -l < /tmp/pfns").strip())
        # The balloon's frames but, at most, the buffer in flight.
        assert held - wire.PFNS_PER_BUFFER <= listed <= held, f"listed {listed} frames of {held}"
        assert int(guest_stats(vm)["pages"]) == held, "the guest's balloon moved without the daemon"
        daemon.start()
        wait_for("the balloon to fill", lambda: daemon.api.vm("guest")["ballooned_bytes"] == target)
        assert daemon.api.pfn_set("guest") == guest_pfns(vm)
    finally:
        daemon.stop()
