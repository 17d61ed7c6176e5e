"""The `balloond` entry point: settings → VMs, listeners and the API, until SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from multiprocessing.context import BaseContext
from typing import Any

import structlog

from .. import __version__, logs
from ..device.balloon import DeviceSettings
from ..device.journal import BalloonJournal, JournalError, check_state_dir
from ..engine.listener import ListenerError, VhostUserListener, adopt_listening_socket, open_listening_socket
from ..vm import ManagedVm, MigrationPairs, VirtualMachine
from ..worker.forkserver import start_forkserver
from ..worker.process import WorkerSpec
from ..worker.supervisor import WorkerVm
from . import config
from .api import ControlApi
from .discard_guard import DiscardGuard
from .host_memory import SimulatedHost
from .libvirt_balloon import LibvirtBalloonVm
from .policy_loop import PolicyLoop
from .qemu_balloon import QemuBalloonVm
from .qmp_link import QmpLink


def capabilities() -> dict[str, Any]:
    """vhost-user backend convention: what this backend is and can do."""
    return {
        "type": "balloon",
        "version": __version__,
        "features": ["stats", "free-page-reporting", "deflate-on-oom", "page-poison", "migrate-extension"],
    }


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) how we are doing; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)  # never stall the event loop on a notify socket nobody drains
            s.connect(path)
            s.send(message.encode())
    except OSError:
        pass


class Daemon:
    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.log = structlog.get_logger()
        self.vms: dict[str, ManagedVm] = {}
        self.listeners: list[VhostUserListener] = []
        self.policy = PolicyLoop(
            self.vms,
            settings.policy,
            vm_settings={vmc.name: vmc.policy for vmc in settings.vms},
            host=SimulatedHost(settings.policy_simulate_host) if settings.policy_simulate_host else None,
            log=self.log,
            on_decision=lambda _: sd_notify(f"STATUS=serving {len(self.vms)} VM(s); {self.policy.status_line()}"),
        )
        self.api = ControlApi(
            self.vms,
            allowed_uids=settings.api_allow_uids,
            allowed_gids=settings.api_allow_gids,
            policy=self.policy,
        )
        self._stop = asyncio.Event()
        self._context: BaseContext | None = None
        #: Both ends of a live migration between two of this daemon's VMs, paired.
        self.migration_pairs = MigrationPairs()

    def _device_settings(self) -> DeviceSettings:
        s = self.settings
        return DeviceSettings(
            stats_interval=s.stats_interval,
            deflate_on_oom=s.deflate_on_oom,
            free_page_reporting=s.free_page_reporting,
            migrate_extension=s.migrate_extension,
            discard_max_delay=s.discard_delay_ms / 1000,
        )

    async def _watchdog(self, interval: float) -> None:
        """systemd's WatchdogSec=: ping at half the interval while the event loop runs.

        The pings come from the event loop itself (not a thread), so a loop
        that hangs stops them and systemd restarts the daemon."""
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _watchdog_interval(self) -> float | None:
        """Half of $WATCHDOG_USEC if systemd asks this process for pings, else None.

        WATCHDOG_PID names the process meant (a child started by us must not
        ping for us); a value that is not a positive number of microseconds
        is logged and ignored rather than stopping the daemon."""
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec or os.environ.get("WATCHDOG_PID", str(os.getpid())) != str(os.getpid()):
            return None
        try:
            value = int(usec)
        except ValueError:
            value = 0
        if value <= 0:
            self.log.warning("WATCHDOG_USEC is not a positive number of microseconds; no watchdog pings",
                             watchdog_usec=usec)
            return None
        return value / 2e6

    def _worker_vm(self, name: str, where: str, sock: socket.socket, engine: str = "pure") -> WorkerVm:
        s = self.settings
        if s.state_dir:
            check_state_dir(s.state_dir)  # a one-line error at start, as with --vm-isolation none
        spec = WorkerSpec(name=name, socket=where, settings=self._device_settings(), poll_seconds=s.poll_us / 1e6,
                          state_dir=s.state_dir, target_pages=None, discard_inhibit=None,
                          log_format=s.log_format, log_level=s.log_level, max_guest_ram=s.max_guest_ram,
                          timeout=s.worker_timeout, engine=engine)
        return WorkerVm(spec, sock, context=self.worker_context(), timeout=s.worker_timeout, log=self.log)

    def worker_context(self) -> BaseContext:
        if self._context is None:
            paths = [self.settings.api, *(vmc.socket for vmc in self.settings.vms)]
            self._context = start_forkserver(next((os.path.dirname(p) for p in paths if p), None))
        return self._context

    def open_sockets(self) -> None:
        for vmc in self.settings.vms:
            if vmc.libvirt is not None:
                assert vmc.domain is not None
                self.vms[vmc.name] = LibvirtBalloonVm(vmc.name, vmc.libvirt, vmc.domain,
                                                      stats_interval=self.settings.stats_interval, log=self.log)
                continue
            if vmc.uses_qemu_balloon:
                assert vmc.qmp is not None
                link = QmpLink(vmc.qmp, log=self.log.bind(vm=vmc.name))
                self.vms[vmc.name] = QemuBalloonVm(vmc.name, link, stats_interval=self.settings.stats_interval,
                                                   log=self.log)
                continue
            if vmc.fd is not None:
                sock = adopt_listening_socket(vmc.fd)
                path = None
            else:
                assert vmc.socket is not None
                sock = open_listening_socket(vmc.socket, group=self.settings.socket_group)
                path = vmc.socket
            vm: VirtualMachine | WorkerVm
            if self.settings.vm_isolation == "process":
                vm = self._worker_vm(vmc.name, path or f"fd:{vmc.fd}", sock, self.settings.engine_of(vmc))
                listener = VhostUserListener(sock, path=path, log=vm.log)  # the workers accept; we remove the path
            else:
                journal = BalloonJournal(self.settings.state_dir, vmc.name) if self.settings.state_dir else None
                vm = VirtualMachine(
                    vmc.name, path or f"fd:{vmc.fd}", self._device_settings(),
                    poll_seconds=self.settings.poll_us / 1e6, log=self.log, journal=journal,
                    max_guest_ram=self.settings.max_guest_ram, engine=self.settings.engine_of(vmc),
                )
                if journal is not None and (journal.state.target_pages or len(journal.state.frames)):
                    vm.log.info("state found", target_pages=journal.state.target_pages,
                                ballooned_frames=len(journal.state.frames))
                vm.listener = listener = VhostUserListener(sock, path=path, log=vm.log)
            if vmc.qmp:
                vm.qmp = QmpLink(vmc.qmp, log=vm.log)
                vm.discard_guard = DiscardGuard(vm.set_discard_inhibit, log=vm.log,
                                                poll_interval=self.settings.guard_poll_interval)
                vm.qmp.add(vm.discard_guard)  # closed until QEMU answers
            vm.migration_pairs = self.migration_pairs
            self.vms[vmc.name] = vm
            self.listeners.append(listener)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.open_sockets()
        if self.settings.api:
            await self.api.start(self.settings.api)
        tasks = [asyncio.create_task(vm.listener.serve(vm.serve_connection))
                 for vm in self.vms.values() if isinstance(vm, VirtualMachine) and vm.listener is not None]
        workers = [vm for vm in self.vms.values() if isinstance(vm, WorkerVm)]
        tasks += [vm.start() for vm in workers]
        # Ready once each worker has reported (or failed to within the timeout): the API then
        # tells the targets found in the state directory, as without workers.
        await asyncio.gather(*(asyncio.wait_for(vm.reported.wait(), self.settings.worker_timeout)
                               for vm in workers), return_exceptions=True)
        tasks += [vm.qmp.start() for vm in self.vms.values() if vm.qmp is not None]
        libvirt_vms = [vm for vm in self.vms.values() if isinstance(vm, LibvirtBalloonVm)]
        tasks += [vm.start() for vm in libvirt_vms]
        tasks.append(self.policy.start())  # idles while the policy is off; the API can turn it on
        watchdog = self._watchdog_interval()
        if watchdog is not None:
            tasks.append(asyncio.create_task(self._watchdog(watchdog)))
        self.log.info("balloond ready", vms=sorted(self.vms), api=self.settings.api, version=__version__,
                      policy=self.policy.enabled, vm_isolation=self.settings.vm_isolation)
        sd_notify(f"READY=1\nSTATUS=serving {len(self.vms)} VM(s)")
        try:
            await self._stop.wait()
        finally:
            sd_notify("STOPPING=1")
            self.log.info("shutting down")
            await asyncio.gather(*(vm.stop() for vm in workers), return_exceptions=True)
            await asyncio.gather(*(vm.stop() for vm in libvirt_vms), return_exceptions=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for listener in self.listeners:
                listener.close()
            await self.api.stop()
            if self.settings.api:
                try:
                    os.unlink(self.settings.api)
                except OSError:
                    pass


def main(argv: list[str] | None = None) -> int:
    try:
        settings, args = config.load(argv)
    except config.ConfigError as exc:
        print(f"balloond: {exc}", file=sys.stderr)
        return 2
    if args.print_capabilities:
        print(json.dumps(capabilities(), indent=2))
        return 0
    logs.configure(settings.log_format, settings.log_level)
    # qemu.qmp logs each failed connect at ERROR; QmpLink logs the link's state itself
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    daemon = Daemon(settings)
    try:
        if settings.vm_isolation == "process" and any(vmc.socket is not None or vmc.fd is not None
                                                      for vmc in settings.vms):
            daemon.worker_context()  # before the event loop starts any thread
        asyncio.run(daemon.run())
    except (ListenerError, JournalError) as exc:
        print(f"balloond: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"balloond: {exc}", file=sys.stderr)
        return 1
    return 0
