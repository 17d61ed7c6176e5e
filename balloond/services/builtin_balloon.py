"""What a VM on QEMU's built-in virtio-balloon is to the API and the policy,
however the daemon reaches that balloon: over the VM's QMP socket
(qemu_balloon.QemuBalloonVm) or through libvirt (libvirt_balloon.
LibvirtBalloonVm). One place for the rules both follow, so the two kinds
cannot drift apart: a target is checked like any VM's and may not be all of
the guest's RAM (QEMU refuses a logical size of 0), a new setting is pushed
at once rather than at the next look, and which frames are ballooned is not
something QEMU's device tells.
"""

from __future__ import annotations

from typing import Any

from protocol.balloon import PAGE_SIZE

from ..status import VmStatus, encode_status
from ..vm import NotSupported, TargetError, stats_interval, target_pages


class BuiltinBalloonControl:
    """The settings part of ManagedVm for QEMU's built-in balloon, and its
    status as the API's JSON. The class using it has `status()`,
    `guest_ram_bytes` (0: not known yet), `target_bytes`, `stats_interval`,
    `log`, and `_schedule_push()`, which sends the settings to QEMU soon,
    from the event loop."""

    guest_ram_bytes: int
    target_bytes: int | None
    stats_interval: float
    log: Any

    def _schedule_push(self) -> None:
        raise NotImplementedError

    def status(self) -> VmStatus:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """The API's JSON for this VM."""
        return self.status().to_json()

    def status_body(self) -> bytes:
        return encode_status(self.status())

    def set_target_bytes(self, value: Any) -> int:
        ram = self.guest_ram_bytes
        pages = target_pages(value, ram)
        if ram and pages * PAGE_SIZE >= ram:
            raise TargetError("QEMU's balloon cannot take all of the guest's RAM")
        self.target_bytes = pages * PAGE_SIZE
        self.log.info("target set", target_bytes=self.target_bytes)
        self._schedule_push()
        return pages

    def set_stats_interval(self, seconds: Any) -> None:
        self.stats_interval = stats_interval(seconds)
        self._schedule_push()

    def pfn_ranges(self) -> dict[str, Any]:
        raise NotSupported("QEMU's built-in balloon does not tell which guest frames it holds")
