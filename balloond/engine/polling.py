"""PollingConnection: how a connection keeps looking at its rings after a kick,
whichever engine serves it.

Latency is throughput for a driver that waits for each buffer (Linux's
moves a ballooned page with an inflate and then a deflate, each waited for;
its 256-frame buffers come one at a time, with a config write between
them). Every step that finds the daemon asleep waits for a wake-up, so after
a kick the connection keeps looking, kicks off, at the kicked ring, the
rings whose buffers can come next (the device's `poll_partners`) and the
frontend's socket, for a window that follows the guest's turnaround while
round trips keep coming (docs/architecture.md, "Polling").

The window and the loop are here once; each engine says how to look at one
of its rings and at its socket (the hooks at the end of the class).
"""

from __future__ import annotations

import select
import time
from typing import Any

from .frontend_connection import FrontendConnection

#: The longest one kick keeps the event loop (seconds), polling its ring
#: whatever --poll-us says about the gaps between buffers; a ring still not
#: empty then is served again after the other connections' callbacks.
MAX_POLL_BURST = 0.01

#: Once polling has caught a buffer (the guest is in a run of round trips:
#: a stock driver's page migrations, or its 256-PFN buffers one after the
#: other), the window after each further buffer is at least this long
#: (seconds): a guest's next buffer takes longer than --poll-us to come back
#: when it needs an interrupt delivered and a thread woken first. The window
#: ends this long after the last buffer, so an idle guest costs nothing.
ROUNDTRIP_POLL_SECONDS = 0.001

#: The adaptive window's ceiling (seconds). While buffers and requests keep
#: coming, each no later than this after the last buffer or reply went back,
#: the window after one stretches to cover the guest's recent turnarounds
#: (`_window`), so a run whose steps take longer than --poll-us (a migration
#: half that needs an interrupt delivered and a thread woken first) needs no
#: kick. A gap longer than this ends the run: the next window is --poll-us.
#: Measured on a 2-core host with other VMs running, 5 ms (enough to poll
#: through a stock driver's whole 256-frame cycle in a TCG guest) made
#: deflate slower and doubled the daemon's CPU: the spinning daemon was in
#: the way of the guest's own threads. 1 ms did not.
MAX_ADAPTIVE_POLL_SECONDS = 0.001

#: A request served from the event loop within this long (seconds) of the
#: last buffer of a polled group is the guest between two buffers of a run
#: (Linux's driver writes `actual` after each, then makes the next): the
#: group is polled for the next one (ROUNDTRIP_POLL_SECONDS), which then
#: needs no kick and no wake-up. Longer than the guest's work between two
#: buffers (about 2 ms for a 256-page deflate in a TCG guest with page
#: poisoning), short enough that a request of an idle guest starts nothing.
RUN_GAP_SECONDS = 0.01

#: How much of the longest recent turnaround the adaptive window keeps per
#: buffer (it follows a slower guest at once and a faster one gradually).
TURNAROUND_DECAY = 0.875

#: The window is this multiple of the turnaround estimate: the wait after
#: a buffer varies from one to the next.
TURNAROUND_MARGIN = 1.5

#: A look at the rings takes microseconds: a pass of the poll loop that
#: served nothing yet took longer than this (seconds) means the daemon lost
#: its CPU meanwhile. The host is short of CPU, and a spinning daemon is then
#: both in the way of the guest's threads (its vCPU, QEMU's main loop, which
#: delivers our interrupts) and slow to see a buffer, since a task that has
#: used its share runs after one just woken. So polling stops there (once
#: --poll-us after the last buffer has passed: only what the daemon added on
#: its own is given up) and kicks go back on: the guest's next buffer wakes
#: the daemon, as a sleeper.
PREEMPTED_SECONDS = 0.0005
#: How often (seconds) a connection looks for a buffer left waiting while
#: it sleeps with the guest's kicks on. Every way out of a poll window turns
#: kicks on and looks at the ring once more, so such a buffer means a kick
#: was lost somewhere between the guest and this loop; the guest's driver
#: would wait for it for ever, holding its balloon lock. A ring found with
#: the same buffers waiting at two looks in a row (one look could meet a
#: kick still on its way) is served then, counted (`lost_kicks`) and
#: logged: a lost kick costs the guest at most two intervals, and the
#: operator sees that it happened. Buffers the device leaves waiting on
#: purpose (before it starts) are not taken: only a pass that served some
#: counts. One timer per connection; an idle guest's rings are empty and
#: the look is a few index reads.
LOST_KICK_CHECK_SECONDS = 1.0


class PollingConnection(FrontendConnection):
    """A FrontendConnection with the poll window and loop (see the module).
    Each engine's connection calls `_init_polling` in its __init__, `_poll`
    when a ring is kicked and `_poll_after_requests` after it has read
    requests from the event loop, and provides the hooks at the end."""

    # Set by the engine's connection.
    vrings: dict[int, Any]
    messages: int

    def _init_polling(self, poll_seconds: float) -> None:
        self.poll_seconds = poll_seconds
        #: Buffers found by polling (each one a kick the guest did not need).
        self.polled_buffers = 0
        #: Requests served while polling (each one a wake-up the frontend did not wait for).
        self.polled_requests = 0
        #: Poll windows ended early because the daemon lost its CPU (PREEMPTED_SECONDS).
        self.polls_preempted = 0
        # The adaptive poll window (see `_window`): when a buffer of a polled
        # group was last handed back, and the longest recent wait after one.
        self._last_returned = float("-inf")
        self._turnaround = 0.0
        #: The ring whose group was polled last, and when a buffer of it was
        #: last served (see RUN_GAP_SECONDS); set while a poll is running.
        self._run_ring: Any = None
        self._run_buffer_at = float("-inf")
        self._polling = False
        self._resuming: set[int] = set()  # rings with a _resume scheduled
        #: Buffers found waiting on a sleeping ring with no kick to wake us (see LOST_KICK_CHECK_SECONDS).
        self.lost_kicks = 0
        self._waiting_at: dict[int, int] = {}  # ring -> last_avail when buffers were last seen waiting
        self._loop.call_later(LOST_KICK_CHECK_SECONDS, self._look_for_lost_kicks)  # stops once closed

    def _poll_after_requests(self, served_before: int) -> None:
        """Requests were just read from the event loop: one in the middle of
        a run of buffers (within RUN_GAP_SECONDS of the last) starts a poll of
        the run's rings for the next buffer."""
        ring = self._run_ring
        if (self.messages != served_before and not self._polling and ring is not None and self.open
                and time.monotonic() - self._run_buffer_at < RUN_GAP_SECONDS
                and ring.enabled and self._ring_live(ring) and self.vrings.get(ring.index) is ring):
            self._poll(ring, serve_first=False)

    def _request_starts(self) -> None:
        """A request is the guest at work between two buffers (Linux writes
        `actual` and reads `num_pages` after each), its vCPU waiting for the
        reply: a round trip like a buffer's, for the poll window."""
        self._buffer_came(time.monotonic())

    def _request_done(self) -> None:
        self._last_returned = time.monotonic()

    def _poll(self, vring: Any, *, serve_first: bool = True) -> None:
        """Serve the ring, then keep looking at it and at the rings whose
        buffers can come next (`_poll_group`) until no buffer has come for
        a window (`_window`), with the guest's kicks off on all of them
        meanwhile, then sleep. Latency is throughput for a driver that waits
        for each buffer: Linux's moves a ballooned page with an inflate on
        one ring and then a deflate on the other, each waited for, so
        watching only the kicked ring would make every second half of a
        migration wait for a kick. The frontend's requests are served
        meanwhile too: QEMU's vCPU waits for each (the driver reads and
        writes the config between buffers). Without `serve_first` (a
        request came in a run) it only watches the group for the next
        buffer."""
        if self.poll_seconds <= 0 or not self._ring_live(vring):
            if serve_first:
                self._service(vring)
            self._sleep(vring)
            return
        self._polling = True
        try:
            self._poll_group_for_buffers(vring, serve_first)
        finally:
            self._polling = False

    def _poll_group_for_buffers(self, vring: Any, serve_first: bool) -> None:
        group = self._poll_group(vring)
        # Kicks off before the buffer goes back: a driver answered at once
        # must not find them still asked for (without EVENT_IDX it would).
        for ring in group:
            self._set_kicks(ring, False)
        adaptive = len(group) > 1  # a group whose buffers come one after the other
        now = time.monotonic()
        if serve_first:
            if adaptive:
                self._buffer_came(now)
            self._service(vring)
            now = time.monotonic()
            if adaptive:
                self._last_returned = self._run_buffer_at = now
                self._run_ring = vring
        window = self._window(caught=not serve_first)
        deadline = now + window
        # What the daemon added to --poll-us on its own (the adaptive part):
        # that much it gives up when it loses the CPU (PREEMPTED_SECONDS);
        # the window the operator asked for it always polls.
        window_extension = window - self.poll_seconds
        # Never longer than MAX_POLL_BURST in one go, however busy the
        # rings: every other VM waits meanwhile (a guest whose used ring
        # overlaps its avail index is never empty; found by fuzzing).
        give_up = now + MAX_POLL_BURST
        requests = select.poll()
        requests.register(self._request_fd(), select.POLLIN)
        while now < deadline:
            served = False
            looked = now
            buffers_before = self.polled_buffers
            if self._requests_wanted() and requests.poll(0):
                self.polled_requests += 1
                self._readable()
                if not self.open:
                    return
                served = True
            for ring in group:
                if not (ring.enabled and self._ring_pending(ring)):
                    continue  # (a request just served may have stopped it)
                if now >= give_up:
                    # Kicks stay off on the busy rings: we are coming back.
                    for other in group:
                        if self._ring_pending(other):
                            self._continue_later(other)
                        else:
                            self._sleep(other)
                    return
                if adaptive and not served:
                    self._buffer_came(now)
                served = True
                self._service(ring)
                self.polled_buffers += 1
            now = time.monotonic()
            if served:
                if adaptive:
                    self._last_returned = now
                    if self.polled_buffers != buffers_before:
                        self._run_buffer_at, self._run_ring = now, vring
                window = self._window(caught=True)
                deadline = now + window
                window_extension = window - self.poll_seconds
            elif now - looked > PREEMPTED_SECONDS and 0 < deadline - now < window_extension:
                self.polls_preempted += 1
                break
        for ring in group:
            self._sleep(ring)

    def _buffer_came(self, now: float) -> None:
        """A buffer of a polled group arrived (kicked or caught by polling),
        or a request while polling: how long after the last buffer or reply
        went back is the guest's turnaround. A run of round trips keeps the
        longest recent one (decaying); a gap longer than
        MAX_ADAPTIVE_POLL_SECONDS means the run had ended."""
        gap = now - self._last_returned
        if gap < MAX_ADAPTIVE_POLL_SECONDS:
            self._turnaround = max(gap, self._turnaround * TURNAROUND_DECAY)
        else:
            self._turnaround = 0.0

    def _window(self, *, caught: bool) -> float:
        """How long to keep looking after a buffer (seconds): --poll-us, at
        least ROUNDTRIP_POLL_SECONDS once polling has caught one, and while
        round trips keep coming, enough for the guest's recent turnarounds
        (at most MAX_ADAPTIVE_POLL_SECONDS). An idle guest's kick gets
        --poll-us: the estimate is dropped when a gap exceeds the ceiling."""
        window = max(self.poll_seconds, ROUNDTRIP_POLL_SECONDS) if caught else self.poll_seconds
        if self._turnaround:
            window = max(window, min(MAX_ADAPTIVE_POLL_SECONDS, self._turnaround * TURNAROUND_MARGIN))
        return window

    def _poll_group(self, vring: Any) -> list[Any]:
        """The kicked ring first, then the other live rings whose buffers the
        device says can follow it (all of them if the device does not say)."""
        partners = getattr(self.device, "poll_partners", None)
        if partners is None:
            indices: Any = [i for i in self.vrings if i != vring.index]
        else:
            indices = self._safe_device_call(partners, vring.index) or ()
        group = [vring]
        for index in indices:
            ring = self.vrings.get(index)
            if ring is not None and ring is not vring and ring.enabled and self._ring_live(ring) and ring not in group:
                group.append(ring)
        return group

    def _sleep(self, vring: Any) -> None:
        """Ask for the next kick, then look once more: a buffer added while
        kicks were off would otherwise wait for one that never comes."""
        if not self._ring_live(vring):
            return
        self._set_kicks(vring, True)
        if self._ring_pending(vring):
            self._set_kicks(vring, False)
            self._continue_later(vring)

    def _look_for_lost_kicks(self) -> None:
        """The periodic look of LOST_KICK_CHECK_SECONDS."""
        if not self.open:
            return
        self._loop.call_later(LOST_KICK_CHECK_SECONDS, self._look_for_lost_kicks)  # stops once closed
        waiting_at: dict[int, int] = {}
        for index, ring in list(self.vrings.items()):
            if not self.open:
                return
            if (index in self._resuming or not ring.enabled
                    or not self._ring_live(ring) or not self._ring_pending(ring)):
                continue
            position = ring.last_avail
            if self._waiting_at.get(index) != position:
                waiting_at[index] = position  # maybe a kick on its way: look again next time
                continue
            self._poll(ring)
            if ring.last_avail != position:  # servable, so only a kick was missing
                self.lost_kicks += 1
                self.limited.warning("buffers waited without a kick; serving them", queue=index,
                                     waited_s=2 * LOST_KICK_CHECK_SECONDS, lost_kicks=self.lost_kicks)
        self._waiting_at = waiting_at

    def _continue_later(self, vring: Any) -> None:
        """Serve the ring again from the event loop, after everyone else."""
        if vring.index not in self._resuming:
            self._resuming.add(vring.index)
            self._loop.call_soon(self._resume, vring)

    def _resume(self, vring: Any) -> None:
        self._resuming.discard(vring.index)
        if self.open and vring.enabled and self._ring_live(vring) and self.vrings.get(vring.index) is vring:
            self._poll(vring)


    # ============================================= what each engine provides

    def _ring_live(self, ring: Any) -> bool:
        """The ring is mapped and running: it can be looked at and served."""
        raise NotImplementedError

    def _ring_pending(self, ring: Any) -> bool:
        """Buffers wait on the ring (a ring in a state the next pass will
        refuse counts as empty)."""
        raise NotImplementedError

    def _set_kicks(self, ring: Any, on: bool) -> None:
        """Ask the driver for kicks on the ring (on), or tell it they are not needed."""
        raise NotImplementedError

    def _service(self, ring: Any) -> None:
        """One pass of the device over the ring."""
        raise NotImplementedError

    def _request_fd(self) -> int:
        """The frontend's socket, polled for requests."""
        raise NotImplementedError

    def _requests_wanted(self) -> bool:
        """Whether requests are read now (not while replies are held back)."""
        raise NotImplementedError

    def _readable(self) -> None:
        """Read and serve what the frontend sent."""
        raise NotImplementedError
