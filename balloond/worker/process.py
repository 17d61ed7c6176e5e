"""The worker: one VM's vhost-user socket served in a process of its own.

It runs what the daemon runs in process for a VM (`VirtualMachine`: the
listener's accept loop, a `VhostUserConnection` and `BalloonDevice` per
frontend, the VM's journal) on its own event loop. It is the only process
that maps this guest's memory and reads its rings, so whatever a hostile
frontend does to it — a memfd shrunk under a mapping (SIGBUS), an eventfd
that blocks, a spin — ends here, and the supervisor starts another worker
on the same listening socket.

It learns everything from the supervisor over the channel (channel.py) and
reports a `Status` when something changed and at least every
STATUS_INTERVAL seconds: that report is also the heartbeat a hung worker
stops sending.

Started by the forkserver (supervisor.py), which has imported this module,
so a new worker costs a fork, not an interpreter start.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

import structlog

from protocol.balloon import PAGE_SIZE

from .. import logs
from ..device.balloon import DeviceSettings
from ..device.journal import BalloonJournal, JournalError
from ..engine.listener import VhostUserListener
from ..engine.memory import DEFAULT_MAX_GUEST_RAM
from ..vm import TargetError, VirtualMachine
from .channel import (
    TO_WORKER,
    ChannelError,
    GetPfns,
    GetStatus,
    Pfns,
    SetDiscardInhibit,
    SetStatsInterval,
    SetTarget,
    Status,
    Stop,
    encode,
    read_message,
)

#: Seconds between two reports (the heartbeat). Each report builds the VM's
#: status, so they are kept rare: an idle host with many VMs should not spend
#: a core on them (measured: 64 idle workers building theirs every 0.1 s took
#: 0.3 of a core). The API does not wait for one: a read asks the worker for
#: a fresh report (GetStatus).
STATUS_INTERVAL = 1.0
#: A report is due at least this many times per supervisor timeout, so a
#: short --worker-timeout never mistakes a quiet worker for a hung one.
HEARTBEATS_PER_TIMEOUT = 5
_PR_SET_PDEATHSIG = 1


@dataclass
class WorkerSpec:
    """What a worker needs to serve its VM (sent by the supervisor, which is trusted)."""

    name: str
    socket: str
    settings: DeviceSettings
    poll_seconds: float
    state_dir: str | None
    #: The supervisor's target; None: the journal's (a first start).
    target_pages: int | None
    discard_inhibit: str | None
    log_format: str
    log_level: str
    #: --max-guest-ram: the largest memory table a frontend may send.
    max_guest_ram: int = DEFAULT_MAX_GUEST_RAM
    #: The supervisor's --worker-timeout: silence longer than this is a hang.
    timeout: float = 5.0

    @property
    def report_interval(self) -> float:
        return min(STATUS_INTERVAL, self.timeout / HEARTBEATS_PER_TIMEOUT)


def _die_with_parent() -> None:
    """SIGKILL this worker when its parent goes: an OOM-killed supervisor
    (its forkserver exits with it) must not leave workers holding guest memory."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def worker_main(spec: WorkerSpec, listen: socket.socket, channel: socket.socket) -> None:
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the parent went before the prctl took hold
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C at a terminal is the supervisor's to handle
    logs.configure(spec.log_format, spec.log_level)
    log = structlog.get_logger().bind(vm=spec.name, worker=os.getpid())
    try:
        asyncio.run(Worker(spec, listen, channel, log).run())
    except BaseException as exc:  # noqa: BLE001 - one line, then the supervisor restarts us
        log.exception("worker failed", error=f"{type(exc).__name__}: {exc}")
        os._exit(1)


class Worker:
    def __init__(self, spec: WorkerSpec, listen: socket.socket, channel: socket.socket, log: Any) -> None:
        self.spec = spec
        self.channel = channel
        self.log = log
        journal = None
        if spec.state_dir:
            try:
                journal = BalloonJournal(spec.state_dir, spec.name, log=log)
            except JournalError as exc:
                log.error("balloon not persisted: journal unavailable", error=str(exc))
        self.vm = VirtualMachine(spec.name, spec.socket, spec.settings, poll_seconds=spec.poll_seconds,
                                 log=log, journal=journal, max_guest_ram=spec.max_guest_ram)
        self.vm.log = log  # already bound with vm= and worker=
        if journal is not None and (journal.state.target_pages or len(journal.state.frames)):
            log.info("state found", target_pages=journal.state.target_pages,
                     ballooned_frames=len(journal.state.frames))
        if spec.target_pages is not None and spec.target_pages != self.vm.target_pages:
            self.vm.target_pages = spec.target_pages
            if journal is not None:
                journal.target(spec.target_pages)
        self.vm.set_discard_inhibit(spec.discard_inhibit)
        # path=None: the socket's path is the supervisor's to remove, never a worker's.
        self.vm.listener = VhostUserListener(listen, path=None, log=log)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)  # systemd signals the whole cgroup
        reader, writer = await asyncio.open_unix_connection(sock=self.channel)
        assert self.vm.listener is not None
        tasks = [
            asyncio.create_task(self.vm.listener.serve(self.vm.serve_connection)),
            asyncio.create_task(self._report(writer)),
            asyncio.create_task(self._commands(reader, writer)),
            asyncio.create_task(stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a failed accept loop or report: raise, exit 1, be restarted
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.vm.connection is not None:
                self.vm.connection.close("worker stopping")
            if self.vm.journal is not None:
                self.vm.journal.close()

    async def _report(self, writer: asyncio.StreamWriter) -> None:
        """The heartbeat: a report every report interval, changed or not."""
        while True:
            writer.write(encode(Status(self.vm.serving_status())))
            await writer.drain()
            await asyncio.sleep(self.spec.report_interval)

    async def _commands(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Apply the supervisor's messages until Stop or until it goes away."""
        while True:
            try:
                message = await read_message(reader, TO_WORKER)
            except ChannelError as exc:
                self.log.error("bad message from the supervisor", error=str(exc))
                return
            if message is None or isinstance(message, Stop):
                return
            if isinstance(message, SetTarget):
                try:
                    self.vm.set_target_bytes(message.pages * PAGE_SIZE)
                except TargetError as exc:  # the guest's RAM differs from what the supervisor last saw
                    self.log.warning("target not applied", error=str(exc))
            elif isinstance(message, SetStatsInterval):
                self.vm.set_stats_interval(message.seconds)
            elif isinstance(message, SetDiscardInhibit):
                self.vm.set_discard_inhibit(message.reason)
            elif isinstance(message, GetStatus):
                writer.write(encode(Status(self.vm.serving_status(), message.id)))
                await writer.drain()
            elif isinstance(message, GetPfns):
                pfns = self.vm.pfn_ranges()
                writer.write(encode(Pfns(message.id, pfns["count"], pfns["ranges"])))
                await writer.drain()
