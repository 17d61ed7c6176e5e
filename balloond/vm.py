"""VirtualMachine: one configured VM — its socket, its current frontend
connection and balloon device, and the target the operator asked for.

The target belongs to the VM, not to a connection: a QEMU that restarts
finds the same target waiting, and the driver reads it at probe. Device
state (the ballooned frames, stats, counters) belongs to the connection: a
new QEMU means a new guest whose balloon starts empty.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from protocol.balloon import PAGE_SIZE

from .device.balloon import BalloonDevice, DeviceSettings
from .device.journal import BalloonJournal, PeerProcess
from .device.migration_state import HOST_NAME, ORIGIN_ID_BYTES, VM_NAME, MigrationOrigin
from .engine.connection import VhostUserConnection
from .engine.memory import DEFAULT_MAX_GUEST_RAM
from .engine.listener import VhostUserListener
from .status import Disconnect, EngineCounters, MigrationPeer, ServingStatus, VmStatus, encode_status

if TYPE_CHECKING:
    from .engine.libvhost_user.connection import LibvhostUserConnection

    #: The engine serving a connection: the pure one or libvhost-user.
    AnyConnection = VhostUserConnection | LibvhostUserConnection


class TargetError(ValueError):
    """A requested balloon size the VM cannot take; the message says why."""


class NotSupported(Exception):
    """What was asked is not something this kind of VM can do or tell."""


class VmUnavailable(Exception):
    """What was asked needs the process serving the VM, which is not running now."""


class ManagedVm(Protocol):
    """What the API, the policy and the metrics need of a VM, whichever
    device backs its balloon (ours: VirtualMachine; QEMU's: QemuBalloonVm)."""

    name: str
    #: Its QMP link (services.qmp_link.QmpLink), or None.
    qmp: Any

    def status(self) -> VmStatus: ...

    def status_body(self) -> bytes:
        """status() as the API's JSON (status.encode_status); a VM may keep it between changes."""
        ...

    def set_target_bytes(self, value: Any) -> int: ...

    def set_stats_interval(self, seconds: Any) -> None: ...

    def pfn_ranges(self) -> dict[str, Any] | Awaitable[dict[str, Any]]: ...


def compose_status(status: VmStatus, serving: ServingStatus, qmp: Any, guard: Any) -> VmStatus:
    """Fill a VM's status from what serves its socket and from its QMP link
    and discard guard (shared by the in-process VM and the worker's proxy)."""
    status.qmp = qmp.path if qmp is not None else None
    status.qmp_connected = bool(qmp is not None and qmp.connected)
    status.run_state = qmp.status if qmp is not None else None
    status.discard_guard = guard.summary() if guard is not None else None
    status.connected = serving.connected
    status.connections = serving.connections
    status.guest_ram_bytes = serving.guest_ram_bytes
    status.last_disconnect = serving.last_disconnect
    status.migration = serving.migration
    status.migrated_from = serving.migrated_from
    status.migrated_to = serving.migrated_to
    if serving.device is not None:
        status.apply_device(serving.device)
        if serving.journal_write_errors is not None:
            # A failed write turns persistence off (the balloon keeps working): visible here and in metrics.
            status.counters["journal_write_errors"] = serving.journal_write_errors
            status.journal_persisting = serving.journal_persisting
    if serving.engine is not None:
        status.counters["calls_skipped"] = serving.engine.calls_skipped
        status.counters["backend_full"] = serving.engine.backend_full
        status.counters["acks_requested"] = serving.engine.acks_requested
        status.counters["lost_kicks"] = serving.engine.lost_kicks
    return status


def host_name() -> str:
    """This host's name as a migration's origin carries it ("" if it is not a plain host name)."""
    name = socket.gethostname()
    return name if HOST_NAME.fullmatch(name) else ""


def valid_peer(peer: MigrationPeer | None) -> bool:
    """Whether a migration peer reported by a worker (which may be compromised) is one a daemon makes."""
    if peer is None:
        return True
    try:
        ident = bytes.fromhex(peer.id)
    except ValueError:
        return False
    return (len(ident) == ORIGIN_ID_BYTES and peer.id == ident.hex()
            and (peer.vm is None or VM_NAME.fullmatch(peer.vm) is not None)
            and (peer.host is None or HOST_NAME.fullmatch(peer.host) is not None))


class MigrationPairs:
    """A daemon serving both ends of a migration pairs them: each destination
    VM's migration id (the source's daemon made it, and the source VM
    remembers it), so that the source can name the VM it went to. Keyed by
    the destination's name: at most one entry per configured VM."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}  # destination VM -> id
        self._vms: dict[str, str] = {}  # id -> destination VM

    def arrived(self, vm: str, migration_id: str) -> None:
        old = self._ids.pop(vm, None)
        if old is not None:
            self._vms.pop(old, None)
        self._ids[vm] = migration_id
        self._vms[migration_id] = vm

    def pair(self, peer: MigrationPeer | None) -> MigrationPeer | None:
        """A source's migrated_to, with the destination's name and this host if it came here."""
        if peer is None or peer.vm is not None:
            return peer
        vm = self._vms.get(peer.id)
        if vm is None:
            return peer
        return dataclasses.replace(peer, vm=vm, host=host_name() or None)


def target_pages(value: Any, ram_bytes: int) -> int:
    """Validate a balloon size in bytes for a guest of `ram_bytes` (0: not known yet)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TargetError(f"bytes must be a whole number, not {value!r}")
    if value < 0:
        raise TargetError(f"bytes must not be negative (got {value})")
    if ram_bytes and value > ram_bytes:
        raise TargetError(f"{value} bytes is more than the guest's {ram_bytes} bytes of RAM")
    pages = value // PAGE_SIZE
    if pages > 0xFFFFFFFF:
        raise TargetError("a balloon larger than 2^32 pages cannot be expressed")
    return pages


def stats_interval(seconds: Any) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < 1e9:
        raise TargetError(f"seconds must be a non-negative number, not {seconds!r}")
    return float(seconds)


class VirtualMachine:
    #: The balloon is our device, served over vhost-user.
    kind = "vhost-user"

    def __init__(
        self,
        name: str,
        socket_path: str | None,
        settings: DeviceSettings,
        *,
        poll_seconds: float = 0.0,
        log: Any = None,
        journal: BalloonJournal | None = None,
        max_guest_ram: int = DEFAULT_MAX_GUEST_RAM,
        engine: str = "pure",
    ) -> None:
        self.name = name
        #: Which vhost-user engine serves the socket: "pure" or "libvhost-user".
        self.engine = engine
        #: --max-guest-ram: a larger memory table closes the connection (one log line with the cap).
        self.max_guest_ram = max_guest_ram
        self.journal = journal
        self.socket_path = socket_path
        self.settings = settings
        self.poll_seconds = poll_seconds
        self.log = (log or structlog.get_logger()).bind(vm=name)
        self.target_pages = journal.state.target_pages if journal is not None else 0
        self.listener: VhostUserListener | None = None
        self.connection: AnyConnection | None = None
        #: The current or last connection, kept for its engine counters (like `device`).
        self.last_connection: AnyConnection | None = None
        self.device: BalloonDevice | None = None
        self.connections = 0
        self.last_disconnect: Disconnect | None = None
        #: Migrated-in VMs whose target and stats interval this VM took.
        self.adoptions = 0
        #: The last migrations in and out (ServingStatus), and the daemon's pairing of both ends (or None).
        self.migrated_from: MigrationPeer | None = None
        self.migrated_to: MigrationPeer | None = None
        self.migration_pairs: MigrationPairs | None = None
        self.guest_ram_bytes = 0  # remembered from the last connection
        #: The VM's QMP link (services.qmp_link.QmpLink) when configured with qmp=PATH.
        self.qmp: Any = None
        #: Its discard guard (services.discard_guard.DiscardGuard), with the link.
        self.discard_guard: Any = None
        #: In a worker (no guard of its own): the supervisor's guard's last verdict.
        self.forwarded_inhibit: str | None = None
        #: Called when the balloon comes to rest at its target (a worker
        #: reports that at once: BalloonDevice.on_settled).
        self.on_settled: Callable[[], None] | None = None

    # ------------------------------------------------------------ serving

    async def serve_connection(self, sock: socket.socket) -> None:
        self.connections += 1
        # Who connected (pid + start time, this boot): with the RAM files and
        # the rings, what lets a restarted daemon tell the same QEMU from a new one.
        peer = PeerProcess.of_socket(sock) if self.journal is not None else None
        device = BalloonDevice(
            DeviceSettings(**self.settings.__dict__), target_pages=self.target_pages, log=self.log,
            journal=self.journal, peer=peer,
        )
        device.set_discard_inhibit(self.discard_inhibit)  # before the guest's memory arrives
        device.on_adopted = self._adopted_from_migration
        device.on_saving = self._saving_for_migration
        device.on_settled = self._device_settled
        connection: AnyConnection
        if self.engine == "libvhost-user":
            from .engine.libvhost_user import abi
            from .engine.libvhost_user.connection import LibvhostUserConnection

            try:
                connection = LibvhostUserConnection(sock, device, library=abi.load(), log=self.log,
                                                    poll_seconds=self.poll_seconds,
                                                    max_guest_ram=self.max_guest_ram)
            except abi.LibraryError as exc:
                # Checked at start (config): only a library changed since gets here.
                self.log.error("cannot serve the VM with libvhost-user", error=str(exc))
                sock.close()
                self.last_disconnect = Disconnect(at=time.time(), reason=str(exc))
                return
        else:
            connection = VhostUserConnection(sock, device, log=self.log, poll_seconds=self.poll_seconds,
                                             max_guest_ram=self.max_guest_ram)
        self.device, self.connection = device, connection
        self.last_connection = connection
        try:
            reason = await connection.run()
        finally:
            self.ram_bytes()
            if self.connection is connection:
                self.connection = None
        self.last_disconnect = Disconnect(at=time.time(), reason=str(reason))

    def _device_settled(self) -> None:
        if self.on_settled is not None:
            self.on_settled()

    def _adopted_from_migration(self, target_pages: int, stats_interval: float,
                                origin: MigrationOrigin | None) -> None:
        """A VM migrated in: the operator's target and stats interval come with it."""
        if origin is not None:
            self.migrated_from = MigrationPeer(id=origin.id, vm=origin.vm, host=origin.host or None, at=time.time())
            if self.migration_pairs is not None:
                self.migration_pairs.arrived(self.name, origin.id)
        self.target_pages = target_pages
        self.settings.stats_interval = stats_interval
        self.adoptions += 1
        if self.journal is not None:
            self.journal.target(target_pages)
        self.log.info("target adopted from the migrated-in VM", target_bytes=target_pages * PAGE_SIZE)

    def _saving_for_migration(self) -> MigrationOrigin | None:
        """The device's state is leaving with a migrating VM: its origin, a new id remembered here."""
        if not VM_NAME.fullmatch(self.name):
            return None
        origin = MigrationOrigin(id=os.urandom(ORIGIN_ID_BYTES).hex(), vm=self.name, host=host_name())
        self.migrated_to = MigrationPeer(id=origin.id, at=time.time())
        return origin

    @property
    def connected(self) -> bool:
        return self.connection is not None and self.connection.open

    # ------------------------------------------------------------ control

    def ram_bytes(self) -> int:
        """Guest RAM of the current connection, or what QMP says, or the last connection's."""
        if self.device is not None and self.device.memory is not None and self.device.memory.total_bytes:
            self.guest_ram_bytes = self.device.memory.total_bytes
        elif self.qmp is not None and self.qmp.ram_bytes:
            self.guest_ram_bytes = self.qmp.ram_bytes
        return self.guest_ram_bytes

    def set_target_bytes(self, value: Any) -> int:
        """Validate and apply a balloon size in bytes; returns the pages asked for."""
        pages = target_pages(value, self.ram_bytes())
        self.target_pages = pages
        if self.journal is not None:
            self.journal.target(pages)
        if self.device is not None:
            self.device.set_target(pages)
        self.log.info("target set", target_bytes=pages * PAGE_SIZE)
        return pages

    @property
    def discard_inhibit(self) -> str | None:
        """Why the device must not free guest memory now (None: it may):
        the guard's verdict, which every new connection's device starts with
        (in a worker, the verdict the supervisor's guard last sent)."""
        if self.discard_guard is not None:
            return self.discard_guard.reason
        return self.forwarded_inhibit

    def set_discard_inhibit(self, reason: str | None) -> None:
        """The guard changed its verdict: the live device follows at once."""
        self.forwarded_inhibit = reason
        if self.device is not None:
            self.device.set_discard_inhibit(reason)

    def set_stats_interval(self, seconds: Any) -> None:
        self.settings.stats_interval = stats_interval(seconds)
        if self.device is not None:
            self.device.set_stats_interval(self.settings.stats_interval)

    # ------------------------------------------------------------ reading

    def serving_status(self) -> ServingStatus:
        """What serving the socket knows (in process isolation: the worker's report)."""
        device = self.device.snapshot() if self.device is not None else None
        if device is not None and not self.connected:
            device.running = False
        if device is not None and device.running:
            self.migrated_to = None  # the VM runs here again: that migration did not take it away
        return ServingStatus(
            connected=self.connected,
            connections=self.connections,
            guest_ram_bytes=self.ram_bytes(),
            target_pages=self.target_pages,
            last_disconnect=self.last_disconnect,
            device=device,
            journal_persisting=self.journal.persisting if self.journal is not None else None,
            journal_write_errors=self.journal.write_errors if self.journal is not None else None,
            engine=self._engine_counters(),
            migration=self._migration_state(),
            adoptions=self.adoptions,
            stats_interval=self.settings.stats_interval,
            migrated_from=self.migrated_from,
            migrated_to=self.migrated_to,
        )

    def _migration_state(self) -> str | None:
        """What the connection is doing for a live migration (status.MIGRATION_STATES)."""
        connection = self.connection
        if connection is None or not connection.open:
            return None
        transfer = connection.state_transfer
        if transfer is not None:
            return "sending state" if transfer.saving else "receiving state"
        return "logging" if connection.logging else None

    def _engine_counters(self) -> EngineCounters | None:
        connection = self.last_connection
        if connection is None:
            return None
        return EngineCounters(
            calls_skipped=sum(v.counters.calls_skipped for v in connection.vrings.values()),
            backend_full=connection.backend_full,
            acks_requested=connection.acks_requested,
            lost_kicks=connection.lost_kicks,
        )

    def status(self) -> VmStatus:
        status = compose_status(
            VmStatus(
                name=self.name,
                socket=self.socket_path,
                target_bytes=self.target_pages * PAGE_SIZE,
                stats_interval=self.settings.stats_interval,
                discard_inhibited=self.discard_inhibit,
            ),
            self.serving_status(), self.qmp, self.discard_guard,
        )
        if self.migration_pairs is not None:
            status.migrated_to = self.migration_pairs.pair(status.migrated_to)
        return status

    def summary(self) -> dict[str, Any]:
        """The API's JSON for this VM."""
        return self.status().to_json()

    def status_body(self) -> bytes:
        return encode_status(self.status())

    def pfn_ranges(self) -> dict[str, Any]:
        if self.device is None:
            return {"count": 0, "ranges": []}
        runs = self.device.tracker.runs()
        return {"count": len(self.device.tracker), "ranges": [list(r) for r in runs]}
