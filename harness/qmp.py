"""A synchronous facade over qemu.qmp's asyncio QMPClient.

Why a private event loop thread: tests are mostly synchronous, while some
(e.g. those that run the daemon in-process) have their own asyncio loop.
Running QMPClient on a loop of its own in a background thread serves both:
``command()`` blocks the caller, ``acommand()`` awaits from any other loop,
and neither can deadlock the other's loop.

Events are collected as they arrive and can be fetched with ``events()`` or
awaited with ``wait_event()``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import EventListener, QMPClient

from .errors import GuestError, GuestTimeout
from .loop_thread import LoopThread


class QmpSession:
    """One QMP connection to one QEMU process."""

    def __init__(self, name: str = "balloond-harness") -> None:
        self._thread = LoopThread("bd-qmp")
        self._client: QMPClient = self._call(self._make(QMPClient, name), timeout=10)
        self._events: list[dict[str, Any]] = []
        self._events_cond = threading.Condition()
        self._listener: EventListener | None = None
        self._pump: concurrent.futures.Future[None] | None = None

    @staticmethod
    async def _make(cls: Any, *args: Any) -> Any:
        """Instantiate asyncio-based objects on the session's own loop."""
        return cls(*args)

    def _call(self, coro: Any, timeout: float | None) -> Any:
        try:
            return self._thread.call(coro, timeout)
        except TimeoutError:
            raise GuestTimeout("QMP call timed out") from None

    def connect(
        self, path: str, timeout: float = 30.0, check: Callable[[], None] | None = None
    ) -> None:
        """Connect to QEMU's QMP unix socket, retrying until it exists.

        ``check`` is called between attempts and may raise to give up early
        (e.g. when the QEMU process has exited).
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._call(self._client.connect(path), timeout=10)
                break
            except Exception as exc:  # socket not there yet, refused, ...
                last = exc
                if check is not None:
                    check()
                time.sleep(0.1)
        else:
            raise GuestError(f"cannot connect to QMP at {path}: {last}")
        self._listener = self._call(self._make(EventListener), timeout=10)
        self._client.register_listener(self._listener)
        self._pump = self._thread.submit(self._pump_events())

    async def _pump_events(self) -> None:
        assert self._listener is not None
        async for event in self._listener:
            with self._events_cond:
                self._events.append(dict(event))
                self._events_cond.notify_all()

    @staticmethod
    def _arguments(args: dict[str, Any] | None, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        merged = dict(args or {})
        merged.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        return merged or None

    def command(
        self, name: str, args: dict[str, Any] | None = None, *, timeout: float = 60.0, **kwargs: Any
    ) -> Any:
        """Execute a QMP command; returns its "return" value.

        ``args`` is passed verbatim; keyword arguments are a convenience with
        "_" turned into "-" (``deflate_on_oom=True`` -> "deflate-on-oom").
        """
        return self._call(self._client.execute(name, self._arguments(args, kwargs)), timeout)

    async def acommand(
        self, name: str, args: dict[str, Any] | None = None, *, timeout: float = 60.0, **kwargs: Any
    ) -> Any:
        """Awaitable ``command`` usable from any other event loop."""
        fut = self._thread.submit(self._client.execute(name, self._arguments(args, kwargs)))
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)

    def events(self, clear: bool = True) -> list[dict[str, Any]]:
        """Events received so far (and forget them, by default)."""
        with self._events_cond:
            out = list(self._events)
            if clear:
                self._events.clear()
        return out

    def wait_event(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for (and consume) the first event called ``name``."""
        deadline = time.monotonic() + timeout
        with self._events_cond:
            while True:
                for i, ev in enumerate(self._events):
                    if ev.get("event") == name:
                        return self._events.pop(i)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestTimeout(f"no QMP event {name} within {timeout}s")
                self._events_cond.wait(remaining)

    def close(self) -> None:
        try:
            if self._pump is not None:
                self._pump.cancel()
            self._call(self._client.disconnect(), timeout=10)
        except Exception:
            pass
        self._thread.close()
