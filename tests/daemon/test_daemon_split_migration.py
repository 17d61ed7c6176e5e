"""Split migrations through a real socket: a driver that negotiated
BALLOOND_F_MIGRATE_SPLIT tells the daemon of departing pages in one buffer and
of their replacements later (protocol/balloond_ext.h).

What must hold above all: once a departure's buffer is returned the guest
frees the page and reuses it, so no discard of that frame may still be
pending (in the deferred discard mode the inflate's discard is still waiting
when the departure comes). Each test runs in both discard modes.
"""

from __future__ import annotations

from protocol.balloon import Feature
from protocol.extension import PFN_NONE, PFN_RETURN
from tests.daemon.discards import wait_past_deferral
from tests.daemon.harness import crash_and_restart, reconnect
from tests.frontend import DRIVER_FEATURES, PAGE_SIZE, GuestRam, TestFrontend

PAGE = PAGE_SIZE
SPLIT = DRIVER_FEATURES | (1 << Feature.BALLOOND_MIGRATE_SPLIT)


def start_split(connect):
    fe = connect(start=False)
    fe.start(fe.choose_features(SPLIT))
    assert fe.has_feature(Feature.BALLOOND_MIGRATE_SPLIT)
    return fe


def test_the_device_offers_split_migrations(daemon, connect):
    fe = connect(start=False)
    assert fe.device_features & (1 << Feature.BALLOOND_MIGRATE_SPLIT)
    assert fe.device_features & (1 << Feature.BALLOOND_MIGRATE_VQ)


def test_departures_cancel_pending_discards_and_arrivals_are_discarded(daemon, connect):
    fe = start_split(connect)
    first = fe.first_free_pfn
    old = list(range(first, first + 64))
    new = list(range(first + 1000, first + 1064))
    fe.ram.touch(old)
    fe.ram.fill(new, seed=4)
    fe.inflate(old)
    # At once, while (deferred mode) the inflate's discards still wait: 40
    # pages depart in one buffer, as a compaction batch isolated them.
    assert fe.migrate([(p, PFN_NONE) for p in old[:40]]) == 1
    # The buffer is back: the migrated pages are free and the guest reuses them.
    fe.ram.fill(old[:30], seed=3)
    # Later, in one buffer: 30 pages arrive (the moves' destinations), and
    # the 10 whose migration failed come back.
    assert fe.migrate([(PFN_NONE, p) for p in new[:30]] + [(PFN_RETURN, p) for p in old[30:40]]) == 1
    state = daemon.api.vm("vm0")
    assert state["migrations"] == 30
    assert state["counters"]["departures"] == 40 and state["counters"]["returns"] == 10
    assert state["counters"]["bad_migration"] == 0 and state["counters"]["guest_errors"] == 0
    assert state["ballooned_bytes"] == 64 * PAGE
    assert daemon.api.pfn_set("vm0") == set(old[30:]) | set(new[:30])
    wait_past_deferral()
    assert fe.ram.damaged(old[:30], seed=3) == []  # never discarded under the guest
    assert fe.ram.nonzero(new[:30]) == []  # the arrivals' memory is released
    assert fe.ram.damaged(new[30:], seed=4) == []  # and nothing else
    # the moved balloon deflates normally
    fe.deflate(old[30:] + new[:30])
    assert daemon.api.vm("vm0")["ballooned_bytes"] == 0


def test_a_frame_that_arrives_and_departs_in_one_batch_is_not_discarded(daemon, connect):
    """Arrival then departure of the same frame within one pass of the queue
    (two buffers the daemon reads together): the frame is the guest's again."""
    fe = start_split(connect)
    first = fe.first_free_pfn
    a, b = first, first + 500
    fe.ram.touch([a])
    fe.inflate([a])
    fe.ram.fill([b], seed=7)
    fe.migrate([(a, PFN_NONE), (PFN_NONE, b), (b, PFN_NONE)])
    fe.ram.fill([a], seed=8)
    wait_past_deferral()
    assert fe.ram.damaged([b], seed=7) == [] and fe.ram.damaged([a], seed=8) == []
    assert daemon.api.pfn_set("vm0") == set()


def test_hostile_split_records_are_refused(daemon, connect):
    fe = start_split(connect)
    first = fe.first_free_pfn
    ballooned = [first, first + 1, first + 2]
    free = [first + 10, first + 11]
    fe.ram.touch(ballooned)
    fe.inflate(ballooned)
    fe.ram.fill(free, seed=1)
    fe.migrate([
        (free[0], PFN_NONE),  # departure of a frame not ballooned
        (PFN_NONE, 0xB0),  # arrival in the VGA hole
        (PFN_NONE, 1 << 40),  # arrival far outside RAM
        (PFN_NONE, ballooned[1]),  # arrival of a frame already ballooned
        (PFN_RETURN, ballooned[2]),  # return of one too
        (PFN_NONE, PFN_NONE),  # no frame at all
        (PFN_RETURN, PFN_NONE),
        (ballooned[0], PFN_RETURN),
        (ballooned[0], PFN_NONE),  # a good departure ...
        (ballooned[0], PFN_NONE),  # ... sent twice
        (1 << 40, PFN_NONE),  # departure outside RAM
    ])
    state = daemon.api.vm("vm0")
    assert state["counters"]["bad_migration"] == 10
    assert state["counters"]["departures"] == 1 and state["migrations"] == 0
    assert daemon.api.pfn_set("vm0") == set(ballooned[1:])
    wait_past_deferral()
    assert fe.ram.damaged(free, seed=1) == []


def test_split_records_from_a_driver_that_did_not_negotiate_them_are_refused(daemon, connect):
    fe = connect()  # the extension, not split migrations (an older driver)
    assert not fe.has_feature(Feature.BALLOOND_MIGRATE_SPLIT)
    first = fe.first_free_pfn
    fe.ram.touch([first])
    fe.inflate([first])
    fe.ram.fill([first + 20], seed=2)
    fe.migrate([(first, PFN_NONE), (PFN_NONE, first + 20), (PFN_RETURN, first + 20)])
    state = daemon.api.vm("vm0")
    assert state["counters"]["bad_migration"] == 3 and state["counters"]["departures"] == 0
    assert daemon.api.pfn_set("vm0") == {first}
    # whole records still work for it
    fe.migrate([(first, first + 20)])
    assert daemon.api.pfn_set("vm0") == {first + 20} and daemon.api.vm("vm0")["migrations"] == 1


# ------------------------------------------------------------ daemon restart


def test_a_restarted_daemon_restores_split_migrations_and_discards_no_departed_frame(stateful):
    """The journal follows departures, arrivals and returns: a daemon killed
    after them restores exactly the balloon the guest has, so it discards
    again the frames that arrived and none that departed (the guest uses
    those)."""
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(stateful.sockets["vm0"], ram=ram, connect=False)
        fe.connect()
        features = fe.choose_features(SPLIT)
        fe.start(features)
        first = fe.first_free_pfn
        old = list(range(first, first + 64))
        new = list(range(first + 1000, first + 1040))
        ram.touch(old)
        fe.inflate(old)
        fe.migrate([(p, PFN_NONE) for p in old[:50]])
        ram.fill(old[:40], seed=5)  # migrated away: the guest uses them
        fe.migrate([(PFN_NONE, p) for p in new] + [(PFN_RETURN, p) for p in old[40:50]])
        expect = set(old[40:]) | set(new)
        assert stateful.api.pfn_set("vm0") == expect

        crash_and_restart(stateful)
        ram.touch(new)  # as if the arrivals' discards were lost with the daemon
        reconnect(fe, features)
        state = stateful.wait_vm("vm0", lambda s: s["ballooned_bytes"] == len(expect) * PAGE)
        assert stateful.api.pfn_set("vm0") == expect
        assert state["counters"]["driver_resets"] == 0
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0)
        wait_past_deferral()
        assert ram.nonzero(new) == [], "restored arrivals were not discarded again"
        assert ram.damaged(old[:40], seed=5) == [], "a departed frame was discarded after the restart"
        fe.close()
    finally:
        ram.close()
