"""VmStatus: what one VM looks like right now, as typed values.

The API, `balloonctl status`, the metrics and the policy all read the same
facts about a VM; with one dataclass for them a field renamed or misspelt
is an error where it is made, not a missing key found at scrape time. The
same values cross the channel from a VM's worker process (see
balloond/worker/), so a typed decoder can check what a worker says.

JSON exists only at the HTTP edge: `VmStatus.to_json()` gives the object
GET /v1/vms/{name} has always sent (same field names, same values).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class DeviceStatus:
    """What a connected BalloonDevice knows (BalloonDevice.snapshot())."""

    features: list[str] = field(default_factory=list)
    guest_ram_bytes: int = 0
    target_bytes: int = 0
    actual_bytes: int = 0
    ballooned_bytes: int = 0
    host_freed_bytes: int = 0
    reported_freed_bytes: int = 0
    resident_bytes: int = 0
    pending_discard_bytes: int = 0
    discard_inhibited: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    stats_updated_at: float | None = None
    migrations: int = 0
    running: bool = False
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class EngineCounters:
    """What the vhost-user engine counted for a frontend. The first two are
    what it declined to do so as never to block on an fd the frontend shares
    (see balloond/engine/vring.py): a non-zero value means a frontend that
    is broken or hostile, which an operator should see next to the device's
    own counters."""

    #: Interrupts not sent: the call eventfd could not take a write.
    calls_skipped: int = 0
    #: Config changes the backend channel had no room for (sent again later).
    backend_full: int = 0
    #: Requests the frontend asked to have acknowledged (REPLY_ACK's
    #: NEED_REPLY). QEMU waits for each such answer holding its big lock;
    #: with config-cache=on its config writes do not ask (qemu-patches/0005).
    acks_requested: int = 0
    #: Rings found with buffers waiting and no kick to wake the daemon,
    #: served by its periodic look (engine/polling.py, LOST_KICK_CHECK_SECONDS).
    lost_kicks: int = 0


@dataclass
class Disconnect:
    """When and why the VM's last frontend went away."""

    at: float
    reason: str


@dataclass
class MigrationPeer:
    """The other end of a live migration this VM took part in (see
    docs/migration.md, "Who migrated where")."""

    #: The migration's id: 32 hex digits, made by the source's daemon.
    id: str
    #: The other VM's name as its daemon knows it; None: not known here (the
    #: destination is served by another daemon, or has not adopted the state yet).
    vm: str | None = None
    #: The other end's host name; None: not known.
    host: str | None = None
    #: When this daemon saved (source) or adopted (destination) the state (Unix time).
    at: float = 0.0


@dataclass
class ServingStatus:
    """What the code serving a VM's socket knows: its connections, device and
    journal. In process isolation this is all a worker can tell the
    supervisor (the QMP link, the guard and the target live there)."""

    connected: bool = False
    connections: int = 0
    guest_ram_bytes: int = 0
    target_pages: int = 0
    last_disconnect: Disconnect | None = None
    device: DeviceStatus | None = None
    #: None without --state-dir.
    journal_persisting: bool | None = None
    journal_write_errors: int | None = None
    #: The last connection's engine counters; None before any connection.
    engine: EngineCounters | None = None
    #: Live migration as the serving side sees it (MIGRATION_STATES), or None.
    migration: str | None = None
    #: How many migrated-in VMs this VM took its target and stats interval
    #: from (each a change the operator did not command: the supervisor
    #: takes both when this grows), and the stats interval in force.
    adoptions: int = 0
    stats_interval: float = 0.0
    #: The last live migration that brought this VM here, and the last that
    #: took its state away (cleared when the VM runs here again after it).
    migrated_from: MigrationPeer | None = None
    migrated_to: MigrationPeer | None = None


#: What `migration` says: QEMU is migrating the VM out and the daemon marks
#: its writes to guest memory in QEMU's dirty log; the device's state is
#: being sent to QEMU (the VM is stopped on the source); it is being
#: received from QEMU (on the destination, before the VM runs there).
MIGRATION_STATES = ("logging", "sending state", "receiving state")


@dataclass
class WorkerStatus:
    """The process serving a VM (process isolation only)."""

    state: str  # "running" | "restarting" | "stopped"
    pid: int | None = None
    restarts: int = 0
    #: How the last worker ended: "killed by SIGBUS", "exit code 1", "no heartbeat for 5.0 s".
    last_exit: str | None = None


#: Sent only by VMs on QEMU's built-in balloon (QemuBalloonVm over QMP,
#: LibvirtBalloonVm through libvirt): the kinds that look at a device.
_QEMU_ONLY = ("device", "last_error", "updated_at")
_BUILTIN_KINDS = ("qemu", "libvirt")
#: Left out of the JSON when None: the VM has no such thing (no device yet, no journal, no worker).
_OMIT_IF_NONE = ("pending_discard_bytes", "journal_persisting", "worker")


def _plain(value: Any) -> Any:
    """A field's value as JSON-ready data: nested dataclasses become dicts,
    containers are copied (the caller may keep the answer)."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


@dataclass
class VmStatus:
    """One VM, whichever device backs its balloon. None: this kind of VM cannot tell."""

    name: str
    kind: str = "vhost-user"
    socket: str | None = None
    qmp: str | None = None
    connected: bool = False
    connections: int = 0
    guest_ram_bytes: int = 0
    target_bytes: int = 0
    stats_interval: float = 0.0
    last_disconnect: Disconnect | None = None
    qmp_connected: bool = False
    run_state: str | None = None
    discard_inhibited: str | None = None
    discard_guard: dict[str, Any] | None = None
    device: str | None = None
    last_error: str | None = None
    features: list[str] = field(default_factory=list)
    actual_bytes: int = 0
    ballooned_bytes: int = 0
    host_freed_bytes: int | None = 0
    reported_freed_bytes: int | None = 0
    resident_bytes: int | None = 0
    pending_discard_bytes: int | None = None
    stats: dict[str, int] = field(default_factory=dict)
    stats_updated_at: float | None = None
    migrations: int | None = 0
    running: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    journal_persisting: bool | None = None
    updated_at: float | None = None
    worker: WorkerStatus | None = None
    #: See MIGRATION_STATES; None: not migrating (or not a kind that can tell).
    migration: str | None = None
    #: See ServingStatus; migrated_to.vm is filled in when one daemon serves both ends.
    migrated_from: MigrationPeer | None = None
    migrated_to: MigrationPeer | None = None

    def apply_device(self, device: DeviceStatus) -> None:
        """Take the live device's numbers (its own discard verdict included)."""
        for f in dataclasses.fields(device):
            if f.name not in ("guest_ram_bytes", "target_bytes"):
                setattr(self, f.name, getattr(device, f.name))
        self.stats = dict(device.stats)
        self.counters = dict(device.counters)
        self.features = list(device.features)

    def to_json(self) -> dict[str, Any]:
        """The API's object for this VM (the HTTP edge; nothing else reads it):
        what dataclasses.asdict gives, made without its deep copies, for a
        list of many VMs is answered by one process (measured: 160 us a VM
        with asdict; see tests/unit/test_status.py)."""
        out = {name: _plain(value) for name, value in vars(self).items()}
        for key in _QEMU_ONLY if self.kind not in _BUILTIN_KINDS else ():
            del out[key]
        for key in _OMIT_IF_NONE:
            if out[key] is None:
                del out[key]
        return out


def encode_status(status: VmStatus) -> bytes:
    """One VM's API object as the bytes of a JSON document (a list of many VMs
    is these joined, so that a VM unchanged since the last read is not encoded again)."""
    return json.dumps(status.to_json()).encode()
