"""BalloonJournal: the balloon on disk survives a killed daemon, stays bounded,
and never hands back frames it cannot vouch for: torn or corrupt records stop
the replay, failed writes turn persistence off, another driver drops it."""

from __future__ import annotations

import errno
import os
import random

import pytest

from balloond.device import journal as journal_mod
from balloond.device.journal import BalloonJournal, FrameSet, GuestIdentity, JournalError

ID = GuestIdentity(4242, 777, "boot-a", 0x1234, ((0, 1 << 30, 42, 4242, 0),))
RINGS = {"inflate": 0, "deflate": 0}


def reopen(tmp_path, **kw):
    return BalloonJournal(str(tmp_path), "vm", **kw)


def fresh(tmp_path, **kw) -> BalloonJournal:
    j = reopen(tmp_path, **kw)
    assert j.adopt(ID, RINGS).frames == []
    return j


def test_changes_survive_a_reopen(tmp_path):
    j = fresh(tmp_path)
    j.inflated([10, 11, 12, 500], 1)
    j.deflated([11], 1)
    j.migrated([(12, 900)], 1)
    j.target(4096)
    j.poison(0xAA)
    j.close()  # as if killed: nothing else was written
    j2 = reopen(tmp_path)
    assert j2.state.target_pages == 4096
    got = j2.adopt(ID, {"inflate": 1, "deflate": 1, "migrate": 1})
    assert got.frames == [10, 500, 900] and got.poison == 0xAA and got.dropped is None


@pytest.mark.parametrize(
    "other, rings, why",
    [
        (GuestIdentity(4243, 777, "boot-a", 0x1234, ID.layout), {"inflate": 2, "deflate": 0}, "another QEMU"),
        (GuestIdentity(4242, 778, "boot-a", 0x1234, ID.layout), {"inflate": 2, "deflate": 0}, "another QEMU"),
        (GuestIdentity(4242, 777, "boot-b", 0x1234, ID.layout), {"inflate": 2, "deflate": 0}, "another QEMU"),
        (GuestIdentity(4242, 777, "boot-a", 0x1234, ((0, 1 << 30, 42, 1, 0),)), {"inflate": 2, "deflate": 0}, "RAM"),
        (GuestIdentity(4242, 777, "boot-a", 0x1235, ID.layout), {"inflate": 2, "deflate": 0}, "features"),
        (ID, {"inflate": 0, "deflate": 0}, "inflate ring is at 0"),  # a reset driver
        (ID, {"inflate": 2, "deflate": 5}, "deflate ring"),
        (None, {"inflate": 2, "deflate": 0}, "unknown"),
    ],
)
def test_anything_but_the_same_driver_drops_the_journal(tmp_path, other, rings, why):
    j = fresh(tmp_path)
    j.inflated([1, 2, 3], 1)
    j.inflated([4], 2)
    j.poison(0xAA)
    j.close()
    got = reopen(tmp_path).adopt(other, rings)
    assert got.frames == [] and got.poison is None
    assert why in got.dropped
    # and the drop is on disk: the old driver's frames never come back
    assert reopen(tmp_path).adopt(ID, {"inflate": 2, "deflate": 0}).frames == []


def test_the_last_batch_may_come_again(tmp_path):
    """Killed after the record, before the buffer went back: the ring resumes
    before that batch, which the driver submits again."""
    j = fresh(tmp_path)
    j.inflated([1, 2], 1)
    j.inflated([3], 2)
    j.close()
    j = reopen(tmp_path)
    assert j.adopt(ID, {"inflate": 1, "deflate": 0}).frames == [1, 2, 3]
    j.inflated([], 2)  # the batch came again: nothing new, the ring moved on
    j.deflated([1], 1)
    j.close()
    # only the very last batch's ring may lag: the inflate ring may not
    assert reopen(tmp_path).adopt(ID, {"inflate": 1, "deflate": 1}).frames == []


def test_driver_reset_empties_the_balloon(tmp_path):
    j = fresh(tmp_path)
    j.inflated([7, 8], 1)
    j.cleared()
    j.close()
    assert reopen(tmp_path).adopt(ID, {"inflate": 1, "deflate": 0}).frames == []


def test_a_torn_last_record_is_dropped_and_cut_off(tmp_path):
    j = fresh(tmp_path)
    j.inflated([1, 2], 1)
    j.inflated([3, 4], 2)
    j.close()
    log = tmp_path / "vm.log.0"
    data = log.read_bytes()
    log.write_bytes(data[:-5])  # the crash cut the last append short
    j = reopen(tmp_path)
    assert len(log.read_bytes()) < len(data) - 5  # truncated back to whole records
    j.inflated([9], 2)  # appended after the last good record, so it is found again
    j.close()
    assert reopen(tmp_path).adopt(ID, {"inflate": 2, "deflate": 0}).frames == [1, 2, 9]


def test_replay_stops_at_the_first_corrupt_record_and_says_so(tmp_path, monkeypatch):
    j = fresh(tmp_path)
    j.inflated([1, 2], 1)
    size_after_first = (tmp_path / "vm.log.0").stat().st_size
    j.inflated([3], 2)
    j.inflated([4], 3)
    j.close()
    log = tmp_path / "vm.log.0"
    data = bytearray(log.read_bytes())
    data[size_after_first + 14] ^= 0x01  # a flipped bit inside the second inflate's payload
    log.write_bytes(bytes(data))
    warnings = []
    monkeypatch.setattr(journal_mod.structlog, "get_logger", lambda: Recorder(warnings))
    j = reopen(tmp_path)
    assert list(j.state.frames) == [1, 2]  # nothing of what followed the bad record
    assert [w for w in warnings if "bad record" in w[0]] and warnings[0][1]["reason"] == "checksum mismatch"
    assert log.stat().st_size == size_after_first
    # the ring is further than the replayed prefix: never restored
    assert j.adopt(ID, {"inflate": 3, "deflate": 0}).frames == []


class Recorder:
    """A logger that keeps (event, fields) of every warning and error."""

    def __init__(self, out):
        self.out = out

    def bind(self, **kw):
        return self

    def warning(self, event, **kw):
        self.out.append((event, kw))

    error = warning

    def info(self, event, **kw):
        pass


def half_writes(monkeypatch):
    real = os.write

    def write(fd, data):
        data = bytes(data)
        return real(fd, data[: max(1, len(data) // 2)])

    monkeypatch.setattr(journal_mod.os, "write", write)


def test_short_writes_are_completed(tmp_path, monkeypatch):
    j = fresh(tmp_path)
    half_writes(monkeypatch)
    j.inflated(list(range(100, 356)), 1)
    j.deflated(list(range(100, 200)), 1)
    j.inflated([7], 2)
    monkeypatch.undo()
    j.close()
    assert j.persisting and j.write_errors == 0
    got = reopen(tmp_path).adopt(ID, {"inflate": 2, "deflate": 1})
    assert got.frames == [7] + list(range(200, 356))


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EIO])
def test_a_failed_write_turns_persistence_off_without_raising(tmp_path, monkeypatch, err):
    j = fresh(tmp_path)
    j.inflated([1, 2], 1)
    calls = []

    def fail(fd, data):
        calls.append(len(data))
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(journal_mod.os, "write", fail)
    warnings = []
    j.log = Recorder(warnings)
    j.inflated([3], 2)  # must not raise: the guest's buffer has to go back
    j.deflated([1], 1)
    j.target(99)
    monkeypatch.undo()
    assert len(calls) == 1 and j.write_errors == 1 and not j.persisting
    assert len(warnings) == 1 and "no longer persisted" in warnings[0][0]
    assert list(j.state.frames) == [2, 3]  # in memory it still follows
    # nothing on disk can be adopted later
    assert reopen(tmp_path).adopt(ID, {"inflate": 2, "deflate": 1}).frames == []


def test_a_write_cut_short_by_the_disk_leaves_no_half_record(tmp_path, monkeypatch):
    """Half a record gets out, then ENOSPC: the half is cut back off."""
    j = fresh(tmp_path)
    j.inflated([1, 2], 1)
    good = (tmp_path / "vm.log.0").stat().st_size
    real = os.write
    state = {"n": 0}

    def write(fd, data):
        state["n"] += 1
        if state["n"] == 1:
            return real(fd, bytes(data)[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal_mod.os, "write", write)
    monkeypatch.setattr(journal_mod.os, "unlink", lambda path: None)  # a disk that refuses even that
    j.inflated([3], 2)
    monkeypatch.undo()
    assert not j.persisting and (tmp_path / "vm.log.0").stat().st_size == good


def test_compaction_bounds_the_log_and_keeps_everything(tmp_path):
    j = fresh(tmp_path, compact_min_bytes=4096)
    for round_ in range(50):  # a long history over a small balloon
        j.inflated(list(range(1000, 1256)), 2 * round_ + 1)
        j.deflated(list(range(1000, 1256)), round_ + 1)
    j.inflated(list(range(5000, 5100)), 101)
    j.target(77)
    j.poison(5)
    assert j.generation > 0
    sizes = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert sizes < 16 * 1024, "the state directory grew with the history"
    assert not (tmp_path / "vm.log.0").exists()
    j.compact()
    j.close()
    j2 = reopen(tmp_path)
    assert j2.state.target_pages == 77
    got = j2.adopt(ID, {"inflate": 101, "deflate": 50})
    assert got.frames == list(range(5000, 5100)) and got.poison == 5


def test_snapshot_is_replaced_atomically(tmp_path):
    j = fresh(tmp_path, compact_min_bytes=64)
    j.inflated(list(range(100)), 1)
    j.compact()
    assert (tmp_path / "vm.snap").exists() and not (tmp_path / "vm.snap.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_a_bad_snapshot_starts_this_vm_empty_with_one_error(tmp_path, monkeypatch, damage):
    j = fresh(tmp_path)
    j.inflated(list(range(100, 300, 3)), 1)
    j.target(55)
    j.compact()
    j.close()
    snap = tmp_path / "vm.snap"
    data = snap.read_bytes()
    snap.write_bytes({
        "truncate": data[:-9],
        "flip": data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:],
        "garbage": b"not json\n",
        "empty": b"",
    }[damage])
    errors = []
    monkeypatch.setattr(journal_mod.structlog, "get_logger", lambda: Recorder(errors))
    j = reopen(tmp_path)  # no exception: the daemon and the other VMs carry on
    assert len(errors) == 1 and "empty balloon" in errors[0][0]
    assert len(j.state.frames) == 0 and j.state.target_pages == 0
    assert j.adopt(ID, {"inflate": 1, "deflate": 0}).frames == []
    assert (tmp_path / "vm.snap.bad").exists()


def test_unusable_directory_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(JournalError, match="state directory"):
        BalloonJournal(str(f / "sub"), "vm")


def test_frameset_matches_a_set():
    fs, ref = FrameSet(), set()
    for pfn in (0, 7, 8, 32767, 32768, 10**9, 7):
        fs.add(pfn)
        ref.add(pfn)
    fs.discard(8)
    ref.discard(8)
    fs.discard(12345)
    assert list(fs) == sorted(ref) and len(fs) == len(ref) and 10**9 in fs and 8 not in fs


def test_frameset_batches_match_a_set():
    """Batches as a driver sends them (a run, a reversed run, a run with a
    hole, scattered frames) take the run path or the per-frame one; either
    way the set and its count are a set's, and a snapshot's runs add on top
    of what is there."""
    rng = random.Random(7)
    fs, ref = FrameSet(), set()
    for _ in range(400):
        start = rng.randrange(0, 1 << 20)
        shape = rng.choice(["run", "reversed", "holed", "scattered", "present"])
        if shape == "scattered":
            batch = [rng.randrange(0, 1 << 20) for _ in range(256)]
        elif shape == "present" and ref:
            first = min(ref)
            batch = list(range(first, first + 256))
        else:
            batch = list(range(start, start + 256))
            if shape == "reversed":
                batch.reverse()
            elif shape == "holed":
                del batch[100]
        if rng.random() < 0.5:
            fs.update(batch)
            ref.update(batch)
        else:
            fs.difference_update(batch)
            ref.difference_update(batch)
        if rng.random() < 0.05:
            fs.add_run(start, 5000)
            ref.update(range(start, start + 5000))
        assert len(fs) == len(ref)
    assert list(fs) == sorted(ref)


def test_frameset_leaves_out_frames_no_machine_has():
    fs = FrameSet()
    fs.update([5, -1, 1 << 60])
    fs.add(1 << 64)
    fs.add_run((1 << 52) - 2, 10)
    assert list(fs) == [5, (1 << 52) - 2, (1 << 52) - 1] and len(fs) == 3


def test_the_journal_lock_is_one_process_s_at_a_time(tmp_path):
    """JournalLock: a second holder (another open of the file, as another
    process's would be) cannot take it until the first lets go, which
    closing the journal does; a journal refuses a lock not held."""
    first = journal_mod.JournalLock(str(tmp_path), "vm0")
    second = journal_mod.JournalLock(str(tmp_path), "vm0")
    other_vm = journal_mod.JournalLock(str(tmp_path), "vm1")
    assert first.try_acquire() and first.held
    assert first.holder() == os.getpid()
    assert not second.try_acquire() and not second.held
    assert other_vm.try_acquire()
    with pytest.raises(JournalError, match="not held"):
        BalloonJournal(str(tmp_path), "vm0", lock=second)
    journal = BalloonJournal(str(tmp_path), "vm0", lock=first)
    journal.target(7)
    assert not second.try_acquire()
    journal.close()  # lets the lock go
    assert not first.held and second.try_acquire()
    second.release()
    other_vm.release()
