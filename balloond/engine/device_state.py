"""StateTransfer: the device's state through the pipe QEMU hands over.

VHOST_USER_PROTOCOL_F_DEVICE_STATE: when a VM migrates, QEMU asks the
stopped backend for its internal state (SET_DEVICE_STATE_FD, direction
save, with the write end of a pipe), reads the pipe to its end while the
backend writes, and then asks whether all went well (CHECK_DEVICE_STATE).
On the destination it passes the read end of a pipe (direction load),
writes the state into it, closes it and asks again.

Neither side may wait for the other inside a request: QEMU reads the save
pipe only after our reply to SET_DEVICE_STATE_FD, and writes the load pipe
while we keep serving its socket. So the pipe is served by the event loop
(a writer callback for save, a reader for load), never blocking: a pipe
holds 64 KiB, a state can be larger.

The frontend is not trusted: a load that goes past `max_bytes` fails (and
stops reading), and at CHECK_DEVICE_STATE a load pipe whose writer is still
open (nothing more to read, but no end of file either) fails instead of
waiting. A failure is reported at CHECK_DEVICE_STATE, which is how QEMU
learns of it; the migration then fails and the source keeps running.
"""

from __future__ import annotations

import asyncio
import os
from typing import Callable

#: Largest state accepted from a load pipe (bytes).
MAX_STATE_BYTES = 64 << 20

#: Bytes moved per pipe read or write.
CHUNK = 1 << 16


class StateTransfer:
    """One transfer: `save` writes `data` into `fd`; `load` reads `fd` to
    its end and hands the bytes to `on_loaded`, which raises ValueError for
    a state it refuses."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        *,
        data: bytes | None = None,
        on_loaded: Callable[[bytes], None] | None = None,
        max_bytes: int = MAX_STATE_BYTES,
    ) -> None:
        self.loop = loop
        self.fd: int | None = fd
        self.saving = data is not None
        self._out = memoryview(data) if data is not None else memoryview(b"")
        self._in = bytearray()
        self._on_loaded = on_loaded
        self.max_bytes = max_bytes
        #: None while under way; then "" (success) or why it failed.
        self.result: str | None = None
        self.transferred = 0
        try:
            os.set_blocking(fd, False)
            if self.saving:
                loop.add_writer(fd, self._writable)
            else:
                loop.add_reader(fd, self._readable)
        except (OSError, ValueError) as exc:
            self._finish(f"state pipe unusable: {exc}")

    # ------------------------------------------------------------ progress

    def _writable(self) -> None:
        while self._out and self.fd is not None:
            try:
                sent = os.write(self.fd, self._out[:CHUNK])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EPIPE: QEMU closed its end
                self._finish(f"writing the state failed: {exc}")
                return
            self._out = self._out[sent:]
            self.transferred += sent
        self._finish("")

    def _readable(self) -> None:
        while self.fd is not None:
            try:
                data = os.read(self.fd, CHUNK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._finish(f"reading the state failed: {exc}")
                return
            if not data:
                self._loaded()
                return
            self._in += data
            self.transferred += len(data)
            if len(self._in) > self.max_bytes:
                self._finish(f"state larger than {self.max_bytes} bytes")
                return

    def _loaded(self) -> None:
        assert self._on_loaded is not None
        try:
            self._on_loaded(bytes(self._in))
        except ValueError as exc:
            self._finish(f"state refused: {exc}")
            return
        except Exception as exc:  # a device bug must not escape into the event loop
            self._finish(f"device error adopting the state: {exc!r}")
            return
        self._finish("")

    def _finish(self, result: str) -> None:
        if self.result is None:
            self.result = result
        self._in = bytearray()
        if self.fd is not None:
            fd, self.fd = self.fd, None
            for remove in (self.loop.remove_reader, self.loop.remove_writer):
                try:
                    remove(fd)
                except (OSError, ValueError):
                    pass
            try:
                os.close(fd)
            except OSError:
                pass

    # -------------------------------------------------------------- ending

    def check(self) -> str:
        """CHECK_DEVICE_STATE: "" if the transfer completed, else why not.

        A load still under way is finished now if its writer has closed
        (all it wrote is in the pipe); a save still under way, or a load
        whose writer is still open, has failed: QEMU asks only once it
        has read or written everything."""
        if self.result is None and not self.saving:
            self._readable()
            if self.result is None:
                self._finish("the state pipe's writer did not close before CHECK_DEVICE_STATE")
        if self.result is None:
            self._finish("the state was not all read before CHECK_DEVICE_STATE")
        assert self.result is not None
        return self.result

    def cancel(self, reason: str = "cancelled") -> None:
        self._finish(reason)
