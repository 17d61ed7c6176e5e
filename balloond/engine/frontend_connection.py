"""FrontendConnection: what a connection to one frontend is, whichever
engine serves it.

Both engines (the pure one in connection.py, libvhost-user's in
libvhost_user/connection.py) serve one frontend per connection with the same
life: `run` until the frontend goes away or the daemon stops, `close` once
with a reason (the API shows it), device calls that must not take the daemon
down, a device told once that it stopped, and CONFIG_CHANGE_MSG sent again
later when the backend channel was full. How messages are read and the
connection torn down is each engine's own (`_start_reading`, `_teardown`).
"""

from __future__ import annotations

import array
import asyncio
import socket
from collections.abc import Callable
from typing import Any

from ..logs import RateLimited
from .device_api import VirtioDevice

#: How soon a CONFIG_CHANGE_MSG that found the backend channel full is tried
#: again (seconds). Sends never wait: the frontend shares the socket's file
#: description and may have made it blocking.
BACKEND_RETRY_SECONDS = 0.5


class FrontendConnection:
    """The engine-independent part of a connection (see the module)."""

    # Set by each engine's __init__ before anything here runs.
    log: Any
    limited: RateLimited
    device: VirtioDevice
    started: bool
    close_reason: str | None
    backend_full: int
    acks_requested: int
    _loop: asyncio.AbstractEventLoop
    _closed: asyncio.Future[str]
    _backend_retry: asyncio.TimerHandle | None

    def _start_reading(self) -> None:
        """Start serving the frontend's messages from the event loop."""
        raise NotImplementedError

    def _teardown(self) -> None:
        """Release what the connection holds (the first close does this once)."""
        raise NotImplementedError

    def _after_teardown(self) -> None:
        """Runs after `_teardown`, even when it failed."""

    def config_changed(self) -> bool:
        raise NotImplementedError

    async def run(self) -> str:
        """Serve until the frontend goes away; return why the connection closed."""
        self._start_reading()
        self.log.info("frontend connected")
        try:
            return await self._closed
        finally:
            if self.close_reason is None:  # cancelled (daemon shutdown)
                self.close("daemon shutting down")

    @property
    def open(self) -> bool:
        return self.close_reason is None

    def close(self, reason: str, *, error: bool = False) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        (self.log.error if error else self.log.info)("frontend connection closed", reason=reason)
        try:
            self._teardown()
        except Exception:
            self.log.exception("error while closing the connection")
        finally:
            self._after_teardown()
            if not self._closed.done():
                self._closed.set_result(reason)

    def _safe_device_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Device code must not take the daemon down; a bug there is logged."""
        try:
            return fn(*args)
        except Exception:
            self.log.exception("device error", call=getattr(fn, "__name__", "?"))
            return None

    def _stop_all(self) -> None:
        if self.started:
            self.started = False
            self.log.info("device stopped")
            self._safe_device_call(self.device.stopped)

    def _backend_channel_full(self) -> None:
        """A CONFIG_CHANGE_MSG found no room: count it and send it again later."""
        self.backend_full += 1
        self.limited.warning("backend channel full; config change will be sent again",
                             retry_seconds=BACKEND_RETRY_SECONDS, times=self.backend_full)
        if self._backend_retry is None:
            self._backend_retry = self._loop.call_later(BACKEND_RETRY_SECONDS, self._retry_config_change)

    def _retry_config_change(self) -> None:
        """Send the change the full channel refused. The device also sends it
        again at the next start; a second notice only makes the driver read
        the config once more."""
        self._backend_retry = None
        self.config_changed()


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds a recvmsg() brought (SCM_RIGHTS), whoever must close them now."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds
