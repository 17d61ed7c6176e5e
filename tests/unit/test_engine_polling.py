"""The adaptive poll window, on the engine itself with a simulated clock.

A guest in a run of round trips (a stock driver's page migrations or its
256-frame buffers, each waited for) hands back its next buffer some time
after the last one went back: longer than --poll-us when it has pages to
free and the config to write in between. The engine learns that turnaround
while buffers keep coming and keeps looking that long (at most
MAX_ADAPTIVE_POLL_SECONDS), so those buffers need no kick; a guest that goes
quiet gets --poll-us again after its next kick, so idling costs nothing.

The clock advances 10 us at every look at it, the rings are two fakes whose
buffers appear at simulated times, and the device hands each buffer back and
makes the next one (on the other ring, as a migration alternates) appear a
"turnaround" later.
"""

from __future__ import annotations

import socket
from types import SimpleNamespace
from typing import Any

import pytest

from balloond.engine import connection as engine
from balloond.engine.connection import MAX_ADAPTIVE_POLL_SECONDS, VhostUserConnection
from balloond.engine.vring import Vring

POLL = 200e-6  # --poll-us 200, the default
TICK = 10e-6


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        self.now += TICK
        return self.now


class FakeQueue:
    """A ring whose buffers become available at simulated times."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.arrivals: list[float] = []
        self.kicks_on = True

    def pending(self) -> int:
        return sum(1 for t in self.arrivals if t <= self.clock.now)

    def enable_kicks(self) -> None:
        self.kicks_on = True

    def disable_kicks(self) -> None:
        self.kicks_on = False


class Guest:
    """The device side of the fake: each buffer served makes the next one
    appear on the other ring `turnaround` later (or none once `left` is 0)."""

    def __init__(self, clock: Clock, turnaround: float, buffers: int) -> None:
        self.clock, self.turnaround, self.left = clock, turnaround, buffers
        self.rings = [Vring(0), Vring(1)]
        for vring in self.rings:
            vring.queue = FakeQueue(clock)  # type: ignore[assignment]
            vring.enabled = True
        self.served = 0

    def poll_partners(self, index: int) -> tuple[int, ...]:
        return (1 - index,)

    def queue_kicked(self, vring: Vring) -> None:
        q: Any = vring.queue
        due = [t for t in q.arrivals if t <= self.clock.now]
        for t in due:
            q.arrivals.remove(t)
            self.served += 1
            self.left -= 1
            if self.left > 0:
                other: Any = self.rings[1 - vring.index].queue
                other.arrivals.append(self.clock.now + self.turnaround)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(engine, "time", SimpleNamespace(monotonic=c.monotonic))
    return c


def polling_connection(guest: Guest, sock: socket.socket) -> VhostUserConnection:
    conn = object.__new__(VhostUserConnection)  # only what _poll touches
    conn.poll_seconds = POLL
    conn.device = guest  # type: ignore[assignment]
    conn.vrings = {v.index: v for v in guest.rings}
    conn.sock = sock
    conn._reading = False
    conn._resuming = set()
    conn._later = []  # type: ignore[attr-defined]
    conn._loop = SimpleNamespace(call_soon=lambda fn, *args: conn._later.append((fn, args)))  # type: ignore[attr-defined]
    conn.close_reason = None
    conn.polled_buffers = conn.polled_requests = 0
    conn._last_returned = float("-inf")
    conn._turnaround = 0.0
    return conn


def run_guest(conn: VhostUserConnection, guest: Guest, clock: Clock) -> list[float]:
    """Kick whenever the next buffer finds both rings asleep (as a driver
    does when the device asked for kicks), and run what the engine put off
    to the event loop (a burst of polling hands the loop back every
    MAX_POLL_BURST); return how long the polling after each kick lasted."""
    sessions: list[float] = []
    later: list[Any] = conn._later  # type: ignore[attr-defined]
    while guest.left > 0 or later:
        if later:
            fn, args = later.pop(0)
            start = clock.now
            fn(*args)
            sessions[-1] += clock.now - start  # the same kick's polling, resumed
            continue
        ring = next(v for v in guest.rings if v.queue.arrivals)  # type: ignore[union-attr]
        q: Any = ring.queue
        assert q.kicks_on, "a buffer was due while kicks were off, yet the engine stopped looking"
        clock.now = max(clock.now, q.arrivals[0])  # the kick comes when the buffer does
        start = clock.now
        conn._poll(ring)
        sessions.append(clock.now - start)
    return sessions


@pytest.fixture
def sock():
    a, b = socket.socketpair()
    yield a
    a.close()
    b.close()


def test_a_run_of_slow_round_trips_is_caught_by_polling_after_two_kicks(clock, sock):
    """Round trips of 2 ms (ten times --poll-us): the first kick polls
    --poll-us and misses, the second measures the turnaround, and every
    later buffer of the run is caught by polling."""
    guest = Guest(clock, turnaround=0.002, buffers=40)
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn = polling_connection(guest, sock)
    sessions = run_guest(conn, guest, clock)
    assert guest.served == 40
    assert len(sessions) == 2, f"{len(sessions)} kicks for 40 round trips of 2 ms"
    assert conn.polled_buffers > 30  # (a burst handed back to the loop resumes with one not counted)


def test_round_trips_slower_than_the_ceiling_each_kick(clock, sock):
    guest = Guest(clock, turnaround=MAX_ADAPTIVE_POLL_SECONDS * 1.2, buffers=10)
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn = polling_connection(guest, sock)
    sessions = run_guest(conn, guest, clock)
    assert len(sessions) == 10
    assert max(sessions) < POLL * 2  # no window grew past --poll-us: each gap ended the run


def test_an_idle_guest_gets_the_short_window_again(clock, sock):
    """After a run of round trips the guest goes quiet; its next kick, much
    later, is polled for --poll-us, not for the run's long window."""
    guest = Guest(clock, turnaround=0.003, buffers=20)
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn = polling_connection(guest, sock)
    sessions = run_guest(conn, guest, clock)
    assert len(sessions) == 2 and sessions[-1] > 0.003 * 18  # the run, polled through
    guest.left = 1
    guest.rings[1].queue.arrivals.append(clock.now + 1.0)  # a second later
    (idle,) = run_guest(conn, guest, clock)
    assert idle < POLL * 2, f"an idle guest's kick was polled for {idle * 1e3:.2f} ms"


def test_the_window_never_outgrows_its_ceiling(clock, sock):
    """Round trips of 90 % of the ceiling are still caught, and the look
    after the run's last buffer lasts the ceiling, not the turnaround's
    margin beyond it."""
    turnaround = MAX_ADAPTIVE_POLL_SECONDS * 0.9
    guest = Guest(clock, turnaround=turnaround, buffers=10)
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn = polling_connection(guest, sock)
    sessions = run_guest(conn, guest, clock)
    assert len(sessions) == 2
    tail = sessions[1] - 8 * turnaround  # after the last buffer went back
    assert MAX_ADAPTIVE_POLL_SECONDS <= tail < MAX_ADAPTIVE_POLL_SECONDS + 0.0005
