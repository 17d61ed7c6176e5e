"""How the guest's balloon device is provided.

Why explicit types: the same scenario is run against our vhost-user backend
and against QEMU's built-in virtio-balloon (the reference behaviour), or with
no balloon at all (the baseline); each type knows the QEMU arguments it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import SetupError
from .qemu import QemuInfo

VIRTIO_ID_BALLOON = 5
#: struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id,
#: poison_val (4 x le32).
BALLOON_CONFIG_SIZE = 16


@dataclass(frozen=True)
class VhostUserBalloon:
    """A balloon served by a vhost-user backend listening on ``socket``.

    ``num_queues`` defaults to 5: inflate, deflate, stats, free page hinting
    and free page reporting.  (The guest driver uses a queue only when the
    matching feature was negotiated.)
    """

    socket: str | Path
    num_queues: int = 5
    chardev_id: str = "vub"
    #: extra chardev options, e.g. "reconnect-ms=1000" for restart scenarios
    chardev_options: str = ""
    #: extra device properties, e.g. {"vq_size": "128"}
    device_options: dict[str, str] = field(default_factory=dict)
    #: QEMU serves the guest's config reads from its copy of the config
    #: space (qemu-patches/0002), refreshed when the daemon announces a
    #: change, instead of a GET_CONFIG round trip to the daemon per read:
    #: the stock driver reads num_pages after every buffer.
    config_cache: bool = True

    def qemu_args(self, qemu: QemuInfo) -> list[str]:
        if qemu.generic_device is None:
            raise SetupError(
                f"{qemu.binary} cannot attach a vhost-user balloon; run as root: scripts/build-qemu.sh"
            )
        return [
            "-chardev",
            f"socket,id={self.chardev_id},path={self.socket}"
            + (f",{self.chardev_options}" if self.chardev_options else ""),
            "-device",
            f"{qemu.generic_device},chardev={self.chardev_id},virtio-id={VIRTIO_ID_BALLOON},"
            f"num_vqs={self.num_queues},config_size={BALLOON_CONFIG_SIZE},"
            f"config-cache={'on' if self.config_cache else 'off'}"
            + "".join(f",{k}={v}" for k, v in self.device_options.items()),
        ]


@dataclass(frozen=True)
class BuiltinBalloon:
    """QEMU's own virtio-balloon-pci; ``options`` are its device properties,
    e.g. {"deflate-on-oom": "on", "free-page-reporting": "on"}."""

    options: dict[str, str] = field(default_factory=dict)
    device_id: str = "balloon0"

    def qemu_args(self, qemu: QemuInfo) -> list[str]:
        props = "".join(f",{k}={v}" for k, v in self.options.items())
        return ["-device", f"virtio-balloon-pci,id={self.device_id}{props}"]


Balloon = VhostUserBalloon | BuiltinBalloon | None
