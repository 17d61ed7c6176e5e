"""The interface between the vhost-user engine and a virtio device model.

The engine owns sockets, memory and eventfds and drives the vhost-user state
machine; the device decides what the queues and the config space mean. This
seam is what lets the balloon be tested without sockets and the engine be
tested without a balloon.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from protocol.errors import GuestError
from protocol.virtqueue import Chain, GuestMemoryAccess

if TYPE_CHECKING:
    from .vring import VringCounters


class RamRegion(Protocol):
    """One region of guest RAM as an engine mapped it."""

    @property
    def gpa(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def fd(self) -> int:
        """An fd of the file behind the region (for its identity and allocated size)."""
        ...

    @property
    def file_offset(self) -> int:
        """Offset of `gpa` in that file."""
        ...


class GuestRam(GuestMemoryAccess, Protocol):
    """What a device needs of guest RAM: the pure engine's `GuestMemory`,
    or the regions libvhost-user mapped (`libvhost_user.memory`)."""

    @property
    def regions(self) -> Sequence[RamRegion]: ...

    def ram_ranges(self, page_shift: int = 12) -> list[tuple[int, int]]:
        """Guest RAM as (first_pfn, page_count) ranges."""
        ...

    @property
    def total_bytes(self) -> int: ...


class Ring(Protocol):
    """One live virtqueue as a device uses it: the pure engine's `Vring`
    (over `protocol.virtqueue.SplitQueue`), or libvhost-user's queue
    (`libvhost_user.ring.LibRing`: vu_queue_pop / vu_queue_push / vu_queue_notify)."""

    index: int
    counters: VringCounters

    @property
    def base(self) -> int:
        """The avail index the ring (re)started from."""
        ...

    @property
    def live(self) -> bool: ...

    @property
    def last_avail(self) -> int:
        """The next avail slot the device will consume."""
        ...

    def pop_chains(self, memory: GuestMemoryAccess, on_error: Callable[[GuestError], None]) -> list[Chain]:
        """The chains available now, bounded per pass, in guest-physical
        segments; a bad chain goes to `on_error` (how the ring recovers is the
        engine's: returned empty, or the connection is broken)."""
        ...

    def push(self, head: int, written: int) -> None:
        """Hand the chain `head` (one `pop_chains` returned) back to the guest."""

    def notify(self) -> None:
        """Interrupt the guest if it wants one for what was pushed."""


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

    def set_memory(self, memory: GuestRam) -> None:
        """Guest RAM was (re)mapped; ring views into the old mapping are gone."""

    def queue_started(self, vring: Ring) -> None:
        """A ring is live: look at it now (the driver may have primed it)."""

    def queue_kicked(self, vring: Ring) -> None:
        """The driver added buffers to a live ring."""

    def poll_partners(self, index: int) -> Iterable[int]:
        """The other queues whose next buffer may follow one on queue `index`
        (a driver waiting on one ring, then adding to another): the engine
        polls them together after a kick. Optional; without it the engine
        polls every live ring."""
        ...

    def queue_stopped(self, vring: Ring) -> int:
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
