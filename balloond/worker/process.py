"""The worker: one VM's vhost-user socket served in a process of its own.

It runs what the daemon runs in process for a VM (`VirtualMachine`: the
listener's accept loop, a `VhostUserConnection` and `BalloonDevice` per
frontend, the VM's journal) on its own event loop. It is the only process
that maps this guest's memory and reads its rings, so whatever a hostile
frontend does to it — a memfd shrunk under a mapping (SIGBUS), an eventfd
that blocks, a spin — ends here, and the supervisor starts another worker
on the same listening socket.

It learns everything from the supervisor over the channel (channel.py) and
reports a `Status` when something changed and at least every report
interval (STATUS_INTERVAL, shorter with a short --worker-timeout): that
report is also the heartbeat a hung worker stops sending. A change is looked
for only when the worker's event loop woke for I/O (a frontend's message or
kick, an accept, a hang-up, a supervisor's command: `ActivitySelector`), at
most once per CHANGE_DELAY, and again CHANGE_DELAY after a look that found
one or while discards are pending (a burst settles over several loop
turns); an idle worker wakes only for the heartbeat. The end of a change
does not wait out CHANGE_DELAY: when the balloon comes to rest at its
target (BalloonDevice.on_settled) the worker looks at once, so the API
shows a target reached as soon as the worker knows it. The supervisor serves
the API from these reports (docs/api.md, "Freshness").

With --state-dir it first takes its VM's journal lock (JournalLock): a
worker of a killed supervisor may still hold it for the moment until
PR_SET_PDEATHSIG ends it, and two processes must never use one journal. It
waits up to LOCK_WAIT seconds (one log line; heartbeats meanwhile), then
exits and is restarted with the supervisor's backoff.

Started by the forkserver (supervisor.py), which has imported this module,
so a new worker costs a fork, not an interpreter start.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from protocol.balloon import PAGE_SIZE

from .. import logs
from ..device.balloon import DeviceSettings
from ..device.journal import BalloonJournal, JournalError, JournalLock
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
    Waiting,
    encode,
    read_message,
)

#: The longest gap between two reports (the heartbeat). Looking for a change
#: builds the VM's status, so an idle worker does it only this often: an
#: idle host with many VMs should not spend a core on it (measured: 64 idle
#: workers looking every 0.1 s took 0.3 of a core). The bound on how old a
#: guest-driven change the API shows can be (docs/api.md).
STATUS_INTERVAL = 1.0
#: After the loop's I/O, the shortest gap between two looks for a change
#: (and the delay before a look again while a change settles): a change is
#: usually reported within this of the worker's loop handling it.
CHANGE_DELAY = 0.05
#: Seconds a worker waits for its VM's journal lock before it gives up
#: (exit 1; the supervisor restarts it with backoff). The process holding
#: it is normally a dying worker of a killed supervisor: milliseconds.
LOCK_WAIT = 10.0
#: How often a worker waiting for the lock tries again.
LOCK_POLL = 0.05
#: Loop turns a worker lets pass before it answers GetStatus (see _commands).
ANSWER_AFTER_TURNS = 3
#: Workers run this much nicer than the supervisor. The supervisor (API,
#: policy, QMP, heartbeats) needs little CPU but must get it when 64 busy
#: workers want both cores: at equal weight its event loop fell 0.5-3.6 s
#: behind under benchmarks/many_vms.py's load and API p99 was 5.8-6.1 s;
#: with workers at +10 it was 0.64-0.73 s, inflate throughput within the
#: host's noise (docs/api.md, "Scheduling").
WORKER_NICE = 10
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
    #: The vhost-user engine: "pure" or "libvhost-user" (balloond/engine/libvhost_user).
    engine: str = "pure"
    #: The highest command seq whose effect the fields above already hold.
    applied: int = 0

    @property
    def report_interval(self) -> float:
        return min(STATUS_INTERVAL, self.timeout / HEARTBEATS_PER_TIMEOUT)


class ActivitySelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The worker loop's selector: calls `on_io` whenever the loop woke for
    I/O (not for a timer), which is when what the worker serves may have
    changed. Idle, it never fires, so an idle worker costs nothing more."""

    on_io: Callable[[], None] | None = None

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(timeout)
        if events and self.on_io is not None:
            self.on_io()
        return events


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
    try:
        os.nice(WORKER_NICE)
    except OSError:
        pass  # a nice value already at the bottom: nothing to give
    logs.configure(spec.log_format, spec.log_level)
    log = structlog.get_logger().bind(vm=spec.name, worker=os.getpid())
    try:
        selector = ActivitySelector()
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
            runner.run(Worker(spec, listen, channel, log, selector).run())
    except BaseException as exc:  # noqa: BLE001 - one line, then the supervisor restarts us
        log.exception("worker failed", error=f"{type(exc).__name__}: {exc}")
        os._exit(1)


class Worker:
    def __init__(self, spec: WorkerSpec, listen: socket.socket, channel: socket.socket, log: Any,
                 selector: ActivitySelector | None = None) -> None:
        self.spec = spec
        self.listen = listen
        self.channel = channel
        self.log = log
        self.selector = selector
        #: Built once the journal lock is held (run()).
        self.vm: VirtualMachine | None = None
        #: The highest command seq applied (WorkerSpec.applied: what the spec already holds).
        self.applied = spec.applied
        #: Set when something may have changed: the report loop looks.
        self.changed: asyncio.Event | None = None
        #: Set when the balloon came to rest at its target: the report loop
        #: looks without waiting out CHANGE_DELAY.
        self.settled: asyncio.Event | None = None

    def _make_vm(self, lock: JournalLock | None) -> VirtualMachine:
        spec, log = self.spec, self.log
        journal = None
        if spec.state_dir and lock is not None:  # no lock, no journal: another process may be using it
            try:
                journal = BalloonJournal(spec.state_dir, spec.name, log=log, lock=lock)
            except JournalError as exc:
                log.error("balloon not persisted: journal unavailable", error=str(exc))
                lock.release()
        vm = VirtualMachine(spec.name, spec.socket, spec.settings, poll_seconds=spec.poll_seconds,
                            log=log, journal=journal, max_guest_ram=spec.max_guest_ram, engine=spec.engine)
        vm.log = log  # already bound with vm= and worker=
        vm.on_settled = self._settled
        if journal is not None and (journal.state.target_pages or len(journal.state.frames)):
            log.info("state found", target_pages=journal.state.target_pages,
                     ballooned_frames=len(journal.state.frames))
        if spec.target_pages is not None and spec.target_pages != vm.target_pages:
            vm.target_pages = spec.target_pages
            if journal is not None:
                journal.target(spec.target_pages)
        vm.set_discard_inhibit(spec.discard_inhibit)
        # path=None: the socket's path is the supervisor's to remove, never a worker's.
        vm.listener = VhostUserListener(self.listen, path=None, log=log)
        return vm

    async def _lock(self, writer: asyncio.StreamWriter, stop: asyncio.Event) -> JournalLock | None:
        """The VM's journal lock, waited for (heartbeats meanwhile) up to
        LOCK_WAIT; None when the state directory cannot take a lock (the VM
        is then served without a journal, as for any unusable journal)."""
        assert self.spec.state_dir
        try:
            lock = JournalLock(self.spec.state_dir, self.spec.name)
            if lock.try_acquire():
                return lock
        except JournalError as exc:
            self.log.error("balloon not persisted: journal unavailable", error=str(exc))
            return None
        holder = lock.holder()
        self.log.warning("journal locked by another process; waiting", holder=holder, wait_s=LOCK_WAIT)
        loop = asyncio.get_running_loop()
        deadline = beat = loop.time()
        deadline += LOCK_WAIT
        while not lock.try_acquire():
            now = loop.time()
            if now >= deadline:
                lock.release()
                raise JournalError(f"journal still locked by pid {lock.holder()} after {LOCK_WAIT:.0f} s")
            if now >= beat:
                writer.write(encode(Waiting("journal locked by another process")))
                await writer.drain()
                beat = now + self.spec.report_interval
            try:
                await asyncio.wait_for(stop.wait(), LOCK_POLL)
            except TimeoutError:
                continue
            lock.release()
            return None
        self.log.info("journal lock taken", waited_s=round(LOCK_WAIT - (deadline - loop.time()), 3))
        return lock

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        self.changed = asyncio.Event()
        self.settled = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)  # systemd signals the whole cgroup
        reader, writer = await asyncio.open_unix_connection(sock=self.channel)
        lock = await self._lock(writer, stop) if self.spec.state_dir else None
        if stop.is_set():
            return
        self.vm = self._make_vm(lock)
        assert self.vm.listener is not None
        if self.selector is not None:
            self.selector.on_io = self._io
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

    def _settled(self) -> None:
        if self.settled is not None:
            self.settled.set()

    def _io(self) -> None:
        # Called from inside select(), before the I/O callbacks run: setting the
        # event one turn later lets the look follow what those callbacks did.
        if self.changed is not None and not self.changed.is_set():
            asyncio.get_running_loop().call_soon(self.changed.set)

    def _status(self, request_id: int = 0) -> Status:
        assert self.vm is not None
        return Status(self.vm.serving_status(), request_id, self.applied)

    async def _report(self, writer: asyncio.StreamWriter) -> None:
        """Report a change soon after the loop's I/O (at most once per
        CHANGE_DELAY), and every report interval anyway (the heartbeat)."""
        assert self.changed is not None and self.settled is not None and self.vm is not None
        last: Status | None = None
        sent_at = 0.0
        while True:
            self.changed.clear()  # what happens from now on is looked at next time
            looked_at = time.monotonic()
            status = self._status()
            found = status != last
            if found or looked_at - sent_at >= self.spec.report_interval:
                writer.write(encode(status))
                await writer.drain()
                last, sent_at = status, looked_at
            device = status.serving.device
            settling = found or (device is not None and device.pending_discard_bytes > 0)
            if not settling:
                heartbeat = sent_at + self.spec.report_interval - time.monotonic()
                try:
                    await asyncio.wait_for(self.changed.wait(), max(heartbeat, 0.0))
                except TimeoutError:
                    continue  # the heartbeat is due now
            await self._until_settled_or(looked_at + CHANGE_DELAY)

    async def _until_settled_or(self, deadline: float) -> None:
        """Wait until the monotonic `deadline`, or less if the balloon comes
        (or came, since the last look) to rest at its target."""
        assert self.settled is not None
        delay = deadline - time.monotonic()
        if delay > 0 and not self.settled.is_set():
            try:
                await asyncio.wait_for(self.settled.wait(), delay)
            except TimeoutError:
                pass
        self.settled.clear()

    async def _commands(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Apply the supervisor's messages until Stop or until it goes away."""
        assert self.vm is not None
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
                # First let the loop handle the I/O that was ready with the
                # question (an accept takes two turns to become a connection):
                # what a frontend did before the API was asked then shows.
                for _ in range(ANSWER_AFTER_TURNS):
                    await asyncio.sleep(0)
                writer.write(encode(self._status(message.id)))
                await writer.drain()
            elif isinstance(message, GetPfns):
                pfns = self.vm.pfn_ranges()
                writer.write(encode(Pfns(message.id, pfns["count"], pfns["ranges"])))
                await writer.drain()
            if isinstance(message, (SetTarget, SetStatsInterval, SetDiscardInhibit)):
                self.applied = max(self.applied, message.seq)
