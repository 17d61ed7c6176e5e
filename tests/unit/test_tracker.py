"""PfnTracker: membership, refusals, migrations, memory bound."""

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from balloond.device.tracker import PfnTracker

# q35 layout: RAM below 640 KiB, then from 768 KiB up (in 4 KiB frames)
LOW, HIGH = (0, 160), (192, 65536 - 192)


def tracker():
    return PfnTracker([LOW, HIGH])


def test_inflate_returns_only_new_frames_and_counts_refusals():
    t = tracker()
    assert t.inflate([1, 2, 3]) == [1, 2, 3]
    assert t.inflate([3, 4]) == [4]
    assert t.counters.double_inflate == 1
    assert t.inflate([170]) == []  # in the hole
    assert t.inflate([10**9]) == []
    assert t.counters.invalid_pfn == 2
    assert len(t) == 4 and 3 in t and 170 not in t


def test_deflate_of_frames_not_in_balloon_is_refused():
    t = tracker()
    t.inflate([5, 6])
    assert t.deflate([6, 7]) == [6]
    assert t.counters.stray_deflate == 1
    assert list(t) == [5]


def test_runs_coalesce_across_bytes():
    t = tracker()
    t.inflate(range(195, 260))
    t.inflate([300, 302])
    assert t.runs() == [(195, 65), (300, 1), (302, 1)]


def test_migrate_moves_membership_atomically():
    t = tracker()
    t.inflate([200])
    assert t.migrate(200, 300)
    assert list(t) == [300] and t.counters.migrations == 1
    assert not t.migrate(200, 400)  # old not ballooned
    t.inflate([400])
    assert not t.migrate(300, 400)  # new already ballooned
    assert not t.migrate(300, 170)  # new outside RAM
    assert t.counters.bad_migration == 3
    assert sorted(t) == [300, 400]


def test_stock_driver_migration_pattern_is_counted():
    t = tracker()
    t.inflate(range(200, 456))  # ordinary inflate
    t.inflate([1000])  # compaction: new page in...
    t.deflate([200])  # ...old page out
    assert t.counters.migrations == 1
    t.deflate([201, 202])  # an ordinary deflate is not a migration
    assert t.counters.migrations == 1


def test_resize_keeps_frames_still_in_ram():
    t = tracker()
    t.inflate([5, 300, 60000])
    dropped = t.resize([LOW, (192, 1000)])
    assert dropped == [60000]
    assert sorted(t) == [5, 300]


def test_bitmap_stays_within_32_kib_per_gib():
    gib_pages = (1 << 30) >> 12
    t = PfnTracker([(0, 160), (192, 4 * gib_pages - 192)])
    assert t.bitmap_bytes() <= 4 * 32 * 1024 + 64


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["in", "out", "mig"]), st.lists(st.integers(0, 2000), max_size=20)), max_size=30))
def test_tracker_matches_a_reference_set(ops):
    t = PfnTracker([(0, 160), (192, 2000 - 192)])
    ram = set(range(0, 160)) | set(range(192, 2000))
    ref = set()
    for op, pfns in ops:
        if op == "in":
            t.inflate(pfns)
            ref |= {p for p in pfns if p in ram}
        elif op == "out":
            t.deflate(pfns)
            ref -= set(pfns)
        elif len(pfns) >= 2:
            old, new = pfns[0], pfns[1]
            ok = old in ref and new in ram and new not in ref
            assert t.migrate(old, new) == ok
            if ok:
                ref = (ref - {old}) | {new}
        assert len(t) == len(ref)
    assert set(t) == ref
    assert sum(n for _, n in t.runs()) == len(ref)


def test_clear_empties():
    t = tracker()
    t.inflate(random.sample(range(200, 60000), 500))
    assert t.clear() == 500
    assert len(t) == 0 and list(t) == []


def test_whole_byte_runs_take_the_fast_path_with_the_same_result():
    t = tracker()
    buffer = list(range(256, 512))[::-1]  # one aligned run, in a driver's descending order
    assert sorted(t.inflate(buffer)) == list(range(256, 512))
    assert len(t) == 256 and 300 in t and 255 not in t and 512 not in t
    assert t.inflate(buffer) == [] and t.counters.double_inflate == 256  # slow path refuses each
    assert sorted(t.deflate(buffer)) == list(range(256, 512)) and len(t) == 0
    assert t.deflate(buffer) == [] and t.counters.stray_deflate == 256


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(24, 240), st.integers(1, 40)), max_size=20))
def test_fast_and_slow_paths_agree_with_a_reference(ops):
    t = PfnTracker([(0, 160), (192, 2048 - 192)])
    ram = set(range(0, 160)) | set(range(192, 2048))
    ref = set()
    for inflate, byte, nbytes in ops:
        pfns = list(range(byte * 8, min(2048, (byte + nbytes) * 8)))
        if inflate:
            assert sorted(t.inflate(pfns)) == sorted(p for p in pfns if p in ram and p not in ref)
            ref |= {p for p in pfns if p in ram}
        else:
            assert sorted(t.deflate(pfns)) == sorted(p for p in pfns if p in ref)
            ref -= set(pfns)
        assert len(t) == len(ref)
    assert set(t) == ref


def test_a_range_that_leaves_and_returns_unchanged_keeps_its_frames():
    t = tracker()
    t.inflate([5, 300, 60000])
    t.resize([LOW])  # REM_MEM_REG of the high range
    assert sorted(t) == [5]
    t.resize([LOW, HIGH])  # ADD_MEM_REG of the same range
    assert sorted(t) == [5, 300, 60000] and len(t) == 3


def test_terabytes_of_sparse_guest_ram_cost_only_the_chunks_in_use():
    """2 x 4 TiB of RAM ranges: the bitmap is allocated only where frames are
    ballooned, and a new layout (every SET_MEM_TABLE) is fast however large
    guest RAM is."""
    import time

    from balloond.device.tracker import CHUNK_BYTES

    tib = 1 << 28  # frames in 1 TiB
    layout = [(0, 4 * tib), (8 * tib, 4 * tib)]
    t = PfnTracker(layout)
    assert t.bitmap_bytes() == 0
    assert t.inflate([5, 6, 8 * tib + 7, 8 * tib + 4 * tib - 1]) == [5, 6, 8 * tib + 7, 12 * tib - 1]
    assert t.bitmap_bytes() <= 3 * CHUNK_BYTES < 1 << 20
    start = time.monotonic()
    for i in range(50):
        t.resize(layout if i % 2 else list(reversed(layout)))
    assert time.monotonic() - start < 0.5
    assert sorted(t) == [5, 6, 8 * tib + 7, 12 * tib - 1] and len(t) == 4
    t.resize([(0, 4 * tib), (8 * tib, 2 * tib)])  # the second range shrinks: its frames move or drop
    assert sorted(t) == [5, 6, 8 * tib + 7]
    assert t.clear() == 3 and t.bitmap_bytes() <= 2 * CHUNK_BYTES


def test_covers_agrees_with_a_test_per_frame():
    """`covers` (which the releaser asks before bridging two runs over frames
    ballooned earlier) counts whole bitmap bytes at once: it must say exactly
    what a membership test of every frame says, at byte edges, across chunk
    edges and across the hole between two RAM ranges."""
    from balloond.device.tracker import CHUNK_FRAMES

    rng = random.Random(7)
    ranges = [(0, 3 * CHUNK_FRAMES // 2), (2 * CHUNK_FRAMES, 100)]
    for _ in range(40):
        t = PfnTracker(ranges)
        base = rng.choice([0, CHUNK_FRAMES - 40, 2 * CHUNK_FRAMES])
        t.inflate(range(base, base + 80))
        t.deflate([base + rng.randrange(80) for _ in range(rng.randrange(3))])
        for _ in range(60):
            first = base - 10 + rng.randrange(100)
            end = first + rng.randrange(40)
            expected = all(pfn in t for pfn in range(first, end))
            assert t.covers(first, end) == expected, (first, end)
    t = PfnTracker(ranges)
    t.inflate(range(3 * CHUNK_FRAMES // 2 - 8, 3 * CHUNK_FRAMES // 2))
    t.inflate(range(2 * CHUNK_FRAMES, 2 * CHUNK_FRAMES + 8))
    assert t.covers(3 * CHUNK_FRAMES // 2 - 8, 3 * CHUNK_FRAMES // 2)
    assert not t.covers(3 * CHUNK_FRAMES // 2 - 8, 2 * CHUNK_FRAMES + 8)  # the hole is not ballooned


def test_scattered_frames_update_exactly_the_frames_named():
    """A stock driver's buffer: 256 frames from all over RAM, some repeated or
    outside it. The per-frame path flips exactly those bits and counts the
    refusals."""
    rng = random.Random(3)
    t = PfnTracker([(0, 5000), (6000, 5000)])
    frames = rng.sample(range(0, 11000), 256)
    added = t.inflate(frames + frames[:5])
    valid = [p for p in frames if p < 5000 or 6000 <= p < 11000]
    assert added == valid and len(t) == len(valid)
    repeated_valid = sum(1 for p in frames[:5] if p in set(valid))
    assert t.counters.double_inflate == repeated_valid
    assert t.counters.invalid_pfn == 256 - len(valid) + 5 - repeated_valid
    assert sorted(t) == sorted(valid)
    gone = t.deflate(frames[:100] + frames[:3])
    assert gone == [p for p in frames[:100] if p in set(valid)]
    assert sorted(t) == sorted(p for p in valid if p not in set(frames[:100]))
    assert len(t) == len(valid) - len(gone)


def test_runs_at_any_alignment_agree_with_a_set():
    """The shape of a real stock-driver buffer: 256 frames in one to a few
    runs that start anywhere in a bitmap byte (most begin at frame 2 of 8).
    Such buffers take the run path; whatever was ballooned before, the
    tracker must agree frame for frame with a plain set, and return (and
    count) exactly the frames that changed."""
    rng = random.Random(11)
    ranges = [(0, 4000), (4096, 60000)]
    t, model = PfnTracker(ranges), set()
    in_ram = lambda p: 0 <= p < 4000 or 4096 <= p < 64096  # noqa: E731
    per_frame = []
    t._enter = lambda pfns, slow=t._enter: per_frame.append(1) or slow(pfns)  # type: ignore[method-assign]
    t._leave = lambda pfns, slow=t._leave: per_frame.append(1) or slow(pfns)  # type: ignore[method-assign]
    for step in range(400):
        frames: list[int] = []
        runs = rng.choice([1, 1, 2, 5])
        for _ in range(runs):
            start = rng.randrange(0, 64200)
            frames += range(start, start + 256 // runs)
        rng.shuffle(frames)
        if rng.random() < 0.5:
            expected = [p for p in dict.fromkeys(frames) if in_ram(p) and p not in model]
            assert sorted(t.inflate(frames)) == sorted(expected), step
            model.update(expected)
        else:
            expected = [p for p in dict.fromkeys(frames) if in_ram(p) and p in model]
            assert sorted(t.deflate(frames)) == sorted(expected), step
            model.difference_update(expected)
        assert len(t) == len(model)
    assert set(t) == model
    assert 0 < len(per_frame) < 400  # both paths were taken
    t.clear()
    per_frame.clear()
    run = list(range(40002, 40258))  # one run from frame 2 of a byte, as most are
    assert sorted(t.inflate(run[::-1])) == run and len(t) == 256
    assert sorted(t.deflate(run)) == run and len(t) == 0 and not per_frame
    repeats = t.counters.double_inflate
    assert sorted(t.inflate(run + run[:3])) == run and len(t) == 256  # a repeat counted once
    assert t.counters.double_inflate == repeats + 3
