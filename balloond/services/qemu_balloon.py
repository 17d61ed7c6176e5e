"""QemuBalloonVm: a VM whose balloon is QEMU's built-in virtio-balloon,
steered over QMP, so one host can mix it with VMs on balloond's device.

Operators rarely move every VM at once; a host that overcommits needs the
policy to see and steer all of its guests. For a VM configured with only a
QMP socket (`--vm NAME=qmp:PATH`) the daemon plays the part QEMU's own
`balloon`/`query-balloon` users play, behind the same API, metrics and
policy as its own VMs:

- its RAM size from `query-memory-size-summary` (the link's own watch);
- the balloon from `query-balloon` (QEMU reports the guest's *logical* size,
  RAM minus balloon) and the BALLOON_CHANGE events;
- the guest's statistics from the device's `guest-stats` QOM property, after
  setting `guest-stats-polling-interval` to the daemon's stats interval;
- targets through `balloon` (whose argument is, again, the logical size).

What QEMU does not say, the summary leaves as None rather than guessing:
which frames are ballooned and how much host memory the discards freed.
Resident memory is QEMU's own (RssAnon + RssShmem of its process, found from
the QMP socket's peer credentials), so it includes QEMU's overhead, and is
None where the daemon may not look at QEMU's process (ProtectProc=invisible
in the shipped unit, with QEMU under another user).

Discards are QEMU's business here: its balloon honours its own inhibit
(VFIO, postcopy), so this kind of VM has no discard guard.

A daemon that starts (or restarts) takes over the balloon QEMU has: the first
target is the balloon found, unless the operator or the policy sets one.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import structlog
from qemu.qmp import ExecuteError, QMPClient

from protocol.balloon import PAGE_SIZE, decode_qemu_guest_stats

from ..status import VmStatus
from .builtin_balloon import BuiltinBalloonControl
from .discard_guard import list_devices
from .qmp_link import QmpLink, QmpUnavailable, QmpWatch

#: QOM types of QEMU's balloon (PCI proxy, CCW proxy, the bare device).
BALLOON_TYPES = ("virtio-balloon-pci", "virtio-balloon-pci-transitional", "virtio-balloon-pci-non-transitional",
                 "virtio-balloon-ccw", "virtio-balloon-device")


def qemu_resident_bytes(pid: int | None) -> int | None:
    """QEMU's resident memory (anonymous + shared), or None if it cannot be read."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return sum(int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssShmem"))
    except (OSError, KeyError, ValueError, IndexError):
        return None


class QemuBalloonVm(BuiltinBalloonControl, QmpWatch):
    kind = "qemu"
    events = ("BALLOON_CHANGE", "DEVICE_DELETED")

    def __init__(self, name: str, link: QmpLink, *, stats_interval: float = 5.0, log: Any = None,
                 poll_interval: float = 1.0) -> None:
        self.name = name
        self.qmp = link
        self.log = (log or structlog.get_logger()).bind(vm=name)
        self.poll_interval: float | None = poll_interval
        self.stats_interval = stats_interval
        #: The balloon asked for (bytes); None until set or taken over from QEMU.
        self.target_bytes: int | None = None
        self.device_path: str | None = None
        self.guest_ram_bytes = 0
        self.logical_bytes: int | None = None  # query-balloon's "actual": RAM - balloon
        self.stats: dict[str, int] = {}
        self.stats_updated_at: float | None = None
        self.last_error: str | None = None
        self.targets_sent = 0
        self._sent: int | None = None  # the target QEMU has now (this session)
        self._polling_set: int | None = None  # guest-stats-polling-interval set (this session)
        self._push: asyncio.Task[None] | None = None
        link.add(self)

    # ------------------------------------------------------------- the watch

    async def refresh(self, client: QMPClient) -> None:
        if self.device_path is None:
            found = [path for path, kind in await list_devices(client) if kind in BALLOON_TYPES]
            if not found:
                self._problem("no virtio-balloon device in this VM")
                return
            self.device_path = found[0]
            self.log.info("QEMU balloon found", device=self.device_path)
        self.guest_ram_bytes = self.qmp.ram_bytes or 0  # the link's RamSize watch looked first
        try:
            reply = await client.execute("query-balloon")
        except ExecuteError as exc:  # DeviceNotActive: the guest has not got a driver yet
            self.logical_bytes = None
            self._problem(f"QEMU's balloon is not active: {exc}")
            return
        actual = reply.get("actual") if isinstance(reply, dict) else None
        if not isinstance(actual, int) or isinstance(actual, bool):
            self.logical_bytes = None
            self._problem(f"QEMU's query-balloon reply has no size: {reply!r}")
            return
        self.logical_bytes = actual
        # Before any other await: a reader (the policy, the API) must not see
        # a connected VM without its target, or with the error of a look that
        # found no device. Errors of the calls below are raised to the link.
        self.last_error = None
        self._take_over()
        await self._sync_stats(client)
        await self._apply(client)

    async def on_event(self, client: QMPClient, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if event.get("event") == "BALLOON_CHANGE" and isinstance(data.get("actual"), int):
            self.logical_bytes = data["actual"]
        elif event.get("event") == "DEVICE_DELETED" and self.device_path is not None and (
            data.get("path") == self.device_path or data.get("device") == self.device_path.rsplit("/", 1)[-1]
        ):
            self.log.warning("QEMU balloon removed", device=self.device_path)
            self.forget()  # a balloon added later gets the target and stats polling again

    def forget(self) -> None:
        self.device_path = None
        self.logical_bytes = None
        self._sent = None
        self._polling_set = None

    def _problem(self, message: str) -> None:
        if message != self.last_error:
            self.log.warning("QEMU balloon unavailable", error=message)
        self.last_error = message

    async def _sync_stats(self, client: QMPClient) -> None:
        assert self.device_path is not None
        wanted = math.ceil(self.stats_interval) if self.stats_interval > 0 else 0
        if self._polling_set != wanted:
            await client.execute("qom-set", {"path": self.device_path, "property": "guest-stats-polling-interval",
                                             "value": wanted})
            self._polling_set = wanted
        if not wanted:
            return
        reply = await client.execute("qom-get", {"path": self.device_path, "property": "guest-stats"})
        if not isinstance(reply, dict):
            return
        updated = reply.get("last-update")
        if isinstance(updated, int) and updated > 0:  # 0: the guest has sent nothing yet
            self.stats = decode_qemu_guest_stats(reply.get("stats"))
            self.stats_updated_at = float(updated)

    def _take_over(self) -> None:
        """No target yet (a daemon that just started): keep the balloon QEMU has."""
        if self.target_bytes is None and self.logical_bytes is not None and self.guest_ram_bytes:
            self.target_bytes = max(0, self.guest_ram_bytes - self.logical_bytes) // PAGE_SIZE * PAGE_SIZE
            self.log.info("took over QEMU's balloon", target_bytes=self.target_bytes)
            self._sent = self.target_bytes

    async def _apply(self, client: QMPClient) -> None:
        ram = self.guest_ram_bytes
        if self.logical_bytes is None or not ram or self.target_bytes is None:
            return
        target = min(self.target_bytes, ram - PAGE_SIZE)  # QEMU refuses a logical size of 0
        if target != self._sent:
            await client.execute("balloon", {"value": ram - target})
            self._sent = target
            self.targets_sent += 1
            self.log.info("target sent to QEMU", target_bytes=target, logical_bytes=ram - target)

    async def _push_now(self) -> None:
        """Send a changed setting without waiting for the next look."""
        try:
            client = self.qmp.client()
            if self.device_path is None:
                return  # found, and the setting applied, on the next look
            await self._sync_stats(client)
            await self._apply(client)
        except QmpUnavailable:
            pass  # sent on the next connect
        except ExecuteError as exc:
            self._problem(f"QEMU refused: {exc}")
        except Exception as exc:  # noqa: BLE001 - the session's own task reports a dropped link
            self.log.debug("QEMU balloon push failed", error=f"{type(exc).__name__}: {exc}")

    def _schedule_push(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (tests, tools): applied on the next look
        if self._push is None or self._push.done():
            self._push = asyncio.create_task(self._push_now(), name=f"balloond-qemu-balloon-{self.name}")

    # ------------------------------------------------------------- control

    @property
    def connected(self) -> bool:
        return self.qmp.connected and self.logical_bytes is not None

    # ------------------------------------------------------------- reading

    def ballooned_bytes(self) -> int:
        if self.logical_bytes is None or not self.guest_ram_bytes:
            return 0
        return max(0, self.guest_ram_bytes - self.logical_bytes)

    def status(self) -> VmStatus:
        ballooned = self.ballooned_bytes()
        return VmStatus(
            name=self.name,
            kind=self.kind,
            socket=None,
            qmp=self.qmp.path,
            connected=self.connected,
            connections=self.qmp.connects,
            guest_ram_bytes=self.guest_ram_bytes,
            target_bytes=self.target_bytes or 0,
            stats_interval=self.stats_interval,
            last_disconnect=None,
            qmp_connected=self.qmp.connected,
            run_state=self.qmp.status,
            discard_inhibited=None,  # QEMU's own device enforces its inhibit
            discard_guard=None,
            device=self.device_path,
            last_error=self.last_error,
            actual_bytes=ballooned,
            ballooned_bytes=ballooned,
            host_freed_bytes=None,
            reported_freed_bytes=None,
            resident_bytes=qemu_resident_bytes(self.qmp.pid),
            features=[],
            stats=dict(self.stats),
            stats_updated_at=self.stats_updated_at,
            migrations=None,
            running=self.connected and self.qmp.running is True,
            counters={"targets_sent": self.targets_sent},
            updated_at=time.time(),
        )
