"""The interface between the vhost-user engine and a virtio device model.

The engine owns sockets, memory and eventfds and drives the vhost-user state
machine; the device decides what the queues and the config space mean. This
seam is what lets the balloon be tested without sockets and the engine be
tested without a balloon.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .memory import GuestMemory
    from .vring import Vring


class DeviceHost(Protocol):
    """What the engine offers a device."""

    def config_changed(self) -> bool:
        """Tell the driver the config space changed; False if it cannot be told now."""
        ...


class VirtioDevice(Protocol):
    #: Device feature bits offered to the driver (the engine adds vhost-user's own).
    features: int

    def attach(self, host: DeviceHost) -> None:
        """Called once, before any other call, with the engine's side of the seam."""

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def set_features(self, features: int) -> None:
        """The driver's acknowledged features (a subset of `features`)."""

    def memory_unmapping(self) -> None:
        """Guest RAM's mappings and fds are about to be closed or replaced."""

    def set_memory(self, memory: GuestMemory) -> None:
        """Guest RAM was (re)mapped; ring views into the old mapping are gone."""

    def queue_started(self, vring: Vring) -> None:
        """A ring is live: look at it now (the driver may have primed it)."""

    def queue_kicked(self, vring: Vring) -> None:
        """The driver added buffers to a live ring."""

    def poll_partners(self, index: int) -> Iterable[int]:
        """The other queues whose next buffer may follow one on queue `index`
        (a driver waiting on one ring, then adding to another): the engine
        polls them together after a kick. Optional; without it the engine
        polls every live ring."""
        ...

    def queue_stopped(self, vring: Vring) -> int:
        """The ring stops; return how many popped chains the device still holds
        (they are handed back to the frontend as not consumed)."""
        ...

    def started(self) -> None:
        """Every configured ring is live and enabled: the device is running."""

    def stopped(self) -> None:
        """The frontend stopped the device (VM paused, driver reset, QEMU exit)."""

    def disconnected(self) -> None:
        """The frontend went away; release everything tied to the connection."""

    # Migration (optional: a device without them is not offered DEVICE_STATE
    # transfers; the engine refuses them).

    def save_state(self) -> bytes:
        """The stopped device's state, for QEMU to carry to the destination."""
        ...

    def load_state(self, data: bytes) -> None:
        """Adopt a state saved by `save_state` on the source; ValueError refuses it."""

    def logging_changed(self, on: bool) -> None:
        """The frontend turned dirty logging (VHOST_F_LOG_ALL) on or off."""
