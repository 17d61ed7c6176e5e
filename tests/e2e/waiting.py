"""Waiting for a condition in a real guest, with a failure that says what."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

MIB = 1 << 20


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 120.0, interval: float = 0.25) -> Any:
    """Poll until `predicate()` is truthy; fail with `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")
