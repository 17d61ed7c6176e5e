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

from balloond.engine import polling as engine
from balloond.engine.connection import VhostUserConnection
from balloond.engine.polling import MAX_ADAPTIVE_POLL_SECONDS, RUN_GAP_SECONDS
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
    conn.polled_buffers = conn.polled_requests = conn.polls_preempted = 0
    conn._last_returned = float("-inf")
    conn._turnaround = 0.0
    conn._run_ring, conn._run_buffer_at, conn._polling = None, float("-inf"), False
    conn.messages = 0
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
    """Round trips of twice --poll-us: the first kick polls --poll-us and
    misses, the second measures the turnaround, and every later buffer of
    the run is caught by polling."""
    guest = Guest(clock, turnaround=2 * POLL, buffers=40)
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn = polling_connection(guest, sock)
    sessions = run_guest(conn, guest, clock)
    assert guest.served == 40
    assert len(sessions) == 2, f"{len(sessions)} kicks for 40 round trips"
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
    turnaround = MAX_ADAPTIVE_POLL_SECONDS * 0.6
    guest = Guest(clock, turnaround=turnaround, buffers=20)
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn = polling_connection(guest, sock)
    sessions = run_guest(conn, guest, clock)
    assert len(sessions) == 2 and sessions[-1] > turnaround * 18  # the run, polled through
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
    assert MAX_ADAPTIVE_POLL_SECONDS <= tail < MAX_ADAPTIVE_POLL_SECONDS + 0.0001


class ChattyGuest(Guest):
    """Like Linux's stock driver between two 256-frame buffers: after each
    buffer comes back it works (frees or allocates pages), writes the config
    (a request the vCPU waits for), then sends its next buffer. The request
    arrives on the frontend's socket `work` after the buffer went back, the
    next buffer `turnaround` after the reply."""

    def __init__(self, clock: Clock, work: float, turnaround: float, buffers: int, peer: socket.socket) -> None:
        super().__init__(clock, turnaround, buffers)
        self.work = work
        self.peer = peer
        self.requests: list[float] = []  # when each is due
        self.next_ring = 1

    def queue_kicked(self, vring: Vring) -> None:
        q: Any = vring.queue
        due = [t for t in q.arrivals if t <= self.clock.now]
        for t in due:
            q.arrivals.remove(t)
            self.served += 1
            self.left -= 1
            self.next_ring = 1 - vring.index
            if self.left > 0:
                self.requests.append(self.clock.now + self.work)

    def tick(self) -> None:
        """Called at every look at the clock: a request falls due."""
        if self.requests and self.requests[0] <= self.clock.now:
            self.requests.pop(0)
            self.peer.send(b"r")

    def replied(self) -> None:
        other: Any = self.rings[self.next_ring].queue
        other.arrivals.append(self.clock.now + self.turnaround)


@pytest.mark.parametrize(("work", "after"), [(0.7, 0.1), (0.6, 0.6)], ids=["long-work", "even-steps"])
def test_requests_between_buffers_keep_the_polling_going(clock, sock, monkeypatch, work, after):
    """The guest works after each buffer, writes the config, and sends its
    next buffer some time after the reply (in tenths of the window's
    ceiling). Requests count as round trips and a request served restarts
    the window: with 7 tenths of work and 1 after the reply (counting
    buffers alone the engine would see short turnarounds and miss every
    request), or 6 and 6 (buffers further apart than any window), the
    engine learns the steps from the first request and polls through the
    rest of the run: two kicks in all."""
    peer = socket.socketpair()
    mine, theirs = peer
    guest = ChattyGuest(clock, work=work * MAX_ADAPTIVE_POLL_SECONDS, turnaround=after * MAX_ADAPTIVE_POLL_SECONDS,
                        buffers=30, peer=theirs)
    tick = clock.monotonic

    def monotonic() -> float:
        now = tick()
        guest.tick()
        return now

    monkeypatch.setattr(engine, "time", SimpleNamespace(monotonic=monotonic))
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn = polling_connection(guest, mine)
    conn._reading = True
    served: list[float] = []

    def serve(message: Any) -> None:
        served.append(clock.now)
        guest.replied()

    def readable() -> None:  # one request read, then dispatched as the engine does
        mine.recv(1)
        conn._dispatch(None)  # type: ignore[arg-type]

    conn.messages = 0
    conn._serve_request = serve  # type: ignore[method-assign]
    conn._readable = readable  # type: ignore[method-assign]
    sessions = []
    while guest.left > 0:
        if guest.requests:  # the engine went to sleep before the request: the event loop serves it
            clock.now = max(clock.now, guest.requests[0])
            guest.tick()
            readable()
            continue
        ring = next(v for v in guest.rings if v.queue.arrivals)  # type: ignore[union-attr]
        clock.now = max(clock.now, ring.queue.arrivals[0])  # type: ignore[union-attr]
        start = clock.now
        conn._poll(ring)
        sessions.append(clock.now - start)
        for fn, args in conn._later:  # type: ignore[attr-defined]
            fn(*args)
        conn._later.clear()  # type: ignore[attr-defined]
    assert guest.served == 30 and len(served) == 29
    assert len(sessions) <= 2, f"{len(sessions)} kicks for 30 buffers"
    assert conn.polled_requests >= 27
    mine.close()
    theirs.close()


def test_a_poll_that_loses_its_cpu_stops_and_kicks_go_back_on(clock, sock, monkeypatch):
    """A pass of the poll loop that took 0.55 ms served nothing: the daemon
    was descheduled, the host is short of CPU. Past --poll-us, polling stops
    there (kicks back on) rather than compete with the guest's threads; the
    run's next kick starts the adaptive window again."""
    guest = Guest(clock, turnaround=MAX_ADAPTIVE_POLL_SECONDS * 0.9, buffers=40)
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn = polling_connection(guest, sock)
    tick = clock.monotonic
    jumped: list[float] = []
    served_before = [0]

    def monotonic() -> float:
        arrivals = [t for v in guest.rings for t in v.queue.arrivals]  # type: ignore[union-attr]
        if (not jumped and guest.served >= 5 and guest.served == served_before[0]
                and clock.now - conn._last_returned > 1.2 * POLL and arrivals and min(arrivals) - clock.now > 0.0006):
            jumped.append(clock.now)  # well into the run, waiting for a buffer: descheduled for 0.55 ms
            clock.now += 0.00055
        served_before[0] = guest.served
        return tick()

    monkeypatch.setattr(engine, "time", SimpleNamespace(monotonic=monotonic))
    sessions = run_guest(conn, guest, clock)
    assert guest.served == 40
    assert conn.polls_preempted == 1
    assert len(sessions) == 3, f"{len(sessions)} kicks: polling went on after losing the CPU, or never resumed"


def test_the_operators_window_is_polled_even_without_the_cpu(clock, sock, monkeypatch):
    """Losing the CPU within --poll-us of the last buffer does not end the
    window the operator asked for (a daemon test pins kicks with a long one)."""
    guest = Guest(clock, turnaround=0.02, buffers=10)
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn = polling_connection(guest, sock)
    conn.poll_seconds = 0.05  # longer than the turnaround: every buffer caught
    tick = clock.monotonic
    calls = [0]

    def monotonic() -> float:
        calls[0] += 1
        if calls[0] % 50 == 0:
            clock.now += 0.001  # descheduled now and then
        return tick()

    monkeypatch.setattr(engine, "time", SimpleNamespace(monotonic=monotonic))
    sessions = run_guest(conn, guest, clock)
    assert guest.served == 10 and len(sessions) == 1 and conn.polls_preempted == 0


def chatty_run(clock, monkeypatch, guest: ChattyGuest, mine: socket.socket) -> tuple[VhostUserConnection, list[float]]:
    """Run `guest` to its end with the engine's own _readable (each read
    one request, dispatched as the engine does): a request the engine did
    not see while polling is served from the event loop. Returns the
    connection and the polling after each kick."""
    tick = clock.monotonic

    def monotonic() -> float:
        now = tick()
        guest.tick()
        return now

    monkeypatch.setattr(engine, "time", SimpleNamespace(monotonic=monotonic))
    conn = polling_connection(guest, mine)
    conn._reading = True

    def serve(message: Any) -> None:
        guest.replied()

    def read_once() -> bool:
        try:
            mine.recv(1, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        conn.messages += 1
        conn._dispatch(None)  # type: ignore[arg-type]
        return True

    conn._serve_request = serve  # type: ignore[method-assign]
    conn._read_once = read_once  # type: ignore[method-assign]
    sessions = []
    while guest.left > 0:
        if guest.requests:  # the engine went to sleep before the request: the event loop serves it
            clock.now = max(clock.now, guest.requests[0])
            guest.tick()
            conn._readable()
            continue
        ring = next(v for v in guest.rings if v.queue.arrivals)  # type: ignore[union-attr]
        q: Any = ring.queue
        assert q.kicks_on, "a buffer was due while kicks were off, yet the engine stopped looking"
        clock.now = max(clock.now, q.arrivals[0])
        start = clock.now
        conn._poll(ring)
        sessions.append(clock.now - start)
        for fn, args in conn._later:  # type: ignore[attr-defined]
            fn(*args)
        conn._later.clear()  # type: ignore[attr-defined]
    return conn, sessions


def test_a_request_in_a_run_polls_for_the_next_buffer(clock, monkeypatch):
    """A 256-page deflate in a TCG guest: 2 ms of work after each buffer
    (longer than any poll window), the config written, the next buffer
    0.25 ms after the reply. The request, served from the event loop,
    starts a poll that catches that buffer: one kick for the whole run,
    not one per buffer."""
    mine, theirs = socket.socketpair()
    guest = ChattyGuest(clock, work=2 * MAX_ADAPTIVE_POLL_SECONDS, turnaround=0.25 * MAX_ADAPTIVE_POLL_SECONDS,
                        buffers=30, peer=theirs)
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn, sessions = chatty_run(clock, monkeypatch, guest, mine)
    assert guest.served == 30
    assert len(sessions) == 1, f"{len(sessions)} kicks for 30 buffers"
    assert conn.polled_buffers == 29
    mine.close()
    theirs.close()


def test_a_request_long_after_the_last_buffer_starts_no_poll(clock, monkeypatch):
    """A guest whose requests come long after its buffers (an idle guest
    writing its config now and then) is not polled for on each request:
    every buffer is kicked, and a request costs no spinning."""
    mine, theirs = socket.socketpair()
    guest = ChattyGuest(clock, work=2 * RUN_GAP_SECONDS, turnaround=0.25 * MAX_ADAPTIVE_POLL_SECONDS,
                        buffers=10, peer=theirs)
    guest.rings[0].queue.arrivals.append(0.0)  # type: ignore[union-attr]
    conn, sessions = chatty_run(clock, monkeypatch, guest, mine)
    assert guest.served == 10
    assert len(sessions) == 10 and conn.polled_buffers == 0
    mine.close()
    theirs.close()
