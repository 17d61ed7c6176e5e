"""Split migrations (departure, arrival, return) in the tracker and the journal.

The daemon-level behaviour (discards cancelled by a departure before its
buffer is returned, hostile records) is in tests/daemon/test_daemon_split_migration.py.
"""

from __future__ import annotations

from balloond.device.journal import MIGRATE, NO_FRAME, RECORD, SPLIT_MIGRATE, BalloonJournal, GuestIdentity
from balloond.device.tracker import PfnTracker

def record_kinds(directory) -> list[int]:
    kinds = []
    for log in sorted(p for p in directory.iterdir() if ".log." in p.name):
        data, pos = log.read_bytes(), 0
        while pos < len(data):
            kind, length, _ = RECORD.unpack_from(data, pos)
            kinds.append(kind)
            pos += RECORD.size + length
    return kinds


ID = GuestIdentity(4242, 777, "boot-a", 0x1234, ((0, 1 << 30, 42, 4242, 0),))


def test_tracker_departure_and_arrival():
    t = PfnTracker([(0, 1000)])
    t.inflate([1, 2, 3])
    assert t.depart(1) and 1 not in t and len(t) == 2
    assert t.arrive(500, moved=True) and 500 in t and len(t) == 3
    assert t.depart(2) and t.arrive(2, moved=False)  # put back after a failed move
    assert t.counters.migrations == 1 and t.counters.departures == 2 and t.counters.returns == 1
    assert sorted(t) == [2, 3, 500]


def test_tracker_refuses_what_does_not_fit():
    t = PfnTracker([(0, 1000)])
    t.inflate([1, 2])
    assert not t.depart(7)  # not ballooned
    assert not t.depart(5000)  # outside RAM
    assert not t.arrive(2, moved=True)  # already ballooned
    assert not t.arrive(5000, moved=True)  # outside RAM
    assert not t.arrive((1 << 64) - 1, moved=False)  # the marker itself
    assert t.depart(1) and not t.depart(1)  # twice
    assert t.counters.bad_migration == 6
    assert sorted(t) == [2] and len(t) == 1
    assert t.counters.migrations == 0 and t.counters.departures == 1


def test_journal_replays_split_batches(tmp_path):
    j = BalloonJournal(str(tmp_path), "vm")
    assert j.adopt(ID, {"inflate": 0, "deflate": 0}).frames == []
    j.inflated([10, 11, 12], 1)
    j.migrated([(10, NO_FRAME), (11, NO_FRAME)], 1)  # departures
    j.migrated([(NO_FRAME, 900), (NO_FRAME, 11), (12, 901)], 2)  # arrival, return, whole move
    assert sorted(j.state.frames) == [11, 900, 901]
    j.close()
    assert record_kinds(tmp_path).count(SPLIT_MIGRATE) == 2
    j2 = BalloonJournal(str(tmp_path), "vm")
    got = j2.adopt(ID, {"inflate": 1, "deflate": 0, "migrate": 2})
    assert got.frames == [11, 900, 901] and got.dropped is None


def test_whole_moves_keep_the_old_record_kind(tmp_path):
    """A daemon that predates split records still reads a journal without them."""
    j = BalloonJournal(str(tmp_path), "vm")
    j.adopt(ID, {"inflate": 0, "deflate": 0})
    j.inflated([10], 1)
    j.migrated([(10, 20)], 1)
    j.close()
    kinds = record_kinds(tmp_path)
    assert MIGRATE in kinds and SPLIT_MIGRATE not in kinds
