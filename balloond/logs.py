"""Logging: structlog, JSON or console, every line bound to its VM.

`RateLimited` keeps a misbehaving guest from flooding the journal: the first
few occurrences of an event are logged, later ones are counted and reported
in one line when the window rolls over.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog


def configure(fmt: str = "console", level: str = "info") -> None:
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class RateLimited:
    """At most `burst` log lines per event key per `window` seconds."""

    def __init__(self, log: Any, burst: int = 5, window: float = 10.0) -> None:
        self.log = log
        self.burst = burst
        self.window = window
        self._state: dict[str, list[float | int]] = {}  # key -> [window start, logged, suppressed]

    def warning(self, event: str, **fields: Any) -> None:
        now = time.monotonic()
        state = self._state.get(event)
        if state is None or now - state[0] >= self.window:
            if state is not None and state[2]:
                self.log.warning(event + " (suppressed)", suppressed=state[2], window_seconds=self.window)
            state = self._state[event] = [now, 0, 0]
        if state[1] < self.burst:
            state[1] += 1
            self.log.warning(event, **fields)
        else:
            state[2] += 1
