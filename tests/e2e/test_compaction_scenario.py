"""Compaction reaches our guest driver's balloon pages at least as well as
Linux's own driver's, where the balloon was inflated on an idle guest.

The scenario (harness/scenarios.py, shared with the benchmarks): a 512 MiB
guest inflates 128 MiB while idle, then fragments its memory with a tmpfs,
then runs four full compactions.  Unlike test_guest_driver.py, which
fragments *before* inflating so that balloon pages land in the holes, here
the balloon's pages sit wherever the page allocator put them on an idle
guest, which is the ordinary case.

One test per kernel boots, one after the other on the same daemon and with
the same guest configuration: the stock ``virtio_balloon``, our driver with
balloond's migrate extension, and our driver without it.  Our driver must
have at least as many balloon pages migrated as the stock one (no slack:
both allocate with the same flags, so the same memory layout gives compaction
the same pages to find; a driver whose pages compaction cannot isolate gets
0), and afterwards the daemon's frame set must be exactly the driver's.
"""

from __future__ import annotations

import pytest

from harness import VhostUserBalloon
from harness.scenarios import COMPACTION_BALLOON_MIB, CompactionRun, balloon_migrate, compaction_after_idle_inflate
from tests.e2e.test_guest_driver import MODULE, build_module, guest_pfns, guest_stats
from tests.e2e.waiting import MIB, wait_for

pytestmark = pytest.mark.vm

BALLOON = COMPACTION_BALLOON_MIB * MIB


def _run(make_vm, daemon, kernel: str, driver: str) -> tuple[CompactionRun, dict[str, str]]:
    """Boot a guest with ``driver`` ("stock", "extension", "fallback"), run
    the scenario, check the daemon against the driver, power the guest off."""
    ours = driver != "stock"
    # A target left by the previous guest would be inflated at probe, before
    # the scenario starts: every guest starts from an empty balloon.
    daemon.api.set_target("guest", 0)
    vm = make_vm(kernel, memory_mib=512, balloon=VhostUserBalloon(daemon.sockets["guest"]),
                 load_balloon=not ours, modules=[build_module(kernel)] if ours else [], name=driver)
    if ours:
        vm.sh(f"insmod /lib/modules/{MODULE}.ko migrate_ext={1 if driver == 'extension' else 0}")
        stats = guest_stats(vm)
        assert stats["ext_negotiated"] == ("yes" if driver == "extension" else "no")
    wait_for("the driver to start the device", lambda: daemon.api.vm("guest")["running"])

    def reached(nbytes: int) -> bool:
        v = daemon.api.vm("guest")
        return v["actual_bytes"] == nbytes and v["ballooned_bytes"] == nbytes and v["pending_discard_bytes"] == 0

    counters_before = daemon.api.vm("guest")["counters"]
    run = compaction_after_idle_inflate(
        vm, lambda n: daemon.api.set_target("guest", n), reached,
        migrated=(lambda: int(guest_stats(vm)["migrated"])) if ours else None)

    wait_for("pending discards", lambda: daemon.api.vm("guest")["pending_discard_bytes"] == 0, 30)
    state = daemon.api.vm("guest")
    stats = guest_stats(vm) if ours else {}
    assert state["ballooned_bytes"] == BALLOON and state["actual_bytes"] == BALLOON
    assert state["counters"]["guest_errors"] == counters_before["guest_errors"]
    if ours:
        # the driver's own count and /proc/vmstat agree, and every move was told
        assert balloon_migrate(vm) == int(stats["migrated"])
        assert int(stats["migrate_failures"]) == 0
        assert int(stats["ext_records" if driver == "extension" else "fallback_pairs"]) == int(stats["migrated"])
        assert state["counters"]["bad_migration"] == 0
        # exactly the same frames on both sides
        assert daemon.api.pfn_set("guest") == guest_pfns(vm)
    vm.close()
    daemon.wait_disconnected("guest", 60)
    return run, stats


@pytest.mark.timeout(2400)
def test_compaction_after_an_idle_inflate_moves_our_pages_at_least_as_often_as_the_stock_drivers(
        make_vm, daemon, kernel):
    runs: dict[str, CompactionRun] = {}
    stats: dict[str, dict[str, str]] = {}
    for driver in ("stock", "extension", "fallback"):
        runs[driver], stats[driver] = _run(make_vm, daemon, kernel, driver)
        print(f"\n{kernel} {driver}: {runs[driver].migrated} balloon pages migrated in "
              f"{runs[driver].compact_seconds:.1f} s" + (f"; driver stats {stats[driver]}" if stats[driver] else ""))

    # the scenario must make compaction move balloon pages at all, or the
    # comparison below proves nothing
    assert runs["stock"].migrated > 0, "the stock driver's pages were not migrated: the scenario is broken"
    for driver in ("extension", "fallback"):
        assert int(stats[driver]["isolations"]) > 0, f"compaction never isolated our pages ({driver}): {stats[driver]}"
        assert runs[driver].migrated >= runs["stock"].migrated, (
            f"{driver}: {runs[driver].migrated} of our balloon pages migrated, "
            f"stock driver {runs['stock'].migrated}")
