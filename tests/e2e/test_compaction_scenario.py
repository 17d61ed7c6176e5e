"""Compaction reaches our guest driver's balloon pages at least as well as
Linux's own driver's, where the balloon was inflated on an idle guest.

The scenario (harness/scenarios.py, shared with the benchmarks): a 512 MiB
guest inflates 128 MiB while idle, then fragments its memory with a tmpfs,
then runs four full compactions.  Unlike test_guest_driver.py, which
fragments *before* inflating so that balloon pages land in the holes, here
the balloon's pages sit wherever the page allocator put them on an idle
guest, which is the ordinary case.

One test per kernel boots, one after the other on the same daemon and with
the same guest configuration (the driver loaded by insmod once the guest is
up): the stock ``virtio_balloon``, our driver with balloond's migrate
extension, and our driver without it; three rounds of the three.  Both
drivers allocate balloon pages with the same flags, so where the pages lie,
and so how many compaction can reach, is the page allocator's doing and
varies a little from boot to boot; the scenario waits for the guest's
per-CPU free lists to hand the freed pages back before compacting (without
that, on 6.12, the count swung between 0 and 4879 for the same driver).  The
test compares the medians of the rounds: ours must reach SAME_AS_STOCK of
the stock driver's (the boot-to-boot spread; see there), and the kernel's
failed migrations with our driver must not
exceed those with the stock one (the count of moved pages is bounded by the
holes compaction can fill, so a driver refusing half its pages still fills
them all; it shows in the failures).  Each of our runs must also have had pages isolated and
moved at all (a driver whose pages compaction cannot take gets 0), and
afterwards the daemon's frame set must be exactly the driver's.
"""

from __future__ import annotations

import statistics

import pytest

from harness import VhostUserBalloon
from harness.scenarios import COMPACTION_BALLOON_MIB, CompactionRun, balloon_migrate, compaction_after_idle_inflate
from tests.e2e.test_guest_driver import MODULE, build_module, guest_pfns, guest_stats
from tests.e2e.conftest import ENGINES
from tests.e2e.waiting import MIB, wait_for

pytestmark = pytest.mark.vm

#: The stock driver's and ours' compaction round trips, on both engines.
E2E_ENGINES = ENGINES

BALLOON = COMPACTION_BALLOON_MIB * MIB
DRIVERS = ("stock", "extension", "fallback")
#: Three, so that a median is one round's figure: with two it was their mean,
#: and one round with our driver on libvhost-user (then without a polling
#: window, so slower round trips and more compactions finding balloon_lock
#: busy) had 314 failed migrations against 4 in the other: a median of 159.
ROUNDS = 3
#: Ours must move at least this share of the stock driver's count. Both are
#: capped by the holes compaction can fill, so equal drivers tie on average,
#: and two boots of the very same stock driver differed by up to 21 % (6.1:
#: 3807 and 4846; 6.12: 3392 and 4244): requiring ours >= stock over two
#: rounds failed a run where ours was 4581 against 4801. A driver
#: compaction cannot reach moves none (the bug this test is for), and one that
#: refuses part of its moves shows in the failed migrations checked below.
SAME_AS_STOCK = 0.75
#: Failed migrations ours may have beyond the stock driver's: every run sees
#: 3-4 (pages other than the balloon's), a driver refusing part of its
#: moves thousands (16000+ measured for one refusing odd frames).
FAILED_SLACK = 16


def _check_split_migrations(stats: dict[str, str], before: dict[str, int], state: dict) -> None:
    """Our driver with the extension reports compaction's moves as split
    migrations (movable-ops layer): a batch's departures in one buffer, the
    destinations later. The daemon counted exactly what the driver sent, and
    the batching happened: far fewer buffers than moves."""
    after = state["counters"]
    migrated = int(stats["migrated"])
    if stats["page_layer"] != "movable-ops":
        # the kernel's balloon core isolates: one whole record per move
        assert stats["ext_split"] == "no" and int(stats["ext_records"]) == migrated
        return
    assert stats["ext_split"] == "yes"
    departures, arrivals, returns = (int(stats[k]) for k in ("ext_departures", "ext_arrivals", "ext_returns"))
    assert after["departures"] - before["departures"] == departures
    assert after["returns"] - before["returns"] == returns
    assert after["migrations"] - before["migrations"] == arrivals
    assert int(stats["ext_records"]) == departures + arrivals + returns
    # Every move is told as one arrival, but for a destination moved again
    # before it was told (then one arrival stands for both moves).
    assert 0.95 * migrated <= arrivals <= migrated
    # Every departure ended in a move or a return (nothing is isolated now).
    assert departures >= arrivals and departures <= migrated + returns
    # Batched: whole records need a buffer (a round trip) per move; here a
    # buffer carries a compaction batch's departures (how many balloon pages
    # a batch holds is the page layout's doing: some 1.5 in this scenario,
    # as compaction isolates 32 pages of any kind at a time) and arrivals
    # ride along with the next batch's.
    depart_buffers = int(stats["ext_depart_buffers"])
    assert departures > 1.2 * depart_buffers, f"departures not batched: {stats}"
    assert int(stats["ext_buffers"]) < 0.9 * migrated, f"not fewer round trips than moves: {stats}"


def _run(make_vm, daemon, kernel: str, driver: str, name: str) -> tuple[CompactionRun, dict[str, str]]:
    """Boot a guest with ``driver`` ("stock", "extension", "fallback"), run
    the scenario, check the daemon against the driver, power the guest off."""
    ours = driver != "stock"
    # A target left by the previous guest would be inflated at probe, before
    # the scenario starts: every guest starts from an empty balloon.
    daemon.api.set_target("guest", 0)
    vm = make_vm(kernel, memory_mib=512, balloon=VhostUserBalloon(daemon.sockets["guest"]),
                 modules=[build_module(kernel)] if ours else [], name=name)
    if not ours:
        vm.load_module("virtio_balloon")
    else:
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

    # Split migrations tell a move's destination late: once migrations have
    # been quiet for a moment, without being asked ...
    wait_for("every move's destination to be told", lambda: daemon.api.vm("guest")["ballooned_bytes"] == BALLOON, 30)
    # ... and reading the driver's pfns tells whatever is left first.
    pfns = guest_pfns(vm) if ours else set()
    wait_for("pending discards", lambda: daemon.api.vm("guest")["pending_discard_bytes"] == 0, 30)
    state = daemon.api.vm("guest")
    stats = guest_stats(vm) if ours else {}
    assert state["ballooned_bytes"] == BALLOON and state["actual_bytes"] == BALLOON
    assert state["counters"]["guest_errors"] == counters_before["guest_errors"]
    if ours:
        # the driver's own count and /proc/vmstat agree, and every move was told
        assert balloon_migrate(vm) == int(stats["migrated"])
        assert int(stats["migrate_failures"]) == 0
        if driver == "fallback":
            assert int(stats["fallback_pairs"]) == int(stats["migrated"])
        else:
            _check_split_migrations(stats, counters_before, state)
        assert state["counters"]["bad_migration"] == 0
        # exactly the same frames on both sides
        assert daemon.api.pfn_set("guest") == pfns
    vm.close()
    daemon.wait_disconnected("guest", 60)
    return run, stats


@pytest.mark.timeout(3600)
def test_compaction_after_an_idle_inflate_moves_our_pages_at_least_as_often_as_the_stock_drivers(
        make_vm, daemon, kernel):
    migrated: dict[str, list[int]] = {d: [] for d in DRIVERS}
    failed: dict[str, list[int]] = {d: [] for d in DRIVERS}
    for rnd in range(ROUNDS):
        for driver in DRIVERS:
            run, stats = _run(make_vm, daemon, kernel, driver, f"{driver}{rnd}")
            migrated[driver].append(run.migrated)
            failed[driver].append(run.migrate_failed)
            print(f"\n{kernel} round {rnd + 1} {driver}: {run.migrated} balloon pages migrated in "
                  f"{run.compact_seconds:.1f} s (per-CPU free pages {run.percpu_after_fragment} after fragmenting, "
                  f"{run.percpu_at_compaction} at compaction; {run.migrate_failed} migrations failed)" + (f"; driver stats {stats}" if stats else ""))
            if driver != "stock":
                # With the kernel's balloon core (the only page layer from
                # 6.17) the core isolates pages and the driver sees only the
                # migration: isolations are counted by our own layer alone.
                isolated = int(stats["isolations"]) if stats["page_layer"] == "movable-ops" else run.migrated
                assert isolated > 0 and run.migrated > 0, (
                    f"compaction moved none of our pages ({driver}): {stats}")

    median = {d: statistics.median(v) for d, v in migrated.items()}
    failed_median = {d: statistics.median(v) for d, v in failed.items()}
    print(f"\n{kernel} balloon pages migrated per round: {migrated}; medians {median}; "
          f"failed migrations per round: {failed}")
    # the scenario must make compaction move balloon pages at all, or the
    # comparison below proves nothing
    assert median["stock"] > 0, "the stock driver's pages were not migrated: the scenario is broken"
    for driver in ("extension", "fallback"):
        assert median[driver] >= SAME_AS_STOCK * median["stock"], (
            f"{driver}: median {median[driver]} of our balloon pages migrated, stock driver {median['stock']} "
            f"(rounds: {migrated})")
        # The count above is bounded by the holes compaction can fill, not by
        # the balloon pages it finds (32768 of them against some 5000 holes):
        # a driver that refused to move half its pages still filled them all.
        # Such a driver shows in the kernel's failed migrations instead.
        assert failed_median[driver] <= failed_median["stock"] + FAILED_SLACK, (
            f"{driver}: median {failed_median[driver]} failed migrations, stock driver {failed_median['stock']} "
            f"(rounds: {failed})")
