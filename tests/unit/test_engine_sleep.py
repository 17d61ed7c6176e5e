"""The engine's last step before it sleeps on a ring: ask for kicks again,
then look once more. A buffer the driver made available while kicks were
off was never announced, so without the second look it would wait for a
kick that never comes. The window is a few instructions wide, which no
test through real processes can hit on demand: this pins the order of the
three steps on the engine itself."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from balloond.engine.connection import VhostUserConnection
from balloond.engine.vring import Vring


class RecordingQueue:
    """The three ring operations `_sleep` uses, recorded in order."""

    def __init__(self, pending: int) -> None:
        self._pending = pending
        self.steps: list[str] = []

    def enable_kicks(self) -> None:
        self.steps.append("enable kicks")

    def disable_kicks(self) -> None:
        self.steps.append("disable kicks")

    def pending(self) -> int:
        self.steps.append("look")
        return self._pending


def sleeping_connection() -> tuple[VhostUserConnection, list[Any]]:
    scheduled: list[Any] = []
    conn = object.__new__(VhostUserConnection)  # only what _sleep touches
    conn._resuming = set()
    conn._loop = SimpleNamespace(call_soon=lambda fn, *args: scheduled.append((fn, args)))
    return conn, scheduled


@pytest.mark.parametrize("pending", [1, 3])
def test_a_buffer_made_available_while_kicks_were_off_is_served(pending: int) -> None:
    conn, scheduled = sleeping_connection()
    vring = Vring(0)
    vring.queue = RecordingQueue(pending)  # type: ignore[assignment]
    conn._sleep(vring)
    assert vring.queue.steps == ["enable kicks", "look", "disable kicks"]
    assert len(scheduled) == 1 and scheduled[0][1] == (vring,)  # served again from the loop


def test_an_empty_ring_sleeps_with_kicks_on() -> None:
    conn, scheduled = sleeping_connection()
    vring = Vring(0)
    vring.queue = RecordingQueue(0)  # type: ignore[assignment]
    conn._sleep(vring)
    assert vring.queue.steps == ["enable kicks", "look"]
    assert scheduled == []
