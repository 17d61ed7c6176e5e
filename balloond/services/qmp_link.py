"""QmpLink: one VM's QEMU monitor (QMP), shared by everything that follows
that VM through it.

When a VM is configured with `qmp=PATH` the daemon keeps one QMP connection
to that socket (qemu.qmp's asyncio QMPClient, on the daemon's own loop).
QEMU serves one client per `-qmp` socket, so the several things the daemon
wants to know about a VM share that one connection as *watches*: each names
the events after which it must look again and, optionally, how often to look
anyway, and is told when the link is lost (then nothing it knew holds).

The link always carries the run state (`query-status`): the policy leaves a
VM whose run state is known and not "running" alone; and the RAM size, so a
target can be checked before the guest's memory reaches the daemon. Other watches are the
discard guard (discard_guard.py) and QEMU's own balloon (qemu_balloon.py).

QEMU may not be there yet, or may restart: the link retries with a capped
backoff and never blocks the event loop. It connects the socket itself so
that it can read the peer's credentials: QEMU's pid, for its resident memory.

    link = QmpLink("/run/qemu/web1.qmp", log=log)
    link.add(watch)
    task = link.start()
    link.connected, link.running, link.status, link.pid, link.ram_bytes  # None/False while unknown
    await link.execute("balloon", {"value": n})          # QmpUnavailable while down
    await link.stop()
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import structlog
from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.protocol import Runstate

#: Events after which the run state may have changed: ask QEMU again.
STATE_EVENTS = (
    "STOP", "RESUME", "MIGRATION", "RESET", "SUSPEND", "WAKEUP", "SHUTDOWN",
    "POWERDOWN", "GUEST_PANICKED", "BLOCK_IO_ERROR", "WATCHDOG",
)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class QmpUnavailable(RuntimeError):
    """The VM's QMP link is down; the message says since when or why."""


class QmpWatch:
    """One thing the daemon follows about a VM over its QMP link."""

    #: Look again after any of these events (`on_event`).
    events: tuple[str, ...] = ()
    #: And every this many seconds (None: only on connect and on events).
    poll_interval: float | None = None

    async def refresh(self, client: QMPClient) -> None:
        """Ask QEMU what this watch needs; called when polled and, through
        `on_connect`, on connect."""
        raise NotImplementedError

    async def on_connect(self, client: QMPClient) -> None:
        """A new session (QEMU may be a new process): by default, look.
        A watch that needs QEMU set up for it first (an event turned on) does
        that here, before its first look, so nothing falls in between."""
        await self.refresh(client)

    async def on_event(self, client: QMPClient, event: dict[str, Any]) -> None:
        """One of `events` arrived: by default, look again."""
        await self.refresh(client)

    def forget(self) -> None:
        """The link is down: nothing known through it holds any more."""


class RunState(QmpWatch):
    """The guest's run state, from `query-status` (and its events)."""

    events = STATE_EVENTS
    poll_interval: float | None = None

    def __init__(self, log: Any) -> None:
        self.log = log
        self.running: bool | None = None
        self.status: str | None = None
        self.updated_at: float | None = None

    async def refresh(self, client: QMPClient) -> None:
        reply = await client.execute("query-status")
        status = str(reply.get("status")) if isinstance(reply, dict) else None
        running = bool(reply.get("running")) if isinstance(reply, dict) else None
        if status != self.status:
            self.log.info("run state", run_state=status, running=running)
        self.status, self.running = status, running
        self.updated_at = time.time()

    def forget(self) -> None:
        self.running = None
        self.status = None


class RamSize(QmpWatch):
    """The guest's RAM size (`query-memory-size-summary`: base + plugged)."""

    events = ("MEMORY_DEVICE_SIZE_CHANGE", "DEVICE_DELETED", "RESET")
    poll_interval: float | None = 10.0  # memory hot-plug is not announced

    def __init__(self) -> None:
        self.bytes: int | None = None

    async def refresh(self, client: QMPClient) -> None:
        reply = await client.execute("query-memory-size-summary")
        if isinstance(reply, dict):
            self.bytes = int(reply.get("base-memory", 0)) + int(reply.get("plugged-memory", 0)) or None

    def forget(self) -> None:
        self.bytes = None


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
        self.log = (log or structlog.get_logger()).bind(qmp=path)
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connected = False
        self.connects = 0
        self.last_error: str | None = None
        #: QEMU's pid, from the socket's peer credentials (None while unknown).
        self.pid: int | None = None
        self.run_state = RunState(self.log)
        self.ram_size = RamSize()
        self.watches: list[QmpWatch] = [self.run_state, self.ram_size]
        self._task: asyncio.Task[None] | None = None
        self._client: QMPClient | None = None

    def add(self, watch: QmpWatch) -> None:
        """Follow `watch` too (before `start`: events are subscribed at connect)."""
        self.watches.append(watch)

    # ----------------------------------------------------------------- reading

    @property
    def running(self) -> bool | None:
        return self.run_state.running

    @property
    def status(self) -> str | None:
        return self.run_state.status

    @property
    def ram_bytes(self) -> int | None:
        return self.ram_size.bytes

    def summary(self) -> dict[str, Any]:
        return {"qmp_connected": self.connected, "run_state": self.status}

    def client(self) -> QMPClient:
        """The live session's client, for a watch acting between its looks."""
        client = self._client
        if client is None or not self.connected:
            raise QmpUnavailable(f"QMP at {self.path} is not connected"
                                 + (f" ({self.last_error})" if self.last_error else ""))
        return client

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one command on the live session (qemu.qmp's ExecuteError on refusal)."""
        return await self.client().execute(command, arguments)

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
                    self.log.info("qmp not connected", error=error)
                self.last_error = error
            finally:
                self._forget()
            if had:
                delay = self.backoff_initial  # a session that worked: retry soon
            await asyncio.sleep(delay)
            delay = min(self.backoff_max, delay * 2)

    def _forget(self) -> None:
        self.connected = False
        self.pid = None
        for watch in self.watches:
            watch.forget()

    async def _connect(self, client: QMPClient) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, self.path)
            pid, _, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except BaseException:
            sock.close()
            raise
        await client.connect(sock)  # the client owns the socket from here
        self.pid = pid or None

    async def _session(self) -> bool:
        """One connection, until QEMU goes; True if it got as far as a status."""
        client = QMPClient(self.name)
        self._client = client
        events = sorted({name for watch in self.watches for name in watch.events})
        listener = EventListener(names=events)
        client.register_listener(listener)
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._connect(client)
            for watch in self.watches:
                await self._guarded(watch.on_connect(client), watch)
            self.connected = True
            self.connects += 1
            self.last_error = None
            self.log.info("qmp connected", run_state=self.status, qemu_pid=self.pid)
            tasks.append(asyncio.create_task(self._pump(client, listener)))
            tasks += [asyncio.create_task(self._poll(client, w)) for w in self.watches if w.poll_interval]
            while client.runstate == Runstate.RUNNING and not any(t.done() for t in tasks):
                changed = asyncio.ensure_future(client.runstate_changed())
                await asyncio.wait({changed, *tasks}, return_when=asyncio.FIRST_COMPLETED)
                changed.cancel()
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            self.log.info("qmp disconnected")
            return True
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            client.remove_listener(listener)
            self._client = None
            try:
                await client.disconnect()
            except Exception as exc:  # noqa: BLE001 - it re-raises what ended the session
                self.log.debug("qmp session ended", error=f"{type(exc).__name__}: {exc}")

    async def _guarded(self, call: Any, watch: QmpWatch) -> None:
        """A command QEMU refuses, or a reply a watch cannot read, is that
        watch's problem, not the session's: the other watches go on."""
        try:
            await call
        except ExecuteError as exc:
            self.log.warning("qmp command refused", watch=type(watch).__name__,
                             error_class=exc.error_class, error=str(exc))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            self.log.warning("qmp reply not understood", watch=type(watch).__name__,
                             error=f"{type(exc).__name__}: {exc}")

    async def _pump(self, client: QMPClient, listener: EventListener) -> None:
        async for event in listener:
            name = event.get("event")
            self.log.info("qmp event", qmp_event=name)
            for watch in self.watches:
                if name in watch.events:
                    await self._guarded(watch.on_event(client, dict(event)), watch)

    async def _poll(self, client: QMPClient, watch: QmpWatch) -> None:
        assert watch.poll_interval
        while True:
            await asyncio.sleep(watch.poll_interval)
            await self._guarded(watch.refresh(client), watch)
