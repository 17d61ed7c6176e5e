"""FrontendConnection: what a connection to one frontend is, whichever
engine serves it.

Both engines (the pure one in connection.py, libvhost-user's in
libvhost_user/connection.py) serve one frontend per connection with the same
life: `run` until the frontend goes away or the daemon stops, `close` once
with a reason (the API shows it), device calls that must not take the daemon
down, a device told once that it stopped, and CONFIG_CHANGE_MSG sent again
later when the backend channel was full, and a live migration's device
state moved through the pipe QEMU hands over (SET_DEVICE_STATE_FD,
CHECK_DEVICE_STATE: `_start_state_transfer`, `_check_state_transfer`). How
messages are read and the connection torn down is each engine's own
(`_start_reading`, `_teardown`).
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any

from protocol import vhost_user as vu

from ..logs import RateLimited
from .device_api import VirtioDevice
from .device_state import StateTransfer

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
    #: The device state transfer under way or last done (None: none yet).
    state_transfer: StateTransfer | None
    #: Whether VHOST_F_LOG_ALL is on (the frontend is migrating the VM).
    logging: bool
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

    # ============================================= device state (migration)

    def _start_state_transfer(self, request: vu.DeviceStateFd, negotiated: bool) -> int:
        """SET_DEVICE_STATE_FD: start a save or load of the device's state
        through the pipe end `request.fd` (ours from here, closed if refused).
        Returns the reply's value: bit 8 (no fd of ours in return), plus 1
        if the transfer is refused. `negotiated`: DEVICE_STATE was."""
        if self.state_transfer is not None:
            self.state_transfer.cancel("a new transfer started")
            self.state_transfer = None
        save: Callable[[], bytes] | None = getattr(self.device, "save_state", None)
        load: Callable[[bytes], None] | None = getattr(self.device, "load_state", None)
        refused = None
        if not negotiated:
            refused = "DEVICE_STATE not negotiated"
        elif request.phase != vu.STATE_PHASE_STOPPED:
            refused = f"unknown transfer phase {request.phase}"
        elif request.direction not in (vu.STATE_DIRECTION_SAVE, vu.STATE_DIRECTION_LOAD):
            refused = f"unknown transfer direction {request.direction}"
        elif save is None or load is None:
            refused = "the device keeps no state to transfer"
        if refused is not None:
            _close_fd(request.fd)
            self.log.warning("device state transfer refused", reason=refused)
            return vu.VRING_NOFD_MASK | 1
        assert save is not None and load is not None
        if request.direction == vu.STATE_DIRECTION_SAVE:
            data = self._safe_device_call(save)
            if not isinstance(data, bytes):
                _close_fd(request.fd)
                return vu.VRING_NOFD_MASK | 1
            self.state_transfer = StateTransfer(self._loop, request.fd, data=data)
            self.log.info("device state save started", state_bytes=len(data))
        else:
            self.state_transfer = StateTransfer(self._loop, request.fd, on_loaded=load)
            self.log.info("device state load started")
        return vu.VRING_NOFD_MASK

    def _check_state_transfer(self) -> int:
        """CHECK_DEVICE_STATE: the reply's value, 0 if the transfer completed."""
        transfer, self.state_transfer = self.state_transfer, None
        if transfer is None:
            self.log.warning("CHECK_DEVICE_STATE without a transfer")
            return 1
        result = transfer.check()
        if result:
            self.log.error("device state transfer failed", reason=result, bytes=transfer.transferred)
            return 1
        self.log.info("device state transfer done", saved=transfer.saving, bytes=transfer.transferred)
        return 0

    def _cancel_state_transfer(self, reason: str) -> None:
        if self.state_transfer is not None:
            self.state_transfer.cancel(reason)

    def _set_logging(self, on: bool) -> None:
        """VHOST_F_LOG_ALL turned on or off: the engine's rings log their
        used-ring writes meanwhile (`_logging_changed`); the device is told."""
        if on == self.logging:
            return
        self.logging = on
        self._logging_changed(on)
        changed = getattr(self.device, "logging_changed", None)
        if changed is not None:
            self._safe_device_call(changed, on)

    def _logging_changed(self, on: bool) -> None:
        """The engine's part of `_set_logging` (before the device hears)."""

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


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds a recvmsg() brought (SCM_RIGHTS), whoever must close them now."""
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds
