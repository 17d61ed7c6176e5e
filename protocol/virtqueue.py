"""The split virtqueue: layout, chain walking and used-ring publication.

Everything here works on memory views the caller provides: the three ring
areas, and a `GuestMemoryAccess` that turns guest-physical addresses into
views. Nothing here maps memory or signals eventfds.

The guest is untrusted. Every index read from guest memory is checked before
use, chains are bounded by the queue size (so a looping chain is an error,
not a hang), and indirect tables are bounded by their own length.

Memory ordering: Python issues no barriers of its own. Publishing a used
element and then the used index with two plain stores, and reading the avail
index before the ring entries it covers, is correct on a TSO machine (x86-64),
which is what this daemon runs on; a port to a weakly ordered machine needs
real barriers in `SplitQueue.push` and `SplitQueue.pop`.

TSO still lets a store be passed by a later load from another address, and
the two notification handshakes are exactly that pattern on both sides: the
device stores "kick me" (or the used index) and then loads the avail index
(or the driver's used_event), while the driver stores the avail index (or
used_event) and then loads the device's flag (or the used index). Without a
full barrier between the store and the load each side can read the other's
old value, and the device sleeps waiting for a kick that the driver thought
unnecessary, or the driver for an interrupt the device thought unwanted.
Linux (virtio_mb) and QEMU (smp_mb in virtio_should_notify and after
re-enabling notification) put one there; so does this module
(`full_barrier`, in `enable_kicks` and `should_notify`).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

from .errors import GuestError

DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size  # 16
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

#: Largest queue size the split ring allows.
MAX_QUEUE_SIZE = 32768

#: Descriptors one pass over a ring may walk (see `descriptor_budget`). A
#: chain costs about a microsecond per descriptor in Python; without a budget
#: a guest that puts one chain of `num` descriptors in all `num` avail slots
#: makes a single kick walk num**2 of them (1.4 s at 1024).
MAX_DESCRIPTORS_PER_PASS = 2048


def descriptor_budget(num: int) -> int:
    """Descriptors one pass may walk: a fixed budget, but never less than the
    longest walk of one chain (an indirect descriptor, then a table of `num`
    and the one step that proves it loops), so a fresh pass always gets
    through its first chain and a ring never stalls on one."""
    return max(MAX_DESCRIPTORS_PER_PASS, num + 2)


class BudgetExhausted(Exception):
    """The pass's descriptor budget ran out in the middle of a chain: not the
    guest's fault; the chain is walked again, whole, by the next pass."""


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int, event_idx: bool = True) -> int:
    """flags, idx, ring[num], used_event."""
    return 4 + 2 * num + (2 if event_idx else 0)


def used_ring_size(num: int, event_idx: bool = True) -> int:
    """flags, idx, ring[num] of (id, len), avail_event."""
    return 4 + 8 * num + (2 if event_idx else 0)


_FENCE = threading.Lock()


def full_barrier() -> None:
    """Order every earlier store before every later load (see the module
    docstring). Taking and releasing an uncontended lock is a locked
    read-modify-write on x86-64, which is a full fence; about 100 ns."""
    _FENCE.acquire()
    _FENCE.release()


def valid_queue_size(num: int) -> bool:
    return 0 < num <= MAX_QUEUE_SIZE and num & (num - 1) == 0


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The virtio rule: notify if event_idx lies in [old_idx, new_idx)."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def interrupt_wanted(*, event_idx: bool, avail_flags: int, used_event: int,
                     signalled_valid: bool, signalled_used: int, used_idx: int) -> bool:
    """Whether the driver wants an interrupt for the used entries up to
    `used_idx`, the last one signalled being `signalled_used` (unknown
    unless `signalled_valid`). Without EVENT_IDX the driver's avail flags
    say it (NO_INTERRUPT); with it, its used_event index. One rule for both
    engines' rings, which keep that state in different places."""
    if not event_idx:
        return not avail_flags & VRING_AVAIL_F_NO_INTERRUPT
    return not signalled_valid or need_event(used_event, used_idx, signalled_used)


class GuestMemoryAccess(Protocol):
    """What chain walking needs from guest memory."""

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest-physical [gpa, gpa+length); raises GuestAddressError."""
        ...


@dataclass(frozen=True)
class Segment:
    """One descriptor's buffer, in guest-physical addresses."""

    addr: int
    length: int
    writable: bool


@dataclass(frozen=True)
class Chain:
    """A descriptor chain popped from the avail ring."""

    head: int
    segments: tuple[Segment, ...]
    #: Descriptors walked to build it (indirect ones included): its cost.
    descriptors: int = 0

    @property
    def readable(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if not s.writable)

    @property
    def writable(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.writable)

    def read_bytes(self, memory: GuestMemoryAccess, limit: int) -> bytes:
        """The device-readable bytes of the chain, concatenated, at most `limit`."""
        out = bytearray()
        for seg in self.segments:
            if seg.writable or not seg.length:
                continue
            if len(out) >= limit:
                break
            take = min(seg.length, limit - len(out))
            out += memory.view(seg.addr, take)
        return bytes(out)


def available(avail: memoryview, last_avail: int, num: int) -> int:
    """Chains the guest has made available past `last_avail` in the avail
    ring `avail` of a queue of `num`. Raises GuestError when the avail index
    is more than a queue ahead: nothing on that ring can be trusted until
    the driver resets it.

    Looks up to three more times before declaring the ring broken: a 16-bit
    store by another process to shared memory has been seen to read back
    torn on some virtualised hosts, and a stalled ring costs more than a
    second load."""
    count = (U16.unpack_from(avail, 2)[0] - last_avail) & 0xFFFF
    if count > num:
        for _ in range(3):
            count = (U16.unpack_from(avail, 2)[0] - last_avail) & 0xFFFF
            if count <= num:
                return count
        raise GuestError(f"avail index moved {count} entries ahead of a queue of {num}")
    return count


def avail_head(avail: memoryview, last_avail: int, num: int) -> int:
    """The head index in the avail slot of `last_avail` (unchecked)."""
    return U16.unpack_from(avail, 4 + 2 * (last_avail % num))[0]


def walk_chain(
    desc_table: memoryview,
    queue_size: int,
    head: int,
    memory: GuestMemoryAccess,
    indirect_allowed: bool,
    *,
    budget: int | None = None,
) -> Chain:
    """Follow the descriptor chain starting at `head`.

    Rules enforced (virtio 1.2, 2.7.5): the head and every NEXT index lie in
    the table; a chain visits at most `queue_size` descriptors (longer means it
    loops); an INDIRECT descriptor only if negotiated, only as the sole
    descriptor of the chain, never nested, with a non-empty table whose length
    is a multiple of 16; device-readable descriptors come before
    device-writable ones; no descriptor has length 0 (QEMU refuses them
    too: a zero-length chain is free for the guest and costs the device).

    `budget`: raise BudgetExhausted rather than walk more descriptors than
    this in all (the caller's per-pass allowance).
    """
    if not 0 <= head < queue_size:
        raise GuestError(f"chain head {head} outside a queue of {queue_size}")
    segments: list[Segment] = []
    table, table_len = desc_table, queue_size
    index = head
    seen = 0
    in_indirect = False
    seen_writable = False
    walked = 0
    while True:
        seen += 1
        walked += 1
        if budget is not None and walked > budget:
            raise BudgetExhausted(head)
        if seen > table_len:
            raise GuestError(f"descriptor chain from head {head} loops or exceeds {table_len} descriptors")
        addr, length, flags, next_index = DESC.unpack_from(table, index * DESC_SIZE)
        if flags & VRING_DESC_F_INDIRECT:
            if not indirect_allowed:
                raise GuestError("indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC")
            if in_indirect:
                raise GuestError("nested indirect descriptor")
            if segments or flags & VRING_DESC_F_NEXT:
                raise GuestError("indirect descriptor chained with other descriptors")
            if length == 0 or length % DESC_SIZE:
                raise GuestError(f"indirect table of {length} bytes")
            if length // DESC_SIZE > queue_size:
                # virtio 1.2, 2.7.5.3.1: no chain longer than the queue size.
                # Unbounded, one table of millions of looping descriptors
                # would stall the daemon (every VM) for seconds per chain.
                raise GuestError(f"indirect table of {length // DESC_SIZE} descriptors exceeds the queue size {queue_size}")
            table = memory.view(addr, length)
            table_len = length // DESC_SIZE
            in_indirect = True
            index = 0
            seen = 0
            continue
        if length == 0:
            raise GuestError(f"zero-length descriptor in the chain from head {head}")
        writable = bool(flags & VRING_DESC_F_WRITE)
        if seen_writable and not writable:
            raise GuestError("device-readable descriptor after a device-writable one")
        seen_writable = seen_writable or writable
        segments.append(Segment(addr, length, writable))
        if not flags & VRING_DESC_F_NEXT:
            break
        if not 0 <= next_index < table_len:
            raise GuestError(f"next index {next_index} outside a table of {table_len}")
        index = next_index
    return Chain(head, tuple(segments), walked)


class SplitQueue:
    """The device's side of one split virtqueue over mapped ring memory.

    `last_avail` is the next avail-ring slot the device will consume and
    `used_idx` the device's used index; both are free-running 16-bit counters,
    restored with SET_VRING_BASE and reported with GET_VRING_BASE.

    `in_flight` holds the heads popped and not yet pushed back: a guest that
    makes such a head available again is reusing a chain the device still
    owns (and could make one chain be processed many times per kick).
    """

    def __init__(
        self,
        num: int,
        desc: memoryview,
        avail: memoryview,
        used: memoryview,
        *,
        event_idx: bool,
        indirect: bool,
        last_avail: int = 0,
        used_idx: int | None = None,
    ) -> None:
        if not valid_queue_size(num):
            raise GuestError(f"queue size {num} is not a power of two up to {MAX_QUEUE_SIZE}")
        if len(desc) < desc_table_size(num) or len(avail) < avail_ring_size(num, event_idx):
            raise GuestError("ring areas smaller than the queue size needs")
        if len(used) < used_ring_size(num, event_idx):
            raise GuestError("used ring smaller than the queue size needs")
        self.num = num
        self.desc = desc
        self.avail = avail
        self.used = used
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = last_avail & 0xFFFF
        # On a fresh start the used index equals the avail base; after a
        # reconnect the guest's used ring is the truth.
        self.used_idx = self.read_used_idx() if used_idx is None else used_idx & 0xFFFF
        self.signalled_used = self.used_idx
        self._signalled_valid = False
        self.in_flight: set[int] = set()
        #: Called after every write to the used ring (element, index, flags,
        #: avail_event) while the frontend wants them logged (migration).
        self.on_used_write: Callable[[], None] | None = None

    # -- avail side

    def avail_idx(self) -> int:
        return U16.unpack_from(self.avail, 2)[0]

    def pending(self) -> int:
        """Chains the guest has made available and the device not yet taken
        (GuestError: the avail index is nonsense, see `available`)."""
        return available(self.avail, self.last_avail, self.num)

    def pop_head(self) -> int | None:
        """The next available head index, or None when the ring is empty."""
        if not self.pending():
            return None
        head = avail_head(self.avail, self.last_avail, self.num)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head

    def unpop(self) -> None:
        """Give the last popped avail slot back (its chain did not fit the
        pass's budget); the next pass pops it again."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def pop(self, memory: GuestMemoryAccess, *, budget: int | None = None) -> Chain | None:
        """The next chain, walked and marked in flight. Raises GuestError for
        a bad chain or a head already in flight (that slot is consumed), and
        BudgetExhausted (the slot is given back) when `budget` runs out."""
        head = self.pop_head()
        if head is None:
            return None
        if head in self.in_flight:
            raise GuestError(f"chain head {head} made available again while the device still holds it")
        try:
            chain = walk_chain(self.desc, self.num, head, memory, self.indirect, budget=budget)
        except BudgetExhausted:
            self.unpop()
            raise
        self.in_flight.add(head)
        return chain

    def set_avail_event(self) -> None:
        """Ask the guest to kick when it adds the entry after the ones seen."""
        if self.event_idx:
            U16.pack_into(self.used, 4 + 8 * self.num, self.last_avail)
            if self.on_used_write is not None:
                self.on_used_write()

    def enable_kicks(self) -> None:
        """The device is about to sleep: the next buffer must kick it.

        The caller must look at the ring once more afterwards: a buffer added
        while kicks were off is not announced. The barrier makes that look
        see a buffer the driver published before it read our request."""
        if self.event_idx:
            self.set_avail_event()
        else:
            U16.pack_into(self.used, 0, 0)
            if self.on_used_write is not None:
                self.on_used_write()
        full_barrier()

    def disable_kicks(self) -> None:
        """The device is polling the ring: kicks would only cost the guest."""
        if self.event_idx:
            # need_event() stays false until the guest is 32K buffers ahead.
            U16.pack_into(self.used, 4 + 8 * self.num, (self.last_avail + 0x7FFF) & 0xFFFF)
        else:
            U16.pack_into(self.used, 0, VRING_USED_F_NO_NOTIFY)
        if self.on_used_write is not None:
            self.on_used_write()

    # -- used side

    def read_used_idx(self) -> int:
        return U16.unpack_from(self.used, 2)[0]

    def push(self, head: int, written: int) -> None:
        """Return a chain to the guest; the element is stored before the index."""
        self.in_flight.discard(head)
        slot = self.used_idx % self.num
        USED_ELEM.pack_into(self.used, 4 + 8 * slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        U16.pack_into(self.used, 2, self.used_idx)
        if self.on_used_write is not None:
            self.on_used_write()

    def should_notify(self) -> bool:
        """Whether the guest wants an interrupt for what was pushed since the last one."""
        # The used index just stored must be visible before the driver's
        # request is read, or both sides can miss each other's update.
        full_barrier()
        wanted = interrupt_wanted(
            event_idx=self.event_idx,
            avail_flags=U16.unpack_from(self.avail, 0)[0],
            used_event=U16.unpack_from(self.avail, 4 + 2 * self.num)[0] if self.event_idx else 0,
            signalled_valid=self._signalled_valid, signalled_used=self.signalled_used, used_idx=self.used_idx)
        if self.event_idx:
            self.signalled_used = self.used_idx
            self._signalled_valid = True
        return wanted
