"""The stats queue: the primed buffer, the device handing it back every
interval (0.2 s here), refilled values in the API, and the buffer the device
holds surviving a stop/cont."""

from __future__ import annotations

import time

from protocol.balloon import Feature, QueueRole, StatTag
from tests.daemon.harness import assert_no_guest_errors
from tests.daemon.conftest import ENGINES

#: Device behaviour: the same tests on both vhost-user engines.
DAEMON_ENGINES = ENGINES


def stats_state(daemon, vm="vm0"):
    state = daemon.api.vm(vm)
    return state["stats"], state["stats_updated_at"]


def test_primed_buffer_is_read_at_start(daemon, connect):
    fe = connect(start=False)
    fe.probe()
    fe.prime_stats({StatTag.FREE_MEMORY: 123 << 20, StatTag.TOTAL_MEMORY: 64 << 20, StatTag.OOM_KILLS: 2})
    fe.start()
    state = daemon.wait_vm("vm0", lambda s: s["stats_updated_at"] is not None, what="the primed stats")
    assert state["stats"]["free_memory"] == 123 << 20
    assert state["stats"]["total_memory"] == 64 << 20
    assert state["stats"]["oom_kills"] == 2
    assert set(state["stats"]) == {t.key for t in StatTag}  # every tag Linux sends
    assert state["counters"]["stats_buffers"] == 1


def test_device_requests_stats_every_interval(daemon, connect):
    fe = connect(start=False)
    fe.probe()
    fe.prime_stats({StatTag.FREE_MEMORY: 1})
    fe.start()
    seen = []
    t0 = time.monotonic()
    for i in range(2, 7):
        assert fe.serve_stats({StatTag.FREE_MEMORY: i}, timeout=3), f"no stats request #{i}"
        state = daemon.wait_vm("vm0", lambda s, i=i: s["stats"].get("free_memory") == i, what=f"stats value {i}")
        seen.append(state["stats_updated_at"])
    elapsed = time.monotonic() - t0
    assert seen == sorted(seen) and len(set(seen)) == len(seen), "stats_updated_at must advance"
    assert elapsed >= 4 * 0.2 * 0.9, f"5 requests in {elapsed:.2f}s: faster than the 0.2 s interval"
    assert elapsed < 5 * 0.2 + 3, f"5 requests took {elapsed:.2f}s"


def test_held_stats_buffer_survives_stop_cont(daemon, connect):
    fe = connect(start=False)
    fe.probe()
    fe.prime_stats({StatTag.FREE_MEMORY: 10})
    fe.start()
    daemon.wait_vm("vm0", lambda s: s["stats"].get("free_memory") == 10)
    q = fe.queue(QueueRole.STATS)
    # The device holds the buffer (it asks for stats by returning it later);
    # stop now: the buffer must be reported as not consumed.
    bases = fe.stop()
    if not fe.stats_requested():  # still held by the device (the usual case)
        assert bases[fe.queue_index(QueueRole.STATS)] == (q.avail_idx - 1) & 0xFFFF
    else:  # it came back just before the stop
        assert bases[fe.queue_index(QueueRole.STATS)] == q.avail_idx
        fe.answer_stats({StatTag.FREE_MEMORY: 10})
    fe.start()
    # Stats keep flowing after the restart.
    for value in (20, 30):
        assert fe.serve_stats({StatTag.FREE_MEMORY: value}, timeout=3)
        daemon.wait_vm("vm0", lambda s, v=value: s["stats"].get("free_memory") == v)
    for _ in range(3):  # and across several quick stop/conts in a row
        fe.restart()
    assert fe.serve_stats({StatTag.FREE_MEMORY: 40}, timeout=3)
    daemon.wait_vm("vm0", lambda s: s["stats"].get("free_memory") == 40)
    assert_no_guest_errors(daemon)


def test_stop_while_the_driver_refills(daemon, connect):
    """Stop after the device returned the buffer and before the driver
    refilled it: nothing is held, the base is the avail index."""
    fe = connect(start=False)
    fe.probe()
    fe.prime_stats({StatTag.FREE_MEMORY: 1})
    fe.start()
    assert fe.stats_requested(timeout=3)
    q = fe.queue(QueueRole.STATS)
    bases = fe.stop()
    assert bases[fe.queue_index(QueueRole.STATS)] == q.avail_idx
    fe.answer_stats({StatTag.FREE_MEMORY: 77})  # added while stopped: no kick
    fe.start()
    daemon.wait_vm("vm0", lambda s: s["stats"].get("free_memory") == 77)
    assert fe.serve_stats({StatTag.FREE_MEMORY: 78}, timeout=3)
    daemon.wait_vm("vm0", lambda s: s["stats"].get("free_memory") == 78)


def test_no_stats_queue_without_the_feature(daemon, connect):
    fe = connect(start=False)
    fe.start(fe.choose_features(drop=[Feature.STATS_VQ]))
    assert QueueRole.STATS not in fe.roles
    time.sleep(0.5)
    state = daemon.api.vm("vm0")
    assert state["stats"] == {} and state["stats_updated_at"] is None
    assert "STATS_VQ" not in state["features"]


def test_bad_stats_buffer_is_counted_and_stats_recover(daemon, connect):
    fe = connect(start=False)
    fe.probe()
    q = fe.queue(QueueRole.STATS)
    gpa = fe.aux_gpa(QueueRole.STATS)
    fe.ram.write(gpa, b"\x04\x00" + b"\x01" * 13)  # 15 bytes: a partial entry
    q.put_avail(q.add([(gpa, 15, False)], "stats"))
    fe._stats_head = None
    fe.start()
    daemon.wait_vm("vm0", lambda s: s["counters"]["guest_errors"] >= 1, what="the bad stats buffer")
    assert daemon.api.vm("vm0")["stats_updated_at"] is None
    # The device still hands the buffer back, and a good one works.
    assert fe.stats_requested(timeout=3)
    fe.answer_stats({StatTag.FREE_MEMORY: 5})
    daemon.wait_vm("vm0", lambda s: s["stats"].get("free_memory") == 5)
