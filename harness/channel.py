"""The host side of the guest command channel (the guest tool's "agent").

Why a dedicated channel: the kernel console (ttyS0) carries boot and kernel
messages that may appear at any moment; commands run on a second serial port
(ttyS1) that only the agent writes to.  The agent reads framed requests, so
there is no terminal echo, line editing or prompt to strip, and each reply is
bracketed by markers carrying a unique id: a late reply to a command that
timed out on the host can never be mistaken for the current one.

Wire format: see harness/guest-tools/guesttool.c (agent).
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time
from pathlib import Path

from .errors import GuestError, GuestTimeout

RS = b"\x1e"  # record separator: starts every marker line
READY = RS + b"BD-READY\n"


class CommandChannel:
    """Runs shell commands in the guest over a connected stream socket.

    A reader thread copies everything the guest sends into a transcript file
    and an in-memory buffer; callers wait on that buffer for their markers.
    """

    def __init__(self, sock: socket.socket, transcript: Path) -> None:
        self._sock = sock
        self._log = open(transcript, "ab", buffering=0)
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._ids = itertools.count(1)
        self._prefix = os.urandom(3).hex()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name="bd-channel", daemon=True)
        self._reader.start()

    # -- reader ------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    break
                self._log.write(data)
                with self._cond:
                    self._buf += data
                    self._cond.notify_all()
        except OSError:
            pass
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def _wait_for(self, pattern: re.Pattern[bytes], deadline: float) -> re.Match[bytes]:
        with self._cond:
            while True:
                m = pattern.search(self._buf)
                if m:
                    return m
                if self._closed:
                    raise GuestError("command channel closed (guest died or powered off)")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestTimeout("timed out waiting for the guest")
                self._cond.wait(remaining)

    # -- API ---------------------------------------------------------------
    def wait_ready(self, timeout: float) -> None:
        """Block until the agent announced itself."""
        m = self._wait_for(re.compile(re.escape(READY)), time.monotonic() + timeout)
        with self._cond:
            end = m.end()
            del self._buf[:end]

    def run(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run ``command`` with /bin/sh in the guest; return (status, output).

        ``timeout`` is enforced in the guest (the command's process group is
        killed and status 124 returned); the host waits a little longer to
        allow for a slow emulated guest, then raises GuestTimeout.
        """
        cid = f"{self._prefix}-{next(self._ids)}"
        script = command.encode()
        if not script.endswith(b"\n"):
            script += b"\n"
        header = f"RUN {cid} {timeout:.3f} {len(script)}\n".encode()
        end = re.compile(
            re.escape(RS + b"BD-BEGIN " + cid.encode() + b"\n")
            + rb"(.*?)\n"
            + re.escape(RS + b"BD-END " + cid.encode() + b" ")
            + rb"(-?\d+)\n",
            re.S,
        )
        with self._send_lock:
            try:
                self._sock.sendall(header + script)
            except OSError as exc:
                raise GuestError(f"command channel write failed: {exc}") from exc
        host_deadline = time.monotonic() + timeout * 1.5 + 30
        try:
            m = self._wait_for(end, host_deadline)
        except GuestTimeout:
            raise GuestTimeout(f"guest command timed out after {timeout}s: {command!r}") from None
        # Groups must be read before the buffer (which the match refers to)
        # is trimmed.  Anything before our BEGIN marker is late output of
        # earlier commands (it is in the transcript) and is dropped.
        with self._cond:
            output = m.group(1).decode(errors="replace")
            status = int(m.group(2))
            del self._buf[: m.end()]
        return status, output

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=5)
        self._log.close()

    @property
    def closed(self) -> bool:
        return self._closed
