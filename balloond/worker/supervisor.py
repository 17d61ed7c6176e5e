"""WorkerVm: a VM whose vhost-user socket is served by a worker process,
as the supervisor (API, policy, metrics, QMP) sees it.

The supervisor keeps what outlives a worker: the listening socket (handed
to each worker as an fd, so QEMU's reconnects land on the next one), the
operator's target and stats interval (re-sent to a new worker; the journal
has the target too), the QMP link and its discard guard (whose verdict is
forwarded). It never maps guest memory.

Restarts: a worker that dies (any signal, any exit) or goes silent for
`timeout` seconds of the supervisor's own running time (then SIGKILLed;
heartbeat.py) is logged with how it ended and started
again after a delay that doubles from 0.1 s to 10 s, back to 0.1 s once a
worker has served for 60 s. Only that VM is concerned.

Freshness (docs/api.md): the API reads the worker's last report, which the
worker sends on a change and at least every report interval, so one read of
64 VMs waits for none of them. Commands are numbered (`seq`); a report that
has not yet seen the last one sent is stale, and only then does a read ask
the worker afresh (`refresh`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import signal
import socket
import time
from multiprocessing.context import BaseContext
from typing import Any

import structlog

from protocol.balloon import PAGE_SIZE

from ..status import MigrationPeer, ServingStatus, VmStatus, WorkerStatus, encode_status
from ..vm import MigrationPairs, VmUnavailable, compose_status, stats_interval, target_pages, valid_peer
from .channel import (
    TO_SUPERVISOR,
    ChannelError,
    GetPfns,
    GetStatus,
    Pfns,
    SetDiscardInhibit,
    SetStatsInterval,
    SetTarget,
    Status,
    Stop,
    Waiting,
    decode,
    encode,
    read_frame,
)
from .heartbeat import Heartbeat
from .process import WorkerSpec, worker_main

FIRST_DELAY = 0.1
LONGEST_DELAY = 10.0
#: A worker that served this long restarts after FIRST_DELAY again.
HEALTHY_SECONDS = 60.0
#: Seconds an API read waits for the report of a worker that has not yet
#: reported on a command sent to it, before it serves the last one.
REFRESH_TIMEOUT = 0.5
#: On stop: seconds a worker has to exit after Stop before SIGKILL.
STOP_GRACE = 2.0


def describe_exit(code: int | None) -> str:
    """How a worker ended, for the log and the API."""
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _kill(pid: int | None) -> None:
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class WorkerVm:
    kind = "vhost-user"

    def __init__(self, spec: WorkerSpec, listen: socket.socket, *, context: BaseContext, timeout: float = 5.0,
                 log: Any = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.listen = listen
        self.context = context
        self.timeout = timeout
        self.log = (log or structlog.get_logger()).bind(vm=spec.name)
        #: Its QMP link and discard guard (as for VirtualMachine).
        self.qmp: Any = None
        self.discard_guard: Any = None
        #: The target asked for; None until set here or reported by the first worker (from its journal).
        self.target_pages: int | None = spec.target_pages
        self.stats_interval = spec.settings.stats_interval
        self.serving = ServingStatus()
        self.guest_ram_bytes = 0
        self.state = "stopped"
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        #: The seq of the last command sent (or put in a spec), and the highest the worker reported applied.
        self.sent = 0
        self.applied = 0
        self._stopping = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Set at the first report of a worker: the VM's target (from its journal) is known.
        self.reported = asyncio.Event()
        #: The last report's bytes, and the API's JSON with what it was made from (status_body).
        self._last_report = b""
        self._body: tuple[tuple[Any, ...], bytes] | None = None
        #: The current worker's ServingStatus.adoptions last seen.
        self._adoptions = 0
        #: The last migrations in and out, kept across workers, and the daemon's pairing of both ends (or None).
        self.migrated_from: MigrationPeer | None = None
        self.migrated_to: MigrationPeer | None = None
        self.migration_pairs: MigrationPairs | None = None

    # ------------------------------------------------------------ the worker's life

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._supervise(), name=f"balloond-worker-{self.name}")
        return self._task

    async def stop(self) -> None:
        """Stop the worker (Stop, then SIGKILL after STOP_GRACE) and do not restart it."""
        self._stopping = True
        self._wake.set()
        self._send(Stop())
        task = self._task
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_GRACE)
        except TimeoutError:
            _kill(self.pid)
            await asyncio.gather(task, return_exceptions=True)

    async def _supervise(self) -> None:
        delay = FIRST_DELAY
        while not self._stopping:
            started = time.monotonic()
            reason = await self._run_worker()
            if self._stopping:
                break
            if time.monotonic() - started >= HEALTHY_SECONDS:
                delay = FIRST_DELAY
            self.state, self.last_exit = "restarting", reason
            self.restarts += 1
            self.log.error("worker ended; starting another", reason=reason, restart_in=delay,
                           restarts=self.restarts)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, LONGEST_DELAY)
        self.state = "stopped"

    async def _run_worker(self) -> str:
        """One worker from start to end; returns how it ended."""
        loop = asyncio.get_running_loop()
        spec = dataclasses.replace(
            self.spec, target_pages=self.target_pages, discard_inhibit=self.discard_inhibit,
            settings=dataclasses.replace(self.spec.settings, stats_interval=self.stats_interval),
            applied=self.sent,
        )
        self.applied = self.sent  # what the spec holds; commands sent later get a new seq
        parent, child = socket.socketpair()
        try:
            proc = self.context.Process(target=worker_main, args=(spec, self.listen, child),  # type: ignore[attr-defined]
                                        name=f"balloond-worker-{self.name}")
            proc.start()
        except Exception as exc:  # noqa: BLE001 - e.g. the forkserver could not fork
            parent.close()
            return f"could not start: {type(exc).__name__}: {exc}"
        finally:
            child.close()
        self.pid, self.state = proc.pid, "running"
        self.log.info("worker started", worker=proc.pid)
        ended: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not ended.done():
                ended.set_result(None)

        loop.add_reader(proc.sentinel, on_exit)
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        self._writer = writer
        if self.sent != spec.applied:  # commands came while the channel opened: not in the spec, not sent
            self._resend()
        reading = asyncio.create_task(self._read(reader))
        reason: str | None = None
        try:
            waiting: set[asyncio.Future[Any]] = {reading, ended}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if reading in done:
                reason = reading.result()
                if reason is not None:  # hung or talking nonsense: it does not get another word
                    _kill(proc.pid)
            try:
                await asyncio.wait_for(asyncio.shield(ended), STOP_GRACE)
            except TimeoutError:  # closed its channel but lives on
                _kill(proc.pid)
                await ended
        finally:
            reading.cancel()
            loop.remove_reader(proc.sentinel)
            self._writer = None
            writer.close()
            for future in self._replies.values():
                if not future.done():
                    future.set_exception(VmUnavailable(f"VM {self.name}'s worker ended"))
            self._replies.clear()
        code = proc.exitcode
        proc.close()
        self.pid = None
        self.serving = dataclasses.replace(self.serving, connected=False)
        return reason or describe_exit(code)

    async def _read(self, reader: asyncio.StreamReader) -> str | None:
        """Take the worker's messages; return why it must be killed, or None
        at its end of stream. Hung is judged by `Heartbeat` (heartbeat.py):
        only silence the supervisor was running to hear counts."""
        self._last_report = b""  # a new worker: its first report is taken whatever it says
        self._adoptions = 0
        loop = asyncio.get_running_loop()
        heartbeat = Heartbeat(loop, self.timeout, on_away=self._was_away)
        taking = asyncio.ensure_future(self._take(reader, heartbeat))
        try:
            await asyncio.wait((taking, heartbeat.hung), return_when=asyncio.FIRST_COMPLETED)
            if taking.done():
                return taking.result()
            return f"no heartbeat for {self.timeout:.1f} s"
        finally:
            heartbeat.close()
            taking.cancel()

    def _was_away(self, late: float) -> None:
        self.log.warning("the supervisor did not run at the worker's heartbeat deadline; "
                         "the worker gets another full timeout", late_s=round(late, 3), worker=self.pid)

    async def _take(self, reader: asyncio.StreamReader, heartbeat: Heartbeat) -> str | None:
        """_read's loop. A report whose bytes equal the last one's (an idle
        worker's heartbeat) is not decoded again: with 64 workers, decoding
        was a tenth of the supervisor's time under load."""
        while True:
            try:
                body = await read_frame(reader)
            except ChannelError as exc:
                return f"malformed message: {exc}"
            except OSError:  # ECONNRESET: it died with our messages unread; its exit says how
                return None
            heartbeat.beat()
            if body is None:
                return None
            if body == self._last_report:
                continue  # the same report again: alive, nothing new
            try:
                message = decode(body, TO_SUPERVISOR)
            except ChannelError as exc:
                return f"malformed message: {exc}"
            if isinstance(message, Waiting):
                continue  # alive; nothing to take from it
            if isinstance(message, Status):
                if message.applied > self.sent:
                    return f"malformed message: applied command {message.applied}, only {self.sent} sent"
                if not (valid_peer(message.serving.migrated_from) and valid_peer(message.serving.migrated_to)):
                    return "malformed message: a migration peer no daemon makes"
                self.serving = message.serving
                self._take_migrations(message.serving)
                self.applied = max(self.applied, message.applied)
                if self.target_pages is None:
                    self.target_pages = message.serving.target_pages  # the journal's, at a first start
                if message.serving.adoptions > self._adoptions:
                    self._adopt(message)
                self.reported.set()
                if message.id == 0:
                    self._last_report = body
                self._answer(message.id, message)
            elif isinstance(message, Pfns):
                self._answer(message.id, message)

    def _take_migrations(self, serving: ServingStatus) -> None:
        """Keep the worker's migrations in and out beyond its life (a new
        worker knows of neither); a source that runs again has none out."""
        came = serving.migrated_from
        if came is not None and came != self.migrated_from:
            self.migrated_from = came
            if self.migration_pairs is not None:
                self.migration_pairs.arrived(self.name, came.id)
        if serving.migrated_to is not None:
            self.migrated_to = serving.migrated_to
        elif serving.device is not None and serving.device.running:
            self.migrated_to = None

    def _adopt(self, message: Status) -> None:
        """The worker took a migrated-in VM's target and stats interval (the
        operator's, on the source): they are this VM's now, also for the
        next worker's spec. A command sent since is newer than the
        migration, and the worker applies it after: it stays."""
        self._adoptions = message.serving.adoptions
        if message.applied < self.sent:
            return
        self.target_pages = message.serving.target_pages
        self.stats_interval = message.serving.stats_interval
        self.log.info("target taken from the migrated-in VM", target_bytes=self.target_pages * PAGE_SIZE,
                      stats_interval=self.stats_interval)

    def _answer(self, request_id: int, message: Any) -> None:
        future = self._replies.pop(request_id, None)
        if future is not None and not future.done():
            future.set_result(message)

    async def _ask(self, make: Any, timeout: float) -> Any:
        """Send make(id) and wait for the worker's answer with that id."""
        if self.state != "running" or self._writer is None:
            raise VmUnavailable(f"VM {self.name}'s worker is {self.state}; try again")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        self._send(make(request_id))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise VmUnavailable(f"VM {self.name}'s worker did not answer") from None
        finally:
            self._replies.pop(request_id, None)

    def _send(self, message: Any) -> bool:
        if self._writer is None or self._writer.is_closing():
            return False
        self._writer.write(encode(message))
        return True

    def _command(self, make: Any) -> None:
        """Send make(seq), a command, numbered; a worker not running gets it
        with its spec (which is made from the supervisor's values)."""
        self.sent += 1
        self._send(make(self.sent))

    def _resend(self) -> None:
        """Every setting again, as commands: for the ones made while no channel was open."""
        if self.target_pages is not None:
            self._command(lambda seq: SetTarget(self.target_pages or 0, seq))
        self._command(lambda seq: SetStatsInterval(self.stats_interval, seq))
        self._command(lambda seq: SetDiscardInhibit(self.discard_inhibit, seq))

    # ------------------------------------------------------------ ManagedVm

    def ram_bytes(self) -> int:
        """Guest RAM the worker last saw, or what QMP says, or the last known."""
        if self.serving.guest_ram_bytes:
            self.guest_ram_bytes = self.serving.guest_ram_bytes
        elif self.qmp is not None and self.qmp.ram_bytes:
            self.guest_ram_bytes = self.qmp.ram_bytes
        return self.guest_ram_bytes

    def set_target_bytes(self, value: Any) -> int:
        pages = target_pages(value, self.ram_bytes())
        self.target_pages = pages
        self._command(lambda seq: SetTarget(pages, seq))  # a worker (re)started later gets it in its spec
        self.log.info("target set", target_bytes=pages * PAGE_SIZE)
        return pages

    def set_stats_interval(self, seconds: Any) -> None:
        self.stats_interval = stats_interval(seconds)
        interval = self.stats_interval
        self._command(lambda seq: SetStatsInterval(interval, seq))

    @property
    def discard_inhibit(self) -> str | None:
        return self.discard_guard.reason if self.discard_guard is not None else None

    def set_discard_inhibit(self, reason: str | None) -> None:
        self._command(lambda seq: SetDiscardInhibit(reason, seq))

    async def pfn_ranges(self) -> dict[str, Any]:
        reply = await self._ask(GetPfns, self.timeout)
        return {"count": reply.count, "ranges": reply.ranges}

    @property
    def stale(self) -> bool:
        """The last report predates a command sent to the running worker."""
        return self.state == "running" and self.applied < self.sent

    async def refresh(self, *, always: bool = False) -> None:
        """Make status() reflect every command sent before this call: ask the
        worker afresh if its last report has not seen them all, or, with
        `always`, in any case (then it also shows all the worker did before).
        Waits at most REFRESH_TIMEOUT: a worker that does not answer by then
        leaves its last report in place. Otherwise returns at once:
        guest-driven changes come in the worker's own reports (docs/api.md)."""
        if not (self.stale or always and self.state == "running"):
            return
        try:
            await self._ask(GetStatus, REFRESH_TIMEOUT)
        except VmUnavailable:
            pass

    def status(self) -> VmStatus:
        serving = self.serving
        if self.state != "running" and serving.connected:
            serving = dataclasses.replace(serving, connected=False)
        if serving.device is not None and not serving.connected and serving.device.running:
            serving = dataclasses.replace(serving, device=dataclasses.replace(serving.device, running=False))
        target = self.target_pages if self.target_pages is not None else 0
        serving = dataclasses.replace(serving, migrated_from=self.migrated_from, migrated_to=self._migrated_to())
        status = compose_status(
            VmStatus(name=self.name, socket=self.spec.socket, target_bytes=target * PAGE_SIZE,
                     stats_interval=self.stats_interval, discard_inhibited=self.discard_inhibit),
            serving, self.qmp, self.discard_guard,
        )
        status.guest_ram_bytes = self.ram_bytes()
        status.worker = WorkerStatus(state=self.state, pid=self.pid, restarts=self.restarts, last_exit=self.last_exit)
        return status

    def _migrated_to(self) -> MigrationPeer | None:
        """The last migration out, with the destination VM if this daemon serves it too."""
        if self.migration_pairs is None:
            return self.migrated_to
        return self.migration_pairs.pair(self.migrated_to)

    def summary(self) -> dict[str, Any]:
        """The API's JSON for this VM."""
        return self.status().to_json()

    def status_body(self) -> bytes:
        """status() as the API's JSON, encoded again only when something it is
        made from changed: a list of 64 VMs read every few milliseconds
        otherwise spent a third of the supervisor's time re-encoding the same
        reports. The key holds everything status() reads."""
        qmp, guard = self.qmp, self.discard_guard
        key = (self.serving, self.state, self.pid, self.restarts, self.last_exit, self.target_pages,
               self.stats_interval, self.discard_inhibit, self.ram_bytes(), self.migrated_from, self._migrated_to(),
               None if qmp is None else (qmp.path, qmp.connected, qmp.status),
               None if guard is None else guard.summary())
        if self._body is None or self._body[0] != key:
            self._body = (key, encode_status(self.status()))
        return self._body[1]
