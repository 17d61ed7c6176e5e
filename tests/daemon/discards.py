"""What daemon-level tests need to know about deferred discards.

In the `deferred` discard mode (tests/daemon/conftest.py) the daemon runs
with its default --discard-delay-ms: with MUST_TELL_HOST, discards of
inflated frames may still be due for that long after the inflate was
acknowledged. A test that checks that a page the guest wrote survives must
look after that window has passed, or it would pass before the damage.
"""

from __future__ import annotations

import time

from balloond.services.config import Settings

#: The daemon's arguments per discard mode (the `discard_mode` fixture).
#: `deferred` passes nothing: the default delay is the one users get, so it
#: is the one tested.
DISCARD_MODES: dict[str, tuple[str, ...]] = {
    "immediate": ("--discard-delay-ms", "0"),
    "deferred": (),
}

#: The daemon's default discard delay, in seconds (what `deferred` runs with).
DEFAULT_DELAY = Settings().discard_delay_ms / 1000

#: Long enough that any discard deferred before it began has been done.
PAST_DEFERRAL = DEFAULT_DELAY + 0.1

#: How long a test waits for pending discards to be done: the default delay
#: with a wide margin for a loaded machine, still short enough to fail fast.
SETTLE_TIMEOUT = 3.0


def wait_past_deferral() -> None:
    """Sleep until every discard that could still be pending is due and done."""
    time.sleep(PAST_DEFERRAL)
