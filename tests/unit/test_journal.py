"""BalloonJournal: the balloon on disk survives a killed daemon, stays bounded."""


import pytest

from balloond.device.journal import BalloonJournal, FrameSet, JournalError

ID = (42, 4242)


def reopen(tmp_path, **kw):
    return BalloonJournal(str(tmp_path), "vm", **kw)


def test_changes_survive_a_reopen(tmp_path):
    j = reopen(tmp_path)
    assert j.adopt(ID) == []
    j.inflated([10, 11, 12, 500])
    j.deflated([11])
    j.migrated([(12, 900)])
    j.target(4096)
    j.close()  # as if killed: nothing else was written
    j2 = reopen(tmp_path)
    assert j2.state.target_pages == 4096
    assert j2.adopt(ID) == [10, 500, 900]


def test_another_guest_starts_afresh_and_that_is_recorded(tmp_path):
    j = reopen(tmp_path)
    j.adopt(ID)
    j.inflated([1, 2, 3])
    assert j.adopt((42, 1)) == []  # a new QEMU: a new memfd
    j.close()
    assert reopen(tmp_path).adopt((42, 1)) == []
    assert reopen(tmp_path).adopt(ID) == []


def test_driver_reset_empties_the_balloon(tmp_path):
    j = reopen(tmp_path)
    j.adopt(ID)
    j.inflated([7, 8])
    j.cleared()
    j.close()
    assert reopen(tmp_path).adopt(ID) == []


def test_a_torn_last_record_is_dropped(tmp_path):
    j = reopen(tmp_path)
    j.adopt(ID)
    j.inflated([1, 2])
    j.inflated([3, 4])
    j.close()
    log = tmp_path / "vm.log.0"
    data = log.read_bytes()
    log.write_bytes(data[:-5])  # the crash cut the last append short
    assert reopen(tmp_path).adopt(ID) == [1, 2]
    assert len(log.read_bytes()) < len(data) - 5  # truncated back to whole records


def test_compaction_bounds_the_log_and_keeps_everything(tmp_path):
    j = reopen(tmp_path, compact_min_bytes=4096)
    j.adopt(ID)
    for round_ in range(50):  # a long history over a small balloon
        j.inflated(list(range(1000, 1256)))
        j.deflated(list(range(1000, 1256)))
    j.inflated(list(range(5000, 5100)))
    j.target(77)
    assert j.generation > 0
    sizes = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert sizes < 16 * 1024, "the state directory grew with the history"
    assert not (tmp_path / "vm.log.0").exists()
    j.close()
    j2 = reopen(tmp_path)
    assert j2.state.target_pages == 77
    assert j2.adopt(ID) == list(range(5000, 5100))


def test_snapshot_is_replaced_atomically(tmp_path):
    j = reopen(tmp_path, compact_min_bytes=64)
    j.adopt(ID)
    j.inflated(list(range(100)))
    j.compact()
    assert (tmp_path / "vm.snap").exists() and not (tmp_path / "vm.snap.tmp").exists()


def test_unusable_directory_is_a_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(JournalError, match="state directory"):
        BalloonJournal(str(f / "sub"), "vm")
    (tmp_path / "vm.snap").write_text("not json\n")
    with pytest.raises(JournalError, match="unreadable"):
        reopen(tmp_path)


def test_frameset_matches_a_set():
    fs, ref = FrameSet(), set()
    for pfn in (0, 7, 8, 32767, 32768, 10**9, 7):
        fs.add(pfn)
        ref.add(pfn)
    fs.discard(8)
    ref.discard(8)
    fs.discard(12345)
    assert list(fs) == sorted(ref) and len(fs) == len(ref) and 10**9 in fs and 8 not in fs
