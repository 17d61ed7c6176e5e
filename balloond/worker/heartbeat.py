"""Heartbeat: when the supervisor may call a worker hung.

A worker reports at least every second (process.STATUS_INTERVAL); one that
sends nothing for `timeout` seconds is hung, and the supervisor kills it
and starts another. Killing a worker is not free: its VM's frontend loses
the connection (QEMU reconnects; a frontend without reconnect loses its
balloon). So only silence the supervisor was there to hear counts.

A supervisor that was not running when the deadline passed — the process
stopped, starved of CPU, or the whole host suspended or paused — has heard
nothing, whatever the worker did: its messages wait unread in the channel,
or the worker was stopped with it. Before this rule a supervisor stopped
for longer than the timeout killed every healthy worker when it resumed.
The rule: when the deadline's timer fires more than LATE_GRACE late, the
supervisor was away; the worker gets a full `timeout` from then. A timer
on time with nothing heard is silence, but the verdict waits one more turn
of the event loop: a message read in the turn the timer fired is taken
first (asyncio runs the timer before the reader it woke).

`judge` is the rule, with no I/O; `Heartbeat` runs it on an event loop.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

#: A deadline timer that fires this much late (seconds) means the
#: supervisor itself did not run at the deadline. An event loop with work
#: to do fires timers within milliseconds; a supervisor late by more than
#: this was stopped or starved, and a verdict then would be about itself.
LATE_GRACE = 0.5


class Verdict(enum.Enum):
    HEARD = "heard"  # a message came within the timeout: watch on
    AWAY = "away"  # the supervisor was not running at the deadline: a full timeout from now
    SILENT = "silent"  # nothing heard for the timeout, on time: hung, once a last turn took nothing


def judge(now: float, due: float, last_heard: float, timeout: float, late_grace: float = LATE_GRACE) -> Verdict:
    """What a deadline timer set for `due` and firing at `now` says about a
    worker last heard at `last_heard`."""
    if now - last_heard < timeout:
        return Verdict.HEARD
    if now - due > late_grace:
        return Verdict.AWAY
    return Verdict.SILENT


class Heartbeat:
    """Watches one worker's channel: `beat` at every message; `hung` is
    done when the worker is hung (see the module). One timer, moved only
    when it fires, not at every message."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float,
                 on_away: Callable[[float], None] | None = None) -> None:
        self._loop = loop
        self.timeout = timeout
        self.last_heard = loop.time()
        #: Messages taken (the last turn before a verdict looks whether it grew).
        self.heard = 0
        #: Deadlines the supervisor came back to late (each one a kill it did not make).
        self.away = 0
        self._on_away = on_away
        self.hung: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._arm(self.last_heard + timeout)

    def beat(self) -> None:
        """A message from the worker was taken."""
        self.last_heard = self._loop.time()
        self.heard += 1

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, due: float) -> None:
        if self._closed:
            return
        self._timer = self._loop.call_at(due, self._fired, due)

    def _fired(self, due: float) -> None:
        now = self._loop.time()
        verdict = judge(now, due, self.last_heard, self.timeout)
        if verdict is Verdict.HEARD:
            self._arm(self.last_heard + self.timeout)
        elif verdict is Verdict.AWAY:
            self.away += 1
            if self._on_away is not None:
                self._on_away(now - due)
            self.last_heard = now
            self._arm(now + self.timeout)
        else:
            self._timer = None
            self._loop.call_soon(self._last_turn, self.heard)

    def _last_turn(self, heard_before: int) -> None:
        if self._closed or self.hung.done():
            return
        if self.heard != heard_before:
            self._arm(self.last_heard + self.timeout)
        else:
            self.hung.set_result(None)
