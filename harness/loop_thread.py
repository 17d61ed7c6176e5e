"""LoopThread: an asyncio event loop on a thread of its own.

Synchronous code -- the harness and the tests -- drives asyncio objects that
must all live on one loop (a QMP client, a fake QMP server, the daemon's
services run in-process); this is that loop, and the one way to hand it work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any


class LoopThread:
    def __init__(self, name: str = "loop") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Start `coro` on the loop; its future, without waiting."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 10.0) -> Any:
        """Run `coro` on the loop and wait for its result (TimeoutError, and
        the coroutine cancelled, after `timeout` seconds)."""
        fut = self.submit(coro)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float | None = 10.0) -> Any:
        """Call the plain function fn(*args) on the loop's thread (the safe
        way to touch what lives there) and return its result."""

        async def call() -> Any:
            return fn(*args)

        return self.call(call(), timeout)

    def close(self, timeout: float = 5.0) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout)
        if not self.loop.is_running():
            self.loop.close()
