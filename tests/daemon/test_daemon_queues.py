"""Free page reporting, page poisoning, the migrate extension and which queue
index serves which role for a given feature set."""

from __future__ import annotations

import pytest

from protocol.balloon import Feature, QueueRole, StatTag
from tests.frontend import PAGE_SIZE
from tests.daemon.discards import wait_past_deferral
from tests.daemon.harness import assert_no_guest_errors
from tests.daemon.conftest import ENGINES

#: Device behaviour: the same tests on both vhost-user engines.
DAEMON_ENGINES = ENGINES

PAGE = PAGE_SIZE
MIB = 1 << 20


# ------------------------------------------------------- free page reporting


def test_free_page_reporting_frees_memory(daemon, connect):
    fe = connect()
    first = fe.first_free_pfn
    pages = range(first, first + 1024)  # 4 MiB
    fe.ram.fill(pages, seed=9)
    before = fe.ram.allocated_bytes()
    used = fe.report_free([(first << 12, 2 * MIB)])
    assert used.length == 0 or used.length <= 2 * MIB
    after = fe.ram.allocated_bytes()
    assert before - after == 2 * MIB
    assert fe.ram.nonzero(pages[:512]) == []
    assert fe.ram.damaged(pages[512:], seed=9) == []
    state = daemon.api.vm("vm0")
    assert state["reported_freed_bytes"] == 2 * MIB
    assert state["counters"]["report_buffers"] == 1
    assert state["counters"]["reported_bytes"] == 2 * MIB
    # Reported pages are not ballooned.
    assert state["ballooned_bytes"] == 0 and state["host_freed_bytes"] == 0


@pytest.mark.parametrize("indirect", [True, False], ids=["indirect", "direct"])
def test_reporting_32_ranges_in_one_request(daemon, connect, indirect):
    fe = connect(start=False)
    fe.start(fe.choose_features(drop=[] if indirect else [Feature.RING_INDIRECT_DESC]))
    first = fe.first_free_pfn
    ranges = [((first + 32 * i) << 12, 16 * PAGE) for i in range(32)]  # every other 64 KiB
    keep = [first + 32 * i + 16 + k for i in range(32) for k in range(16)]
    fe.ram.fill(range(first, first + 32 * 32), seed=4)
    before = fe.ram.allocated_bytes()
    fe.report_free(ranges)
    assert before - fe.ram.allocated_bytes() == 32 * 16 * PAGE
    assert fe.ram.damaged(keep, seed=4) == []
    assert daemon.api.vm("vm0")["counters"]["report_buffers"] == 1


def test_unaligned_report_discards_only_whole_pages(daemon, connect):
    fe = connect()
    first = fe.first_free_pfn
    fe.ram.fill(range(first, first + 8), seed=1)
    before = fe.ram.allocated_bytes()
    fe.report_free([((first << 12) + 100, 3 * PAGE)])  # covers page 1 and 2 whole only
    assert before - fe.ram.allocated_bytes() == 2 * PAGE
    assert fe.ram.damaged([first, first + 3, first + 4], seed=1) == []
    assert fe.ram.nonzero([first + 1, first + 2]) == []


def test_poisoned_free_pages_are_not_discarded(daemon, connect, settled):
    fe = connect(start=False)
    features = fe.choose_features() | (1 << Feature.PAGE_POISON)
    fe.probe(features)
    fe.set_poison(0xAAAAAAAA)  # Linux writes poison_val at probe
    fe.start()
    assert "PAGE_POISON" in daemon.api.vm("vm0")["features"]
    first = fe.first_free_pfn
    pages = range(first, first + 512)
    fe.ram.fill(pages, seed=2)
    before = fe.ram.allocated_bytes()
    fe.report_free([(first << 12, 2 * MIB)])
    assert fe.ram.allocated_bytes() == before
    assert fe.ram.damaged(pages, seed=2) == []
    state = daemon.api.vm("vm0")
    assert state["reported_freed_bytes"] == 0
    assert state["counters"]["reports_skipped_poison"] >= 1
    # Ballooning is unaffected by poisoning.
    fe.inflate(pages[:10])
    settled()
    assert fe.ram.nonzero(pages[:10]) == []
    assert fe.ram.damaged(pages[10:], seed=2) == []


def test_zero_poison_value_allows_discarding(daemon, connect):
    fe = connect(start=False)
    fe.probe(fe.choose_features() | (1 << Feature.PAGE_POISON))
    fe.set_poison(0)
    fe.start()
    first = fe.first_free_pfn
    fe.ram.touch(range(first, first + 512))
    before = fe.ram.allocated_bytes()
    fe.report_free([(first << 12, 2 * MIB)])
    assert before - fe.ram.allocated_bytes() == 2 * MIB


def test_poison_without_the_feature_is_ignored(daemon, connect):
    """A poison value written when PAGE_POISON was not negotiated means nothing."""
    fe = connect()
    fe.set_poison(0x55555555)
    first = fe.first_free_pfn
    fe.ram.touch(range(first, first + 512))
    before = fe.ram.allocated_bytes()
    fe.report_free([(first << 12, 2 * MIB)])
    assert before - fe.ram.allocated_bytes() == 2 * MIB


# ----------------------------------------------------------------- migration


def test_migrate_extension_moves_membership(daemon, connect, settled):
    fe = connect()
    first = fe.first_free_pfn
    old = list(range(first, first + 300))
    new = list(range(first + 1000, first + 1300))
    fe.ram.touch(old)
    fe.inflate(old)
    settled()  # the old frames' memory is gone before `before` is measured
    fe.ram.fill(new, seed=6)  # the guest copied nothing: new pages hold old data
    before = fe.ram.allocated_bytes()
    assert fe.migrate(list(zip(old[:260], new[:260]))) == 2  # 256 records per buffer
    state = settled()
    assert state["migrations"] == 260
    assert state["ballooned_bytes"] == 300 * PAGE
    assert daemon.api.pfn_set("vm0") == set(old[260:]) | set(new[:260])
    assert before - fe.ram.allocated_bytes() == 260 * PAGE
    assert fe.ram.nonzero(new[:260]) == []
    assert fe.ram.damaged(new[260:], seed=6) == []
    assert state["counters"]["migrate_buffers"] == 2
    # The old pages belong to the guest again.
    fe.ram.fill(old[:260], seed=8)
    fe.inflate(range(first + 2000, first + 2100))
    wait_past_deferral()
    assert fe.ram.damaged(old[:260], seed=8) == []
    # And the moved balloon deflates normally.
    fe.deflate(new[:260] + old[260:])
    assert daemon.api.vm("vm0")["ballooned_bytes"] == 100 * PAGE


def test_bad_migrations_are_refused(daemon, connect):
    fe = connect()
    first = fe.first_free_pfn
    ballooned = [first, first + 1, first + 2]
    free = [first + 10, first + 11]
    fe.ram.touch(ballooned)
    fe.inflate(ballooned)
    fe.ram.fill(free, seed=1)
    fe.migrate(
        [
            (free[0], free[1]),  # old not ballooned
            (ballooned[0], ballooned[1]),  # new already ballooned
            (ballooned[0], 0xB0),  # new in the VGA hole
            (ballooned[0], 1 << 40),  # new far outside RAM
            (1 << 40, free[0]),  # old outside RAM
        ]
    )
    state = daemon.api.vm("vm0")
    assert state["counters"]["bad_migration"] == 5
    assert state["migrations"] == 0
    assert daemon.api.pfn_set("vm0") == set(ballooned)
    wait_past_deferral()
    assert fe.ram.damaged(free, seed=1) == []


def test_stock_driver_migration_is_counted(daemon, connect):
    """Without the extension Linux reports a migration as a 1-page inflate of
    the new page then a 1-page deflate of the old one."""
    fe = connect(start=False)
    fe.start(fe.choose_features(drop=[Feature.BALLOOND_MIGRATE_VQ]))
    assert QueueRole.MIGRATE not in fe.roles
    first = fe.first_free_pfn
    fe.ram.touch(range(first, first + 20))
    fe.inflate(range(first, first + 10))
    fe.ram.fill([first + 15], seed=3)
    for i in range(3):
        fe.migrate_stock(first + i, first + 10 + i)
    state = daemon.api.vm("vm0")
    assert state["migrations"] == 3
    assert daemon.api.pfn_set("vm0") == set(range(first + 3, first + 13))
    fe.ram.fill(range(first, first + 3), seed=4)  # the old pages, the guest's again
    wait_past_deferral()
    assert fe.ram.damaged([first + 15], seed=3) == []
    assert fe.ram.damaged(range(first, first + 3), seed=4) == []


# ---------------------------------------------------------------- queue roles

ROLE_CASES = {
    "all": ([], ["inflate", "deflate", "stats", "reporting", "migrate"]),
    "no-stats": ([Feature.STATS_VQ], ["inflate", "deflate", "reporting", "migrate"]),
    "no-stats-no-reporting": ([Feature.STATS_VQ, Feature.REPORTING], ["inflate", "deflate", "migrate"]),
    "no-migrate": ([Feature.BALLOOND_MIGRATE_VQ], ["inflate", "deflate", "stats", "reporting"]),
    "no-reporting": ([Feature.REPORTING], ["inflate", "deflate", "stats", "migrate"]),
    "minimal": ([Feature.STATS_VQ, Feature.REPORTING, Feature.BALLOOND_MIGRATE_VQ], ["inflate", "deflate"]),
}


@pytest.mark.parametrize("case", list(ROLE_CASES))
def test_queue_roles_follow_the_features(daemon, connect, settled, case):
    drop, expected = ROLE_CASES[case]
    fe = connect(start=False)
    fe.probe(fe.choose_features(drop=drop))
    assert [r.value for r in fe.roles] == expected  # hard-coded: the driver's numbering
    if "stats" in expected:
        fe.prime_stats({StatTag.FREE_MEMORY: 99})
    fe.start()
    first = fe.first_free_pfn
    fe.ram.touch(range(first, first + 2048))
    before = fe.ram.allocated_bytes()
    fe.inflate(range(first, first + 8))
    settled()  # discarded before the deflate: else it would cancel one (see test_daemon_balloon)
    fe.deflate([first])
    freed = 8
    if "reporting" in expected:
        fe.report_free([((first + 512) << 12, 2 * MIB)])
        freed += 512
    if "migrate" in expected:
        fe.migrate([(first + 1, first + 100)])
        freed += 1
    state = settled()
    assert before - fe.ram.allocated_bytes() == freed * PAGE
    c = state["counters"]
    assert (c["inflate_buffers"], c["deflate_buffers"]) == (1, 1)
    assert c["report_buffers"] == (1 if "reporting" in expected else 0)
    assert c["migrate_buffers"] == (1 if "migrate" in expected else 0)
    assert_no_guest_errors(daemon)
    if "stats" in expected:
        state = daemon.wait_vm("vm0", lambda s: s["stats"].get("free_memory") == 99)
        assert state["counters"]["stats_buffers"] == 1
    else:
        assert state["stats"] == {}
