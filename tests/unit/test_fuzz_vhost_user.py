"""The hostile-frontend fuzz harness (fuzz/vhost.py), run briefly under Hypothesis.

`vhost.parse` frames and decodes arbitrary byte streams; `ConnectionFuzzer`
plays a frontend against a real VhostUserConnection + BalloonDevice over a
socketpair, with real fds of every kind, next to a bystander connection on
the same event loop. Both raise FuzzFailure on an escaped exception, an
internal error, an fd leak, a hang or a bystander that stops being served.
The harness's leak check is shown to work, and the inputs that found bugs
are replayed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloond.engine import connection
from fuzz import vhost
from fuzz.common import FuzzFailure
from protocol import vhost_user as vu
from protocol.vhost_user import Request

REGRESSIONS = Path(__file__).resolve().parents[2] / "fuzz" / "regressions"


def fast(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], database=None)


@pytest.fixture(scope="module")
def fuzzer() -> Iterator[vhost.ConnectionFuzzer]:
    f = vhost.ConnectionFuzzer(hang_seconds=5.0)
    yield f
    f.close()


def deferred(data: bytes) -> bytes:
    """The same input with deferred discards: bit 7 of the first byte set,
    the rest of that byte's meaning (its value mod 3) unchanged."""
    first = data[0] | 0x80
    while first % 3 != data[0] % 3:
        first += 1
    return bytes([first]) + data[1:]


@pytest.mark.parametrize("mode", ["immediate", "deferred"])
def test_seeds(fuzzer, mode):
    seeds = vhost.seeds() if mode == "immediate" else [deferred(s) for s in vhost.seeds()]
    results = [fuzzer.run(seed) for seed in seeds]
    assert all(r.deferred == (mode == "deferred") for r in results)
    assert results[0].started and results[0].max_live_rings >= 2
    assert fuzzer.bystander is not None and fuzzer.bystander.rounds >= len(results)


def test_parse_of_well_formed_messages():
    stream = b"".join(
        vu.encode_message(r, p, vu.VERSION | vu.FLAG_NEED_REPLY)
        for r, p in [
            (Request.GET_FEATURES, b""),
            (Request.SET_VRING_NUM, vu.VringState(0, 256).encode()),
            (Request.SET_CONFIG, vu.ConfigSpace(0, 4, 0, b"abcd").encode()),
        ]
    )
    counts = vhost.parse(b"\x00" + bytes([len(stream) // 4, len(stream) % 4]) + stream)
    assert counts["decoded"] >= 1


@pytest.mark.parametrize("path", sorted(REGRESSIONS.glob("vhost-*")), ids=lambda p: p.name)
def test_regressions(fuzzer, path):
    data = path.read_bytes()
    vhost.parse(data)
    fuzzer.run(data)


def test_an_fd_leak_is_caught(fuzzer, monkeypatch):
    """With the connection's fd cleanup disabled, a malformed message with an fd leaks it."""
    monkeypatch.setattr(connection, "_close_fds", lambda fds: None)
    # op 15: raw message; SET_VRING_CALL (13) with a 3-byte payload and one eventfd
    data = bytes([0, 0, 15, 200, 13, 0, 0, 0, 3, 1, 2, 3, 0, 0, 0, 1, 0])
    with pytest.raises(FuzzFailure, match="fd leak"):
        fuzzer.run(data)


def test_bad_queue_index_with_fd_closes_the_fd(fuzzer):
    """SET_VRING_ERR for queue 16 (beyond the 16 queues) used to leak its fd."""
    before = len(os.listdir("/proc/self/fd"))
    # op 9 (vring file), request choice 2 (ERR), queue byte 230 → choice 16, fd
    fuzzer.run(bytes([0, 0, 9, 2, 230, 1, 0, 0, 0, 0]))
    assert len(os.listdir("/proc/self/fd")) == before


@fast(300)
@given(st.binary(max_size=1024))
def test_parse_raw_bytes(data):
    vhost.parse(data)


@fast(80)
@given(st.binary(max_size=200))
def test_connection_raw_bytes(fuzzer, data):
    fuzzer.run(data)


@fast(60)
@given(st.binary(min_size=8, max_size=120))
def test_connection_after_a_good_setup(fuzzer, tail):
    """Random requests against a started device (op 18: QEMU's setup sequence
    first), in either discard mode."""
    fuzzer.run(bytes([0x81 if tail[0] & 2 else 0, tail[0] & 1, 18]) + tail)
