"""Polling across rings: after a kick the daemon watches the inflate and
deflate rings together, so the second half of a stock driver's page
migration (the deflate that follows an inflate, each waited for) is found by
polling and needs no kick; when the window ends, kicks are asked for again on
both rings.

The daemon polls for 100 ms here (--poll-us 100000), far longer than the
test frontend takes between a buffer coming back and the next one, so what
is pinned is behaviour (kicks the driver had to send), not timing. Both
engines poll, with the same window and loop.
"""

from __future__ import annotations

import time

import pytest

from protocol.balloon import Feature, QueueRole
from tests.daemon.conftest import ENGINES, LOST_KICK_EVENT
from tests.daemon.harness import assert_no_guest_errors, worker

POLL_SECONDS = 0.1

DAEMON_ENGINES = ENGINES


@pytest.fixture(scope="module")
def daemon_options():
    return {"extra_args": ["--poll-us", str(int(POLL_SECONDS * 1e6))]}


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-notify-flag"])
def test_stock_migrations_are_served_by_polling_without_kicks(daemon, connect, event_idx):
    fe = connect(start=False)
    fe.start(fe.choose_features(drop=[] if event_idx else [Feature.RING_EVENT_IDX]))
    first = fe.first_free_pfn
    inflate, deflate = fe.queue(QueueRole.INFLATE), fe.queue(QueueRole.DEFLATE)
    fe.inflate(range(first, first + 20))  # kicked: the ring was asleep
    kicks_before = inflate.kicks + deflate.kicks
    for i in range(10):
        # Linux's balloon_page_migrate: inflate the new page, wait, deflate the old one, wait.
        fe.migrate_stock(first + i, first + 20 + i)
    assert inflate.kicks + deflate.kicks == kicks_before, (
        f"{inflate.kicks + deflate.kicks - kicks_before} kicks for 10 migrations: "
        "the ring not kicked was not polled")
    state = daemon.api.vm("vm0")
    assert state["migrations"] == 10
    assert daemon.api.pfn_set("vm0") == set(range(first + 10, first + 30))
    assert_no_guest_errors(daemon, "vm0")


def test_kicks_are_asked_for_again_on_every_polled_ring(daemon, connect):
    fe = connect()
    first = fe.first_free_pfn
    inflate, deflate = fe.queue(QueueRole.INFLATE), fe.queue(QueueRole.DEFLATE)
    fe.inflate(range(first, first + 4))
    time.sleep(POLL_SECONDS * 5)  # the window is over: both rings sleep
    kicks = deflate.kicks
    fe.deflate([first])  # the strict frontend fails this if the kick was not asked for
    assert deflate.kicks == kicks + 1
    time.sleep(POLL_SECONDS * 5)
    kicks = inflate.kicks
    fe.inflate([first])
    assert inflate.kicks == kicks + 1
    assert daemon.api.pfn_set("vm0") == set(range(first, first + 4))


def test_stats_ring_is_not_polled_with_the_balloon_rings(daemon, connect):
    """Stats answers come on their own schedule: a kick on the inflate ring
    does not turn the stats ring's kicks off."""
    fe = connect()
    stats = fe.queue(QueueRole.STATS)
    fe.prime_stats()
    assert fe.stats_requested(timeout=5)
    fe.inflate([fe.first_free_pfn])
    kicks = stats.kicks
    fe.answer_stats()
    assert stats.kicks == kicks + 1


def test_a_request_that_comes_with_a_kick_leaves_the_daemon_serving(daemon, connect):
    """A kick and a request that wake the daemon together: the kick's poll
    reads and serves the request too, and the event loop's own callback
    for the socket, run after it in the same pass, finds nothing to read.
    It must not wait for a message there (libvhost-user's socket is
    blocking): the daemon would hear nothing more until the frontend's next
    request, and a guest waiting for its buffer sends none. The kick comes
    first (the order that leaves the socket's callback stale); each round
    then checks that a buffer with a kick alone is still served."""
    fe = connect()
    first = fe.first_free_pfn
    inflate = fe.queue(QueueRole.INFLATE)
    pid = worker(daemon, "vm0")["pid"]
    plain_kick = inflate.kick

    def kick_then_request(force: bool = False) -> bool:
        kicked = plain_kick(force)
        fe.set_actual(0)  # QEMU's config write: read by the kick's poll, acknowledged
        return kicked

    for i in range(10):
        time.sleep(POLL_SECONDS * 2)  # the window is over: the kick wakes the daemon
        inflate.kick = kick_then_request  # type: ignore[method-assign]
        try:
            fe.inflate([first + 2 * i], timeout=5)
        finally:
            inflate.kick = plain_kick  # type: ignore[method-assign]
        time.sleep(POLL_SECONDS * 2)
        fe.inflate([first + 2 * i + 1], timeout=3)  # a kick alone
    assert daemon.api.pfn_set("vm0") == set(range(first, first + 20))
    assert worker(daemon, "vm0")["pid"] == pid and worker(daemon, "vm0")["restarts"] == 0
    assert_no_guest_errors(daemon, "vm0")


@pytest.mark.lost_kick_expected
def test_a_buffer_left_waiting_without_a_kick_is_served_and_counted(daemon, connect):
    """The daemon sleeps with kicks asked for, and the driver's buffer comes
    with no kick (lost somewhere on its way): the periodic look finds it
    waiting twice in a row, serves it, counts it and says so, where
    without the look the guest would wait for ever. A buffer kicked as it
    should be is never counted."""
    fe = connect()
    first = fe.first_free_pfn
    q = fe.queue(QueueRole.INFLATE)
    fe.inflate([first])  # kicked
    since = daemon.log_size()
    time.sleep(POLL_SECONDS * 5)  # the window is over: the ring sleeps, kicks asked for
    assert daemon.api.vm("vm0")["counters"]["lost_kicks"] == 0
    used = q.read_used_idx()
    slot = fe._pfn_slot_gpas(QueueRole.INFLATE)[0]
    fe.ram.write(slot, (first + 1).to_bytes(4, "little"))
    q.put_avail(q.add([(slot, 4, False)], slot))  # and no kick
    start = time.monotonic()
    daemon.wait_for(lambda: q.read_used_idx() != used, 5.0, "the buffer left without a kick to be served")
    took = time.monotonic() - start
    assert 0.9 <= took <= 3.0, f"served {took:.2f} s after it was made available"  # two looks, 1 s apart
    q.get_used()
    state = daemon.api.vm("vm0")
    assert state["counters"]["lost_kicks"] == 1
    assert daemon.api.pfn_set("vm0") == {first, first + 1}
    assert any(r.get("event") == LOST_KICK_EVENT and r.get("queue") == 0
               for r in daemon.log_records(since))
    fe.inflate([first + 2])  # kicked again as asked: served at once, not counted
    assert daemon.api.vm("vm0")["counters"]["lost_kicks"] == 1
