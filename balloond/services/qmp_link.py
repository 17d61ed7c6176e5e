"""QmpLink: one VM's QEMU monitor (QMP), for its run state.

When a VM is configured with `qmp=PATH` the daemon keeps a QMP connection
to that socket (qemu.qmp's asyncio QMPClient, on the daemon's own loop) and
tracks whether the guest runs: `query-status` on connect and again after
every event that can change it (STOP, RESUME, MIGRATION, ...). QEMU may not be
there yet, or may restart: the link retries with a capped backoff and never
blocks the event loop. The policy leaves a VM whose run state is known and not
"running" alone (paused, inmigrate, postmigrate, finish-migrate, ...).

QEMU serves one client per `-qmp` socket: give the daemon a socket of its own.

    link = QmpLink("/run/qemu/web1.qmp", log=log)
    task = link.start()
    link.connected, link.running, link.status   # None while unknown
    await link.stop()
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from qemu.qmp import EventListener, QMPClient
from qemu.qmp.protocol import Runstate

#: Events after which the run state may have changed: ask QEMU again.
STATE_EVENTS = (
    "STOP", "RESUME", "MIGRATION", "RESET", "SUSPEND", "WAKEUP", "SHUTDOWN",
    "POWERDOWN", "GUEST_PANICKED", "BLOCK_IO_ERROR", "WATCHDOG",
)


class QmpLink:
    def __init__(
        self,
        path: str,
        *,
        name: str = "balloond",
        log: Any = None,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        self.path = path
        self.name = name
        self.log = log or structlog.get_logger()
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connected = False
        self.running: bool | None = None
        self.status: str | None = None
        self.connects = 0
        self.last_error: str | None = None
        self.updated_at: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: QMPClient | None = None

    # ----------------------------------------------------------------- reading

    def summary(self) -> dict[str, Any]:
        return {"qmp_connected": self.connected, "run_state": self.status}

    # ----------------------------------------------------------------- the task

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"balloond-qmp-{self.path}")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        delay = self.backoff_initial
        while True:
            try:
                had = await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - not there yet, refused, dropped, a bad reply...
                had = False
                error = f"{type(exc).__name__}: {exc}"
                if error != self.last_error:
                    self.log.info("qmp not connected", path=self.path, error=error)
                self.last_error = error
            finally:
                self._forget()
            if had:
                delay = self.backoff_initial  # a session that worked: retry soon
            await asyncio.sleep(delay)
            delay = min(self.backoff_max, delay * 2)

    def _forget(self) -> None:
        self.connected = False
        self.running = None
        self.status = None

    async def _session(self) -> bool:
        """One connection, until QEMU goes; True if it got as far as a status."""
        client = QMPClient(self.name)
        self._client = client
        listener = EventListener(names=STATE_EVENTS)
        client.register_listener(listener)
        pump: asyncio.Task[None] | None = None
        try:
            await client.connect(self.path)
            await self._refresh(client)
            self.connected = True
            self.connects += 1
            self.last_error = None
            self.log.info("qmp connected", path=self.path, run_state=self.status)
            pump = asyncio.create_task(self._pump(client, listener))
            while client.runstate == Runstate.RUNNING and not pump.done():
                changed = asyncio.ensure_future(client.runstate_changed())
                await asyncio.wait({changed, pump}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
            if pump.done() and not pump.cancelled() and pump.exception() is not None:
                raise pump.exception()  # type: ignore[misc]
            self.log.info("qmp disconnected", path=self.path)
            return True
        finally:
            if pump is not None:
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
            client.remove_listener(listener)
            try:
                await client.disconnect()
            except Exception as exc:  # noqa: BLE001 - it re-raises what ended the session
                self.log.debug("qmp session ended", path=self.path, error=f"{type(exc).__name__}: {exc}")
            self._client = None

    async def _pump(self, client: QMPClient, listener: EventListener) -> None:
        async for event in listener:
            self.log.info("qmp event", path=self.path, qmp_event=event.get("event"))
            await self._refresh(client)

    async def _refresh(self, client: QMPClient) -> None:
        reply = await client.execute("query-status")
        status = str(reply.get("status")) if isinstance(reply, dict) else None
        running = bool(reply.get("running")) if isinstance(reply, dict) else None
        if status != self.status:
            self.log.info("run state", path=self.path, run_state=status, running=running)
        self.status, self.running = status, running
        self.updated_at = time.time()
