"""DiscardGuard: whether freeing a VM's ballooned memory is safe right now,
as far as its QMP link can tell.

QEMU stops its own balloon from discarding guest RAM while something relies
on that RAM staying put: an assigned device (VFIO pins guest pages for DMA; a
discarded page would be replaced behind the device's back), postcopy
migration (the destination fills pages on first touch and must not see them
vanish), a background snapshot or COLO. That inhibit lives inside QEMU and
does not reach an out-of-process balloon, so balloond asks QEMU and applies
the same rule itself. The device keeps acknowledging inflates while discards
are refused (the guest's balloon still works, its frames are still tracked)
and frees all of them once the guard opens again.

What closes the guard:
- a device whose QOM type starts with "vfio" among the VM's devices
  (/machine/peripheral and /machine/peripheral-anon: where -device and
  device_add put them);
- any migration in progress (`query-migrate` status other than none,
  completed, failed or cancelled). QEMU itself only needs postcopy to stop
  discards, but a migration can switch to postcopy between two looks; closing
  at its first sign leaves no such window. The policy leaves migrating VMs
  alone anyway;
- not knowing: the link is down or has not answered yet. Failing closed
  costs a late discard; failing open could corrupt a guest.

QEMU announces migrations (the MIGRATION event) only while the "events"
migration capability is on, and it is off unless someone turns it on. So on
every connect, before its first look, the guard turns it on
(`migrate-set-capabilities`): from then on a migration that starts is
announced and the guard closes at once, not at its next poll. The capability
is QEMU's, shared by every monitor client (libvirt turns it on too); a QEMU
that restarted has it off again, hence every connect. QEMU refuses to change
capabilities while a migration runs: the guard then says once that it relies
on polling, and asks again when it sees that migration end.

QEMU announces no device hot-plug at all, so the guard also looks every
`poll_interval` seconds (1 s): a VFIO device hot-plugged in between two looks
is the window that remains (docs/policy.md). Polling also covers a migration
that someone else started with events turned off again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

from .qmp_link import QmpWatch

#: Where QEMU puts devices created with -device or device_add.
DEVICE_CONTAINERS = ("/machine/peripheral", "/machine/peripheral-anon")
#: query-migrate statuses of no migration in progress.
MIGRATION_IDLE = frozenset({"none", "completed", "failed", "cancelled"})
NOT_CONNECTED = "QMP not connected: cannot tell whether discards are safe"


async def list_devices(client: QMPClient) -> list[tuple[str, str]]:
    """The VM's devices as (QOM path, type), from the two peripheral containers."""
    found = []
    for container in DEVICE_CONTAINERS:
        try:
            entries = await client.execute("qom-list", {"path": container})
        except ExecuteError as exc:
            if exc.error_class == "DeviceNotFound":
                continue  # a machine without that container
            raise
        for entry in entries if isinstance(entries, list) else []:
            kind = str(entry.get("type", ""))
            if kind.startswith("child<") and kind.endswith(">"):
                found.append((f"{container}/{entry.get('name')}", kind[6:-1]))
    return found


class DiscardGuard(QmpWatch):
    events = ("MIGRATION", "DEVICE_DELETED", "STOP", "RESUME")
    poll_interval: float | None = 1.0

    def __init__(self, on_change: Callable[[str | None], None], *, log: Any, poll_interval: float = 1.0) -> None:
        self.on_change = on_change
        self.log = log
        self.poll_interval = poll_interval
        #: Why discards are refused; None when they are allowed.
        self.reason: str | None = NOT_CONNECTED
        self.vfio_devices: list[str] = []
        self.migration_status: str | None = None
        self.devices_seen = 0
        self.checked_at: float | None = None
        #: Whether QEMU announces migrations to us: True once the "events"
        #: capability is on, False if QEMU refused it, None while not known.
        self.migration_events: bool | None = None
        #: QEMU refused the capability while a migration ran: ask again when it ends.
        self._events_retry = False

    def summary(self) -> dict[str, Any]:
        return {
            "discard_inhibited": self.reason,
            "vfio_devices": list(self.vfio_devices),
            "migration_status": self.migration_status,
            "devices_seen": self.devices_seen,
            "checked_at": self.checked_at,
            "migration_events": self.migration_events,
        }

    async def on_connect(self, client: QMPClient) -> None:
        """Turn migration events on, then look: a migration that starts after
        the look is announced, one that started before it is seen by it."""
        self._events_retry = False
        await self._enable_migration_events(client, first=True)
        await self.refresh(client)

    async def _enable_migration_events(self, client: QMPClient, *, first: bool) -> None:
        try:
            await client.execute("migrate-set-capabilities",
                                 {"capabilities": [{"capability": "events", "state": True}]})
        except ExecuteError as exc:
            self.migration_events = False
            if first:  # once per session: the retry after a migration stays quiet
                self.log.warning("migration events refused: the discard guard relies on polling",
                                 poll_interval=self.poll_interval, error_class=exc.error_class, error=str(exc))
            return
        self.migration_events = True
        self.log.info("migration events on", retried=not first)

    async def refresh(self, client: QMPClient) -> None:
        try:
            devices = await list_devices(client)
            migration = await client.execute("query-migrate")
        except ExecuteError as exc:  # QEMU answers, but not this: still cannot tell
            self._set(f"QMP could not tell whether discards are safe ({exc.error_class}: {exc})")
            return
        status = str(migration.get("status", "none")) if isinstance(migration, dict) else "none"
        if self.migration_events is False:
            if status not in MIGRATION_IDLE:
                self._events_retry = True  # refused because of this migration, most likely
            elif self._events_retry:
                self._events_retry = False
                await self._enable_migration_events(client, first=False)
        self.vfio_devices = [path for path, kind in devices if kind.startswith("vfio")]
        self.devices_seen = len(devices)
        self.migration_status = status
        self.checked_at = time.time()
        reasons = []
        if self.vfio_devices:
            reasons.append("assigned device(s) (VFIO): " + ", ".join(self.vfio_devices))
        if status not in MIGRATION_IDLE:
            what = "postcopy migration" if status.startswith("postcopy") else "migration"
            reasons.append(f"{what} in progress ({status})")
        self._set("; ".join(reasons) or None)

    def forget(self) -> None:
        self.vfio_devices = []
        self.migration_status = None
        self.migration_events = None
        self._events_retry = False
        self._set(NOT_CONNECTED)

    def _set(self, reason: str | None) -> None:
        if reason == self.reason:
            return
        if reason is None:
            self.log.info("discards allowed", was=self.reason)
        else:
            self.log.warning("discards refused", reason=reason)
        self.reason = reason
        self.on_change(reason)
