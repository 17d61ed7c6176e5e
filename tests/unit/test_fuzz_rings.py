"""The hostile-guest fuzz harness (fuzz/rings.py), run briefly under Hypothesis.

The same `rings.run` that atheris drives for hours (fuzz/fuzz_rings.py) runs
here on a few hundred generated inputs: raw bytes, and structured sessions
built with the harness's own Builder. Each input is a real BalloonDevice
over memfd guest RAM; the harness raises on an escaped exception, a hang,
a write or discard outside the balloon, or a queue outcome that differs from
its model. Also here: the harness's oracles are shown to catch what they
are for, and the inputs that found bugs are replayed.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloond.device import releaser
from fuzz import rings
from fuzz.common import FuzzFailure

REGRESSIONS = Path(__file__).resolve().parents[2] / "fuzz" / "regressions"
def fast(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def test_seeds_run_clean_and_do_real_work():
    results = [rings.run(seed) for seed in rings.seeds()]
    assert all(r.stray_discards == 0 for r in results)
    first = results[0]
    assert first.chains == 5 and first.guest_errors == 0
    assert first.ballooned_max == 64 and first.discarded_pages > 0
    assert first.predicted_kicks == first.kicks  # every kick checked against the model


def test_a_stray_discard_is_caught(monkeypatch):
    original = releaser.MemoryReleaser.release_frames

    def sloppy(self, pfns, ballooned=None):
        return original(self, [*pfns, 60], None)  # frame 60 is never ballooned or reported

    monkeypatch.setattr(releaser.MemoryReleaser, "release_frames", sloppy)
    with pytest.raises(FuzzFailure, match="discarded but was never ballooned"):
        rings.run(rings.seeds()[0])


def test_a_miscounted_buffer_is_caught(monkeypatch):
    from balloond.device.balloon import BalloonDevice

    monkeypatch.setattr(BalloonDevice, "_return", lambda self, vring, chains: None)
    with pytest.raises(FuzzFailure, match="chains returned"):
        rings.run(rings.seeds()[0])


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("rings-*")), ids=lambda p: p.name)
def test_regressions(path):
    rings.run(path.read_bytes(), hang_seconds=2.0)


def test_used_ring_over_avail_index_does_not_loop():
    """The bug behind rings-used-aliases-avail-hang.bin, built by hand: the
    inflate queue's used ring sits on its avail ring, so every returned chain
    bumps the avail index. A kick must still end."""
    run = rings.RingRun(bytes([0x80, 3, 0, 0, 0, 0, 0]), hang_seconds=2.0)
    run.setup()
    try:
        vring = run.vrings[0]
        run._stop(vring)
        d, a, _ = run.layouts[0]
        vring.addr = vring.addr.__class__(0, 0, run._uaddr(d), run._uaddr(a), run._uaddr(a), 0)
        run.used_ranges.append((a, a + 4 + 8 * 8 + 2))
        run.write(d, struct.pack("<QIHH", 0x10000, 4, 0, 0) * 8)
        run.write(a, struct.pack("<HH", 0, 1) + bytes(16))
        run._start(vring)
        start = time.monotonic()
        run.device.queue_kicked(vring)
        assert time.monotonic() - start < 1.0
        assert vring.counters.chains <= 2 * vring.num
    finally:
        run.teardown()


def test_a_frame_migrated_in_and_out_of_the_balloon_keeps_its_data():
    """One migrate buffer moves frame 40 to 41, then 41 to 42: frame 41 is the
    guest's again at the end, so it must not be discarded (it was, until the
    device took the batch's net effect; rings-migrate-chain-*.bin)."""
    b = rings.Builder(features=0x04).initial([40])  # roles: inflate, deflate, migrate
    b.migrate(0, [(40, 41), (41, 42)]).chain(2, 0, [(0, 32, False)]).kick(2)
    stats = rings.run(b.bytes())
    assert stats.predicted_kicks == stats.kicks and stats.discarded_pages == 1  # frame 42 only


@pytest.mark.parametrize("length", [4096, 65536])
def test_one_kick_of_maximal_buffers_is_bounded(length):
    """128 chains of the largest PFN buffers: one kick stays well under a
    second (with 64 KiB buffers read whole it took 5 s). Buffers over 4 KiB
    are refused whole, as guest errors."""
    run = rings.RingRun(bytes([0x00, 7, 0, 0, 0]))
    run.setup()
    try:
        d, a, _ = run.layouts[0]
        pfns = [rings.RAM_PFNS[i % len(rings.RAM_PFNS)] for i in range(length // 4)]
        run.write(1 << 32, struct.pack(f"<{len(pfns)}I", *pfns))
        for i in range(128):
            run.write(d + 16 * i, struct.pack("<QIHH", 1 << 32, length, 0, 0))
            run.write(a + 4 + 2 * i, struct.pack("<H", i))
        run.write(a + 2, struct.pack("<H", 128))
        start = time.monotonic()
        run.device.queue_kicked(run.vrings[0])
        assert time.monotonic() - start < 2.0
        assert run.vrings[0].queue.used_idx == 128
        assert run.device.counters.guest_errors == (128 if length > 4096 else 0)
        assert len(run.device.tracker) == (0 if length > 4096 else len(rings.RAM_PFNS))
    finally:
        run.teardown()


@fast(150)
@given(st.binary(max_size=700))
def test_raw_inputs(data):
    rings.run(data, hang_seconds=2.0)


@st.composite
def sessions(draw):
    """Mostly well-formed sessions with hostile details, via the Builder."""
    features = draw(st.integers(0, 0x7F))
    b = rings.Builder(features=features, size_exp=draw(st.integers(0, 7)))
    b.initial(draw(st.lists(st.sampled_from(rings.RAM_PFNS), max_size=8)))
    nq = len(rings.vb.queue_roles(_acked(features)))
    pfn = st.one_of(st.sampled_from(rings.RAM_PFNS), st.integers(0, 0xFFFF_FFFF))
    for _ in range(draw(st.integers(1, 8))):
        q = draw(st.integers(0, nq - 1))
        page = draw(st.integers(0, 60))
        kind = draw(st.sampled_from(["pfns", "stats", "migrate", "report", "indirect", "op"]))
        if kind == "pfns":
            values = draw(st.lists(pfn, max_size=64))
            b.pfns(page, values).chain(q, draw(st.integers(0, 255)), [(page, draw(st.sampled_from([4 * len(values), 4 * len(values) + 2, 0, 4096])), draw(st.booleans()))])
        elif kind == "stats":
            b.stats(page, draw(st.lists(st.tuples(st.sampled_from(rings.STAT_TAGS), st.integers(0, 2**64 - 1)), max_size=12)))
            b.chain(q, 0, [(page, draw(st.sampled_from([10, 20, 120, 11])), False)])
        elif kind == "migrate":
            b.migrate(page, draw(st.lists(st.tuples(pfn, pfn), max_size=8)))
            b.chain(q, 1, [(page, draw(st.sampled_from([16, 32, 128, 8])), False)])
        elif kind == "report":
            b.chain(q, 2, [(page, draw(st.sampled_from([4096, 8192, 100, 65535])), True)])
        elif kind == "indirect":
            b.indirect(q, draw(st.integers(0, 255)), page, [(draw(st.integers(0, 60)), draw(st.sampled_from([4, 16, 256])), draw(st.booleans())) for _ in range(draw(st.integers(1, 4)))])
        else:
            b.op(draw(st.sampled_from([rings.Opcode.RESTART, rings.Opcode.REMAP, rings.Opcode.STATS_TIMER, rings.Opcode.KICK_ALL])), q, draw(st.integers(0, 3)))
        b.kick(q)
    return b.bytes() + draw(st.binary(max_size=64))


def _acked(features: int) -> int:
    from protocol.balloon import Feature

    acked = 0
    for bit, feature in enumerate((Feature.STATS_VQ, Feature.REPORTING, Feature.BALLOOND_MIGRATE_VQ)):
        if features & (1 << bit):
            acked |= 1 << feature
    return acked


@fast(150)
@given(sessions())
def test_structured_sessions(data):
    rings.run(data, hang_seconds=2.0)


def deferred(data: bytes) -> bytes:
    """The same input in the deferred discard mode (bit 5 of its second byte)."""
    return bytes([data[0], data[1] | 32]) + data[2:]


def test_seeds_run_clean_in_the_deferred_discard_mode():
    results = [rings.run(deferred(seed)) for seed in rings.seeds()]
    assert all(r.deferred and r.stray_discards == 0 for r in results)
    first = results[0]
    assert first.deferred_flushes > 0 and first.discarded_pages > 0
    assert first.predicted_kicks == first.kicks


def test_a_deflate_that_leaves_its_discard_pending_is_caught(monkeypatch):
    """The deferred mode's oracle: a frame deflated while its discard was
    pending must not be discarded when the timer fires."""
    from balloond.device.balloon import BalloonDevice

    def forget_nothing(self, pfns):
        pass  # the bug: pending discards of deflated frames stay pending

    assert rings.run(deferred(rings.seeds()[0])).deferred_flushes > 0  # control: clean without the bug
    monkeypatch.setattr(BalloonDevice, "_forget", forget_nothing)
    with pytest.raises(FuzzFailure, match="not in the balloon"):
        rings.run(deferred(rings.seeds()[0]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(st.binary(min_size=2, max_size=400))
def test_random_inputs_in_the_deferred_discard_mode(data):
    stats = rings.run(deferred(data), hang_seconds=2.0)
    assert stats.deferred and stats.stray_discards == 0
