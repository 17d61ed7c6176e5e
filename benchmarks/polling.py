"""The wait every benchmark here does between steps: look at a condition
until it holds, and say how long that took (the figure some of them
report), or end the run with one line naming what never happened."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> float:
    """Seconds until `predicate()` is truthy, looking every `interval`;
    SystemExit after `timeout`. The interval bounds how finely a time to
    target is measured."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - t0
