"""A test frontend that plays QEMU, and the guest's virtio-balloon driver on top.

`TestFrontend` connects to a balloond VM socket the way QEMU 10.x's generic
vhost-user device does and drives it with real resources:

* guest RAM is a real memfd (`GuestRam`), mapped MAP_SHARED in this process
  and handed to the daemon with SCM_RIGHTS, as QEMU's two x86 "pc" regions
  (below 640 KiB, and from 768 KiB up, with the matching mmap_offset), as one
  region, or any custom layout (e.g. a region above 4 GiB);
* the frontend's own "userspace addresses" are a fake base plus the file
  offset, while descriptors carry guest-physical addresses, so the daemon has
  to translate both ways;
* split virtqueues (`DriverQueue`) live inside that guest RAM; kick and call
  are real eventfds; the backend channel is a real socketpair on which
  CONFIG_CHANGE_MSG arrives.

The vhost-user side follows QEMU's order of messages (see `connect`, `start`,
`stop`); with REPLY_ACK it asks for and checks acknowledgements on the same
requests QEMU does. The guest-driver side behaves like Linux's
virtio_balloon: it picks features, numbers its queues from the negotiated
features, tells the host about PFNs in 256-PFN buffers and waits for each
(`inflate`, `deflate`), primes and refills the stats buffer, reports free
ranges, sends migration records of balloond's extension, and reads and writes
the config space through the frontend's cached copy, as QEMU does.

Everything is synchronous (blocking sockets with timeouts, poll() on the call
eventfds) so pytest tests and benchmarks can use it against a daemon running
as a subprocess. Hostile tests get raw access too: arbitrary messages
(`send`, `send_raw`), arbitrary descriptors and avail indices
(`DriverQueue.write_desc`, `put_avail`, `set_avail_idx`).

Typical use:

    with TestFrontend(sock_path, ram_size=256 << 20) as fe:
        fe.start()                        # DRIVER_OK: features, memory, rings
        fe.ram.touch(pfns)                # the guest dirties some pages
        fe.inflate(pfns)                  # PFNs into the balloon
        fe.deflate(pfns)
        fe.stop()                         # VM paused (GET_VRING_BASE)
"""

from __future__ import annotations

import array
import mmap
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# Every byte this frontend puts on the socket or in the rings is packed by
# tests/wire.py, written from the specs apart from protocol/, so a layout
# mistake in the daemon cannot hide behind the same mistake here. QueueRole
# is only a set of names (the numbering comes from wire.queue_order).
from protocol.balloon import QueueRole
from tests import wire
from tests.wire import (
    DESC_SIZE,
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    BackendRequest,
    Feature,
    ProtocolFeature,
    Request,
    StatTag,
    need_event,
)

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("the test frontend packs PFN arrays natively and needs a little-endian host")

PAGE_SIZE = wire.PAGE_SIZE
PAGE_SHIFT = wire.PFN_SHIFT
ZERO_PAGE = bytes(PAGE_SIZE)

#: The frontend's "virtual address" of file offset 0 of guest RAM. Deliberately
#: unlike any guest-physical address so a mix-up of the two is caught.
DEFAULT_UADDR_BASE = 0x7F3A_5000_0000

#: Where the driver keeps its rings and buffers (guest-physical), like a guest
#: kernel's own allocations; tests use pages from `TestFrontend.first_free_pfn`.
DRIVER_AREA_GPA = 0x100000

#: PFNs per inflate/deflate buffer (Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX).
PFNS_PER_BUFFER = 256

#: Tags Linux (6.12+) puts in its stats buffer, in its order.
LINUX_STAT_TAGS = tuple(StatTag)

#: Free ranges per free-page-report request (Linux's PAGE_REPORTING_CAPACITY).
REPORT_CAPACITY = 32

#: Features the simulated guest driver knows. PAGE_POISON is left out by
#: default because Linux clears it unless page poisoning or init_on_free is on.
DRIVER_FEATURES = (
    (1 << Feature.VERSION_1)
    | (1 << Feature.RING_INDIRECT_DESC)
    | (1 << Feature.RING_EVENT_IDX)
    | (1 << Feature.MUST_TELL_HOST)
    | (1 << Feature.STATS_VQ)
    | (1 << Feature.DEFLATE_ON_OOM)
    | (1 << Feature.FREE_PAGE_HINT)
    | (1 << Feature.REPORTING)
    | (1 << Feature.BALLOOND_MIGRATE_VQ)
)

#: Protocol features this frontend implements (QEMU implements more; the
#: daemon offers a subset of these).
FRONTEND_PROTOCOL_FEATURES = wire.bits(
    ProtocolFeature.MQ,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.CONFIG,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
)


def feature_mask(features: int | Iterable[int]) -> int:
    if isinstance(features, int):
        return features
    mask = 0
    for bit in features:
        mask |= 1 << bit
    return mask


# ====================================================================== errors


class FrontendTestError(Exception):
    """The daemon did something a QEMU frontend would not accept."""


class DaemonHungUp(FrontendTestError):
    """The daemon closed the vhost-user connection."""


class UnexpectedReply(FrontendTestError):
    """A reply with the wrong request code, flags or size."""


class Nack(FrontendTestError):
    """A REPLY_ACK acknowledgement carried a non-zero status."""

    def __init__(self, request: int, status: int) -> None:
        super().__init__(f"{_request_name(request)} acknowledged with status {status}")
        self.request = request
        self.status = status


class MissedInterrupt(FrontendTestError):
    """The device used buffers but never signalled the call eventfd."""


def _request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"UNKNOWN({code})"


# ================================================================== guest RAM


@dataclass(frozen=True)
class RamRegion:
    """One guest RAM region: guest-physical [gpa, gpa+size) at file offset `offset`."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end


def qemu_pc_layout(size: int) -> list[RamRegion]:
    """QEMU x86 'pc': RAM below the VGA hole, then from 768 KiB up, one memfd."""
    return [RamRegion(0, 0xA0000, 0), RamRegion(0xC0000, size - 0xC0000, 0xC0000)]


def single_layout(size: int) -> list[RamRegion]:
    return [RamRegion(0, size, 0)]


class GuestRam:
    """Guest RAM: one memfd, mapped shared here, described as `regions`.

    Addresses are guest-physical throughout; `offset(gpa)` is where a byte
    lives in the memfd (and in `mem`, this process's mapping of all of it).
    """

    def __init__(
        self,
        size: int = 64 << 20,
        layout: str | Sequence[RamRegion] = "qemu",
        *,
        name: str = "balloond-test-ram",
        hugetlb: bool = False,
    ) -> None:
        if isinstance(layout, str):
            regions = {"qemu": qemu_pc_layout, "single": single_layout}[layout](size)
        else:
            regions = list(layout)
        self.regions = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.gpa:
                raise ValueError("guest RAM regions overlap")
        self.file_size = max(size, max(r.offset + r.size for r in self.regions))
        flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if hugetlb else 0)
        self.fd = os.memfd_create(name, flags)
        os.ftruncate(self.fd, self.file_size)
        self.mapping = mmap.mmap(self.fd, self.file_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.mem = memoryview(self.mapping)

    # ------------------------------------------------------------ addresses

    def region_of(self, gpa: int, length: int = 1) -> RamRegion:
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise ValueError(f"guest range {gpa:#x}+{length:#x} is not inside one RAM region")

    def offset(self, gpa: int, length: int = 1) -> int:
        """File offset of guest-physical `gpa` (the range must lie in one region)."""
        r = self.region_of(gpa, length)
        return r.offset + gpa - r.gpa

    def contains(self, gpa: int, length: int = 1) -> bool:
        return any(r.contains(gpa, length) for r in self.regions)

    @property
    def size(self) -> int:
        """Bytes of guest RAM (the regions' sizes)."""
        return sum(r.size for r in self.regions)

    def pfn_ranges(self) -> list[tuple[int, int]]:
        """Guest RAM as (first_pfn, count), as the daemon's tracker sees it."""
        return [(r.gpa >> PAGE_SHIFT, r.size >> PAGE_SHIFT) for r in self.regions]

    # --------------------------------------------------------------- access

    def view(self, gpa: int, length: int) -> memoryview:
        off = self.offset(gpa, length)
        return self.mem[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        off = self.offset(gpa, len(data))
        self.mem[off : off + len(data)] = data

    def zero(self, gpa: int, length: int) -> None:
        off = self.offset(gpa, length)
        self.mem[off : off + length] = bytes(length)

    def page(self, pfn: int) -> memoryview:
        return self.view(pfn << PAGE_SHIFT, PAGE_SIZE)

    # ------------------------------------------------------ page contents

    def touch(self, pfns: Iterable[int], value: int = 0xA5) -> None:
        """Dirty pages (one byte each), so the memfd allocates them."""
        if isinstance(pfns, range) and pfns.step == 1 and pfns:
            start = pfns[0] << PAGE_SHIFT
            r = self.region_of(start, len(pfns) << PAGE_SHIFT)
            off = r.offset + start - r.gpa
            self.mem[off : off + (len(pfns) << PAGE_SHIFT) : PAGE_SIZE] = bytes([value]) * len(pfns)
            return
        b = bytes([value])
        for pfn in pfns:
            off = self.offset(pfn << PAGE_SHIFT, PAGE_SIZE)
            self.mem[off : off + 1] = b

    def populate(self, first_pfn: int, count: int) -> None:
        """Allocate host memory for guest pages without writing them (fallocate:
        the fast way for a benchmark to make a large range resident)."""
        gpa = first_pfn << PAGE_SHIFT
        os.posix_fallocate(self.fd, self.offset(gpa, count << PAGE_SHIFT), count << PAGE_SHIFT)

    @staticmethod
    def pattern(pfn: int, seed: int = 0) -> bytes:
        """A page's worth of bytes unique to (pfn, seed), never all zero."""
        return struct.pack("<QQ", pfn | 1 << 63, seed ^ 0x5A5A_5A5A_5A5A_5A5A) * (PAGE_SIZE // 16)

    def fill(self, pfns: Iterable[int], seed: int = 0) -> None:
        """Write `pattern(pfn, seed)` into each page."""
        for pfn in pfns:
            self.write(pfn << PAGE_SHIFT, self.pattern(pfn, seed))

    def damaged(self, pfns: Iterable[int], seed: int = 0) -> list[int]:
        """Pages that no longer hold `pattern(pfn, seed)`."""
        return [pfn for pfn in pfns if self.page(pfn) != self.pattern(pfn, seed)]

    def is_zero(self, pfn: int) -> bool:
        return self.page(pfn) == ZERO_PAGE

    def nonzero(self, pfns: Iterable[int]) -> list[int]:
        return [pfn for pfn in pfns if self.page(pfn) != ZERO_PAGE]

    # --------------------------------------------------------- host view

    def allocated_bytes(self) -> int:
        """Host memory allocated to the memfd (what hole punching frees)."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd < 0:
            return
        self.mem.release()
        try:
            self.mapping.close()
        except BufferError:  # a view is still alive somewhere; the GC unmaps it
            pass
        os.close(self.fd)
        self.fd = -1


# ================================================================ virtqueues


@dataclass(frozen=True)
class Used:
    """One used-ring entry, with the token the driver attached to its chain."""

    head: int
    length: int
    token: Any = None


class QueueFull(FrontendTestError):
    pass


class DriverQueue:
    """The driver's side of one split virtqueue, in guest RAM.

    Layout (all guest-physical, inside one RAM region): descriptor table at
    `desc_gpa`, avail ring right after it, used ring 64-byte aligned after
    that; both rings always have room for the event-index fields.
    """

    def __init__(
        self,
        ram: GuestRam,
        index: int,
        size: int,
        gpa: int,
        *,
        event_idx: bool,
        indirect_gpa: int = 0,
        indirect_slots: int = 0,
        indirect_max: int = 0,
        timeout: float = 5.0,
    ) -> None:
        self.ram = ram
        self.index = index
        self.size = size
        self.desc_gpa = gpa
        self.avail_gpa = gpa + DESC_SIZE * size
        self.used_gpa = _align(self.avail_gpa + wire.avail_ring_size(size), 64)
        self.end_gpa = self.used_gpa + wire.used_ring_size(size)
        self.event_idx = event_idx
        self.timeout = timeout
        self.desc = ram.view(self.desc_gpa, DESC_SIZE * size)
        self.avail = ram.view(self.avail_gpa, wire.avail_ring_size(size))
        self.used = ram.view(self.used_gpa, wire.used_ring_size(size))
        # Indirect tables: a pool of `indirect_slots` tables of `indirect_max` entries.
        self._indirect_gpa = indirect_gpa
        self._indirect_max = indirect_max
        self._indirect_slots = indirect_slots
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        #: Kick after every add, whatever avail_event/NO_NOTIFY say.
        self.always_kick = False
        #: Kick again when `wait` sees no progress for this long (None: never,
        #: as Linux). The default is Linux's, so a device that loses a kick or
        #: never re-arms notifications makes `wait` time out instead of being
        #: rescued; only tests of hostile input set it, saying why.
        self.rekick_after: float | None = None
        #: Raise MissedInterrupt when the device used chains without the
        #: interrupt asked for (else they are only counted). On by default: a
        #: Linux driver would sleep for ever on such a queue.
        self.strict_interrupts = True
        self.kicks = 0
        #: Used elements whose head the driver had not made available (or
        #: already had back): a device bug, or a test's own raw chains.
        self.unknown_used = 0
        self.rekicks = 0
        self.missed_interrupts = 0
        self.glitches = 0  # impossible used indices read (and read again)
        self.base = 0  # avail index the device resumes from (SET_VRING_BASE)
        self.reset()

    @staticmethod
    def area_size(size: int) -> int:
        return _align(_align(DESC_SIZE * size + wire.avail_ring_size(size), 64) + wire.used_ring_size(size), PAGE_SIZE)

    def reset(self) -> None:
        """A fresh ring, as after a driver (re)probe."""
        self.ram.zero(self.desc_gpa, self.end_gpa - self.desc_gpa)
        self._free = list(range(self.size - 1, -1, -1))
        self._chains: dict[int, tuple[list[int], int | None, Any]] = {}
        self._indirect_free = list(range(self._indirect_slots))
        self.avail_idx = 0  # shadow of the avail index
        self.last_used = 0
        self._kicked_at = 0  # avail index at the last kick decision
        self.base = 0

    # --------------------------------------------------------- descriptors

    @property
    def num_free(self) -> int:
        return len(self._free)

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_index: int = 0) -> None:
        """Raw: write descriptor `index` of the table (no bookkeeping)."""
        wire.write_desc(self.desc, index, addr, length, flags, next_index)

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        return wire.read_desc(self.desc, index)

    def add(
        self,
        segments: Sequence[tuple[int, int, bool]],
        token: Any = None,
        *,
        indirect: bool | None = None,
    ) -> int:
        """Put a chain of (gpa, length, device_writable) segments in the table.

        Returns its head (not yet published). With `indirect` None the chain
        goes indirect when it has more than one segment and indirect tables
        are available, as Linux does when RING_INDIRECT_DESC is negotiated.
        """
        if not segments:
            raise ValueError("a chain needs at least one segment")
        if indirect is None:
            indirect = len(segments) > 1 and bool(self._indirect_free) and len(segments) <= self._indirect_max
        if indirect:
            if not self._indirect_free or len(segments) > self._indirect_max:
                raise QueueFull("no indirect table free")
            if not self._free:
                raise QueueFull(f"queue {self.index}: no free descriptor")
            slot = self._indirect_free.pop()
            table_gpa = self._indirect_gpa + slot * self._indirect_max * DESC_SIZE
            table = bytearray(DESC_SIZE * len(segments))
            for i, (addr, length, writable) in enumerate(segments):
                flags = (VRING_DESC_F_WRITE if writable else 0) | (VRING_DESC_F_NEXT if i + 1 < len(segments) else 0)
                wire.write_desc(table, i, addr, length, flags, i + 1 if i + 1 < len(segments) else 0)
            self.ram.write(table_gpa, table)
            head = self._free.pop()
            self.write_desc(head, table_gpa, len(table), VRING_DESC_F_INDIRECT, 0)
            self._chains[head] = ([head], slot, token)
            return head
        if len(segments) > len(self._free):
            raise QueueFull(f"queue {self.index}: {len(segments)} descriptors wanted, {len(self._free)} free")
        indices = [self._free.pop() for _ in segments]
        for i, (addr, length, writable) in enumerate(segments):
            last = i + 1 == len(segments)
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            self.write_desc(indices[i], addr, length, flags, 0 if last else indices[i + 1])
        self._chains[indices[0]] = (indices, None, token)
        return indices[0]

    def alloc_desc(self, count: int, token: Any = None) -> list[int]:
        """Raw: reserve `count` descriptor slots for a hand-written chain.

        The caller writes them (`write_desc`) and publishes the first
        (`put_avail`); they are reclaimed when the device returns that head.
        """
        if count > len(self._free):
            raise QueueFull(f"queue {self.index}: {count} descriptors wanted, {len(self._free)} free")
        indices = [self._free.pop() for _ in range(count)]
        self._chains[indices[0]] = (indices, None, token)
        return indices

    def put_avail(self, head: int) -> None:
        """Make `head` available: ring entry first, then the index (as a driver must)."""
        wire.write_u16(self.avail, wire.avail_slot_offset(self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        wire.write_u16(self.avail, wire.RING_IDX, self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Raw: store an arbitrary avail index (and adopt it as the shadow)."""
        self.avail_idx = value & 0xFFFF
        wire.write_u16(self.avail, wire.RING_IDX, self.avail_idx)

    def read_avail_idx(self) -> int:
        return wire.read_u16(self.avail, wire.RING_IDX)

    def read_used_idx(self) -> int:
        return wire.read_u16(self.used, wire.RING_IDX)

    def read_avail_event(self) -> int:
        return wire.read_u16(self.used, wire.avail_event_offset(self.size))

    def read_used_event(self) -> int:
        return wire.read_u16(self.avail, wire.used_event_offset(self.size))

    def in_flight(self) -> int:
        return len(self._chains)

    def ring_state(self) -> str:
        """Both sides' indexes as the shared memory holds them now: what a
        test that waited in vain reports, to tell a lost kick (buffers
        waiting, the device asking for a kick at an index already passed)
        from a device that is gone."""
        asked = (f"avail_event {self.read_avail_event()}" if self.event_idx
                 else f"used flags {wire.read_u16(self.used, wire.RING_FLAGS):#x}")
        return (f"avail idx {self.read_avail_idx()}, used idx {self.read_used_idx()}, last used {self.last_used}, "
                f"{asked}, last kick check at {self._kicked_at}, in flight {self.in_flight()}, kicks {self.kicks}, "
                f"used heads not in flight {self.unknown_used}, misread indexes {self.glitches}")

    # ----------------------------------------------------------- kicking

    def kick_needed(self) -> bool:
        old, new = self._kicked_at, self.avail_idx
        if old == new:
            return False
        _full_barrier()  # our avail index out before the device's request is read (Linux: virtio_mb)
        if self.event_idx:
            return need_event(self.read_avail_event(), new, old)
        return not wire.read_u16(self.used, wire.RING_FLAGS) & VRING_USED_F_NO_NOTIFY

    def kick(self, force: bool = False) -> bool:
        """Notify the device if it asked for it (or always, with force/always_kick)."""
        needed = self.kick_needed()
        self._kicked_at = self.avail_idx
        if (needed or force or self.always_kick) and self.kick_fd is not None:
            os.eventfd_write(self.kick_fd, 1)
            self.kicks += 1
            return True
        return False

    def submit(self, segments: Sequence[tuple[int, int, bool]], token: Any = None, **kw: Any) -> int:
        """add + put_avail + kick; returns the head."""
        head = self.add(segments, token, **kw)
        self.put_avail(head)
        self.kick()
        return head

    # ---------------------------------------------------------- used side

    def _want_interrupt(self) -> None:
        if self.event_idx:
            wire.write_u16(self.avail, wire.used_event_offset(self.size), self.last_used)
        else:
            wire.write_u16(self.avail, wire.RING_FLAGS, 0)

    def suppress_interrupts(self) -> None:
        if self.event_idx:
            wire.write_u16(self.avail, wire.used_event_offset(self.size), self.last_used - 1)
        else:
            wire.write_u16(self.avail, wire.RING_FLAGS, VRING_AVAIL_F_NO_INTERRUPT)

    def get_used(self) -> list[Used]:
        """Collect what the device has used since the last call (non-blocking)."""
        out = []
        used_idx = self.read_used_idx()
        for _ in range(100):
            # More used than the ring holds is impossible; seen only as a
            # momentary misread of shared memory on some hypervisors. Read again.
            if (used_idx - self.last_used) & 0xFFFF <= self.size:
                break
            self.glitches += 1
            time.sleep(0.001)
            used_idx = self.read_used_idx()
        else:
            raise FrontendTestError(
                f"queue {self.index}: used index {used_idx} is more than {self.size} past {self.last_used}"
            )
        while self.last_used != used_idx:
            head, length = wire.read_used_elem(self.used, self.last_used % self.size)
            self.last_used = (self.last_used + 1) & 0xFFFF
            chain = self._chains.pop(head, None)
            if chain is None:
                self.unknown_used += 1
                out.append(Used(head, length, None))
                continue
            indices, slot, token = chain
            self._free.extend(reversed(indices))
            if slot is not None:
                self._indirect_free.append(slot)
            out.append(Used(head, length, token))
        return out

    def wait(self, count: int = 1, timeout: float | None = None, *, strict: bool | None = None) -> list[Used]:
        """Wait, on the call eventfd, until at least `count` chains were used.

        Returns everything used so far. Raises TimeoutError if the device did
        not use that many in time. Chains used without the interrupt the
        driver asked for are counted in `missed_interrupts` (and raise
        MissedInterrupt if `strict`, default `strict_interrupts`).
        """
        strict = self.strict_interrupts if strict is None else strict
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last_progress = time.monotonic()
        got = self.get_used()
        while len(got) < count:
            self._want_interrupt()
            _full_barrier()  # used_event out before the used index is read again (Linux: virtio_mb)
            got += self.get_used()  # the device may have used more before it saw the request
            if len(got) >= count:
                break
            now = time.monotonic()
            if now >= deadline or self.call_fd is None:
                raise TimeoutError(f"queue {self.index}: {len(got)} of {count} chains used after {timeout:.1f}s "
                                   f"({self.ring_state()})")
            slice_end = deadline
            if self.rekick_after is not None:
                slice_end = min(slice_end, last_progress + self.rekick_after)
            if _poll_in(self.call_fd, max(0.0, slice_end - now)):
                try:
                    os.eventfd_read(self.call_fd)
                except BlockingIOError:
                    pass
                new = self.get_used()
            else:
                new = self.get_used()
                if new:
                    self.missed_interrupts += 1
                    if strict:
                        raise MissedInterrupt(
                            f"queue {self.index}: device used {len(new)} chain(s) without signalling the call eventfd"
                        )
                elif self.rekick_after is not None and time.monotonic() - last_progress >= self.rekick_after:
                    if self.kick_fd is not None:
                        os.eventfd_write(self.kick_fd, 1)
                        self.rekicks += 1
                    last_progress = time.monotonic()
            if new:
                last_progress = time.monotonic()
            got += new
        return got

    def drain_interrupts(self) -> int:
        """Consume pending call notifications; return their count."""
        if self.call_fd is None:
            return 0
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0


_FENCE = threading.Lock()


def _full_barrier() -> None:
    """A full memory fence, as Linux's virtio_mb: x86 lets a load pass an
    earlier store, and each notification handshake is a store then a load.
    Taking an uncontended lock is a locked instruction, a full fence."""
    _FENCE.acquire()
    _FENCE.release()


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _poll_in(fd: int, timeout: float) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(max(0, int(timeout * 1000) + 1)))


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


# ================================================================= frontend


@dataclass
class _QueueSlot:
    """Driver-area space reserved for one queue index."""

    ring_gpa: int
    pfn_gpa: int  # `pfn_slots` buffers of PFNS_PER_BUFFER * 4 bytes
    aux_gpa: int  # stats buffer / migration records
    indirect_gpa: int


class TestFrontend:
    """A vhost-user frontend in QEMU's image, with the guest balloon driver on top.

    Arguments:
      socket_path     the VM's vhost-user socket.
      ram             a `GuestRam` to use (shared with the caller, not closed);
                      or ram_size/layout to make one (closed with the frontend).
      num_vqs         QEMU's num-vqs for the generic device (queues enabled and
                      disabled on start/stop); the driver configures the ones
                      its features give a role.
      queue_size      ring size of every queue (QEMU's vq-size).
      config_size     bytes of config space QEMU moves (GET/SET_CONFIG).
      protocol_features  which of the offered protocol features to accept.
      mem_slots       with CONFIGURE_MEM_SLOTS, send memory as ADD_MEM_REG.
      uaddr_base      the fake frontend address of memfd offset 0.
      pfn_slots       PFN buffers per inflate/deflate queue (max `inflight`).
      timeout         seconds to wait for any reply or used buffer.
      rekick_after    kick again after this long without progress (default None:
                      never, exactly as Linux; see DriverQueue.rekick_after).
      strict_interrupts  raise MissedInterrupt instead of counting (default).
    """

    __test__ = False  # not a pytest test class

    #: Requests QEMU sends with NEED_REPLY when REPLY_ACK is negotiated.
    NEED_REPLY_REQUESTS = frozenset(
        {
            Request.SET_BACKEND_REQ_FD,
            Request.SET_MEM_TABLE,
            Request.SET_VRING_ENABLE,
            Request.SET_CONFIG,
            Request.ADD_MEM_REG,
            Request.REM_MEM_REG,
        }
    )
    #: Requests that always have a reply.
    REPLY_REQUESTS = frozenset(
        {
            Request.GET_FEATURES,
            Request.GET_PROTOCOL_FEATURES,
            Request.GET_QUEUE_NUM,
            Request.GET_MAX_MEM_SLOTS,
            Request.GET_VRING_BASE,
            Request.GET_CONFIG,
            Request.GET_STATUS,
        }
    )

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        ram: GuestRam | None = None,
        ram_size: int = 64 << 20,
        layout: str | Sequence[RamRegion] = "qemu",
        num_vqs: int = 6,
        queue_size: int = 128,
        config_size: int = wire.CONFIG_SIZE,
        protocol_features: int = FRONTEND_PROTOCOL_FEATURES,
        mem_slots: bool = False,
        uaddr_base: int = DEFAULT_UADDR_BASE,
        pfn_slots: int = 8,
        indirect_slots: int = 16,
        timeout: float = 5.0,
        rekick_after: float | None = None,
        strict_interrupts: bool = True,
        connect: bool = True,
    ) -> None:
        self.socket_path = os.fspath(socket_path)
        self._owns_ram = ram is None
        self.ram = ram if ram is not None else GuestRam(ram_size, layout)
        self.num_vqs = num_vqs
        self.queue_size = queue_size
        self.config_size = config_size
        self.wanted_protocol_features = protocol_features
        self.mem_slots = mem_slots
        self.uaddr_base = uaddr_base
        self.timeout = timeout
        self.rekick_after = rekick_after
        self.strict_interrupts = strict_interrupts
        self.pfn_slots = pfn_slots

        self.sock: socket.socket | None = None
        self.backend_sock: socket.socket | None = None
        self.device_features = 0
        self.protocol_features = 0
        self.protocol_bit = False  # VHOST_USER_F_PROTOCOL_FEATURES offered
        self.max_mem_slots: int | None = None
        self.queue_num: int | None = None
        self.driver_features: int | None = None
        self.roles: list[QueueRole] = []
        self.queues: dict[int, DriverQueue] = {}
        self.started = False
        self.config_cache = bytearray(config_size)
        self.backend_messages: list[wire.Message] = []
        self._backend_buffer = bytearray()
        self._call_fds: dict[int, int] = {}
        self._err_fds: dict[int, int] = {}
        self._kick_fds: dict[int, int] = {}
        self._slots_sent: dict[tuple[int, int, int], RamRegion] = {}
        self._stats_head: int | None = None
        self._stats_values: dict[int, int] = {}

        # Driver area: per queue index a ring, PFN buffers, an aux buffer and
        # indirect tables; everything in the region holding DRIVER_AREA_GPA.
        self._indirect_slots = indirect_slots
        ring = DriverQueue.area_size(queue_size)
        pfn = _align(pfn_slots * PFNS_PER_BUFFER * 4, PAGE_SIZE)
        aux = _align(wire.MIGRATIONS_PER_BUFFER * wire.MIGRATION_SIZE, PAGE_SIZE)
        ind = _align(indirect_slots * REPORT_CAPACITY * DESC_SIZE, PAGE_SIZE)
        per_queue = ring + pfn + aux + ind
        gpa = DRIVER_AREA_GPA
        self._slots = []
        for _ in range(num_vqs):
            self._slots.append(_QueueSlot(gpa, gpa + ring, gpa + ring + pfn, gpa + ring + pfn + aux))
            gpa += per_queue
        self.driver_area = (DRIVER_AREA_GPA, gpa)
        self.ram.region_of(DRIVER_AREA_GPA, gpa - DRIVER_AREA_GPA)  # must fit in one region
        #: First PFN tests may use freely (everything below belongs to the driver
        #: area, the low region and the hole).
        self.first_free_pfn = _align(gpa, 1 << 20) >> PAGE_SHIFT

        if connect:
            self.connect()

    # ================================================================ context

    def __enter__(self) -> TestFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hang up (as a QEMU that exits) and release every fd; idempotent."""
        for s in (self.sock, self.backend_sock):
            if s is not None:
                s.close()
        self.sock = self.backend_sock = None
        self.started = False
        for fds in (self._call_fds, self._err_fds, self._kick_fds):
            for fd in fds.values():
                os.close(fd)
            fds.clear()
        for q in self.queues.values():
            q.kick_fd = q.call_fd = None
        if self._owns_ram:
            self.queues.clear()
            self.ram.close()

    # =========================================================== raw messages

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Write bytes to the socket, with `fds` as SCM_RIGHTS on the first byte."""
        assert self.sock is not None, "not connected"
        try:
            if fds:
                sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise DaemonHungUp(f"daemon closed the connection: {exc}") from None

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        flags: int | None = None,
        need_reply: bool = False,
        size: int | None = None,
    ) -> None:
        """Send one message; `flags`/`size` override the header for hostile tests."""
        if flags is None:
            flags = wire.VERSION | (wire.FLAG_NEED_REPLY if need_reply else 0)
        header = wire.pack_header(request, flags, len(payload) if size is None else size)
        self.send_raw(header + payload, fds)

    def _recv_exact(self, sock: socket.socket, n: int, timeout: float) -> bytes:
        buf = bytearray()
        sock.settimeout(timeout)
        while len(buf) < n:
            try:
                chunk = sock.recv(n - len(buf))
            except socket.timeout:
                raise TimeoutError(f"no reply from the daemon within {timeout:.1f}s") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise DaemonHungUp("daemon closed the connection")
            buf += chunk
        return bytes(buf)

    def recv_message(self, timeout: float | None = None) -> wire.Message:
        """Read one message (a reply) from the main socket."""
        assert self.sock is not None, "not connected"
        timeout = self.timeout if timeout is None else timeout
        request, flags, size = wire.unpack_header(self._recv_exact(self.sock, wire.HEADER_SIZE, timeout))
        if size > wire.MAX_REPLY_PAYLOAD:
            raise UnexpectedReply(f"reply of {size} bytes to {_request_name(request)}")
        payload = self._recv_exact(self.sock, size, timeout) if size else b""
        return wire.Message(request, flags, payload)

    def recv_reply(self, request: int, size: int | None = None, timeout: float | None = None) -> bytes:
        """Read a reply to `request` and check it as QEMU does; return its payload."""
        reply = self.recv_message(timeout)
        if reply.request != request:
            raise UnexpectedReply(f"reply to {_request_name(reply.request)}, expected {_request_name(request)}")
        if reply.flags != wire.VERSION | wire.FLAG_REPLY:
            raise UnexpectedReply(f"{_request_name(request)} reply flags {reply.flags:#x}, expected 0x5")
        if size is not None and len(reply.payload) != size:
            raise UnexpectedReply(f"{_request_name(request)} reply of {len(reply.payload)} bytes, expected {size}")
        return reply.payload

    def request(self, request: Request, payload: bytes = b"", fds: Sequence[int] = (), *, ack: bool | None = None) -> bytes | None:
        """Send a request as QEMU would and collect its reply or acknowledgement.

        `ack`: ask for a REPLY_ACK acknowledgement (default: when REPLY_ACK is
        negotiated and QEMU asks for one on this request). A non-zero
        acknowledgement raises Nack.
        """
        if ack is None:
            ack = request in self.NEED_REPLY_REQUESTS and self.has_protocol(ProtocolFeature.REPLY_ACK)
        self.send(request, payload, fds, need_reply=ack)
        if request in self.REPLY_REQUESTS:
            return self.recv_reply(request)
        if ack:
            status = wire.unpack_u64(self.recv_reply(request, 8))
            if status:
                raise Nack(request, status)
        return None

    def get_u64(self, request: Request) -> int:
        self.send(request)
        return wire.unpack_u64(self.recv_reply(request, 8))

    def set_u64(self, request: Request, value: int) -> None:
        self.request(request, wire.pack_u64(value))

    def has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << feature))

    def hung_up(self, timeout: float = 2.0) -> bool:
        """True once the daemon has closed the connection (waits up to `timeout`).

        Unread replies are discarded while waiting.
        """
        if self.sock is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if not _poll_in(self.sock.fileno(), remaining):
                return False
            try:
                self.sock.settimeout(0.1)
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                return True
            if not data:
                return True

    # ============================================================ handshake

    def connect(self) -> None:
        """Connect and initialise the device, in QEMU's vhost_dev_init order."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock
        self.device_features = self.get_u64(Request.GET_FEATURES)
        self.protocol_bit = bool(self.device_features & (1 << wire.F_PROTOCOL_FEATURES))
        if self.protocol_bit:
            offered = self.get_u64(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = offered & self.wanted_protocol_features
            self.set_u64(Request.SET_PROTOCOL_FEATURES, self.protocol_features)
            if self.has_protocol(ProtocolFeature.MQ):
                self.queue_num = self.get_u64(Request.GET_QUEUE_NUM)
            if self.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
                self.max_mem_slots = self.get_u64(Request.GET_MAX_MEM_SLOTS)
        if self.has_protocol(ProtocolFeature.BACKEND_REQ):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.request(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
            finally:
                theirs.close()
            self.backend_sock = ours
        self.request(Request.SET_OWNER)
        self.device_features = self.get_u64(Request.GET_FEATURES)
        for i in range(self.num_vqs):
            self._set_vring_fd(Request.SET_VRING_CALL, i, self._call_fds)
            self._set_vring_fd(Request.SET_VRING_ERR, i, self._err_fds)

    def _set_vring_fd(self, request: Request, index: int, table: dict[int, int]) -> int:
        fd = _eventfd()
        self.request(request, wire.pack_vring_file(index, True), [fd])
        old = table.pop(index, None)
        if old is not None:
            os.close(old)
        table[index] = fd
        return fd

    # ------------------------------------------------------------- features

    def choose_features(self, want: int | Iterable[int] | None = None, *, drop: Iterable[int] = ()) -> int:
        """The feature word the driver acks: `want` (default: what it knows)
        intersected with what the device offers, minus `drop`."""
        mask = DRIVER_FEATURES if want is None else feature_mask(want)
        return self.device_features & mask & ~feature_mask(drop) & ~(1 << wire.F_PROTOCOL_FEATURES)

    def has_feature(self, feature: Feature) -> bool:
        return self.driver_features is not None and bool(self.driver_features & (1 << feature))

    def _setup_driver(self, features: int) -> None:
        """Driver probe: number the queues from the features and lay out rings."""
        self.driver_features = features
        self.roles = [QueueRole(name) for name in wire.queue_order(features)]
        # The driver's memory is ordinary, resident guest memory: zero (and so
        # allocate) all of it now, so later measurements of the memfd see only
        # what the test and the daemon do.
        self.ram.zero(self.driver_area[0], self.driver_area[1] - self.driver_area[0])
        if len(self.roles) > self.num_vqs:
            raise ValueError(f"{len(self.roles)} queues needed, num_vqs is {self.num_vqs}")
        event_idx = bool(features & (1 << Feature.RING_EVENT_IDX))
        indirect = bool(features & (1 << Feature.RING_INDIRECT_DESC))
        self.queues = {}
        for index, role in enumerate(self.roles):
            slot = self._slots[index]
            self.queues[index] = DriverQueue(
                self.ram,
                index,
                self.queue_size,
                slot.ring_gpa,
                event_idx=event_idx,
                indirect_gpa=slot.indirect_gpa,
                indirect_slots=self._indirect_slots if indirect else 0,
                indirect_max=REPORT_CAPACITY,
                timeout=self.timeout,
            )
            self.queues[index].rekick_after = self.rekick_after
            self.queues[index].strict_interrupts = self.strict_interrupts
        self._stats_head = None

    def probe(self, features: int | Iterable[int] | None = None) -> int:
        """The driver's probe, before DRIVER_OK: pick features (default
        `choose_features()`) and lay out the rings. Done by `start` if not
        called; later calls only check that `features` did not change.
        Returns the driver's features."""
        if self.driver_features is None:
            self._setup_driver(self.choose_features() if features is None else feature_mask(features))
        elif features is not None and feature_mask(features) != self.driver_features:
            raise ValueError("features change only through reset_driver()")
        assert self.driver_features is not None
        return self.driver_features

    def reset_driver(self) -> None:
        """The guest resets its device: rings zeroed, bases back to 0, features
        to be negotiated again at the next `start`. Call while stopped."""
        assert not self.started, "stop the device before resetting the driver"
        for q in self.queues.values():
            q.reset()
        self.queues = {}
        self.driver_features = None
        self.roles = []
        self._stats_head = None

    # ------------------------------------------------------------ start/stop

    def uaddr(self, gpa: int) -> int:
        """The frontend's virtual address of guest-physical `gpa`."""
        return self.uaddr_base + self.ram.offset(gpa)

    def memory_regions(self) -> list[wire.MemRegion]:
        return [wire.MemRegion(r.gpa, r.size, self.uaddr_base + r.offset, r.offset) for r in self.ram.regions]

    def send_memory(self) -> None:
        """SET_MEM_TABLE with every region (or the ADD/REM_MEM_REG difference)."""
        regions = self.memory_regions()
        if self.mem_slots and self.has_protocol(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            wanted = {(r.guest_phys_addr, r.size, r.userspace_addr): r for r in regions}
            for key in list(self._slots_sent):
                if key not in wanted:
                    self.request(Request.REM_MEM_REG, wire.pack_single_region(self._slots_sent.pop(key)), [self.ram.fd])
            for key, region in wanted.items():
                if key not in self._slots_sent:
                    self.request(Request.ADD_MEM_REG, wire.pack_single_region(region), [self.ram.fd])
                    self._slots_sent[key] = region
            return
        self.request(Request.SET_MEM_TABLE, wire.pack_mem_table(regions), [self.ram.fd] * len(regions))

    def start(self, features: int | Iterable[int] | None = None, *, uaddr_base: int | None = None) -> None:
        """DRIVER_OK: the vhost_dev_start sequence.

        On the first start (or after `reset_driver`) the driver acks
        `features` (default `choose_features()`); later starts resume the
        rings where `stop` left them. `uaddr_base` moves the frontend's
        address space (a remap the daemon must follow).
        """
        assert self.sock is not None, "not connected"
        assert not self.started, "already started"
        if uaddr_base is not None:
            self.uaddr_base = uaddr_base
        self.probe(features)
        assert self.driver_features is not None
        acked = self.driver_features | ((1 << wire.F_PROTOCOL_FEATURES) if self.protocol_bit else 0)
        self.set_u64(Request.SET_FEATURES, acked)
        self.send_memory()
        for index, q in self.queues.items():
            self.request(Request.SET_VRING_NUM, wire.pack_vring_state(index, q.size))
            self.request(Request.SET_VRING_BASE, wire.pack_vring_state(index, q.base))
            addr = wire.pack_vring_addr(
                index, 0, desc=self.uaddr(q.desc_gpa), used=self.uaddr(q.used_gpa), avail=self.uaddr(q.avail_gpa)
            )
            self.request(Request.SET_VRING_ADDR, addr)
            q.kick_fd = self._set_vring_fd(Request.SET_VRING_KICK, index, self._kick_fds)
            q.call_fd = self._set_vring_fd(Request.SET_VRING_CALL, index, self._call_fds)
            q._kicked_at = q.avail_idx
        if self.protocol_bit:
            for index in range(self.num_vqs):
                self.request(Request.SET_VRING_ENABLE, wire.pack_vring_state(index, 1))
        # The guest notifiers (irqfds) replace the call fds once the device runs.
        for index in range(self.num_vqs):
            fd = self._set_vring_fd(Request.SET_VRING_CALL, index, self._call_fds)
            if index in self.queues:
                self.queues[index].call_fd = fd
        self.started = True
        self.get_config()

    def stop(self) -> dict[int, int]:
        """VM stop: disable every ring, then GET_VRING_BASE per configured one.

        Returns {queue index: base}; each queue resumes from its base at the
        next `start`.
        """
        assert self.started, "not started"
        if self.protocol_bit:
            for index in range(self.num_vqs):
                self.request(Request.SET_VRING_ENABLE, wire.pack_vring_state(index, 0))
        bases = {}
        for index, q in self.queues.items():
            payload = self.request(Request.GET_VRING_BASE, wire.pack_vring_state(index, 0))
            assert payload is not None
            if len(payload) != 8:
                raise UnexpectedReply(f"GET_VRING_BASE reply of {len(payload)} bytes")
            got_index, base = wire.unpack_vring_state(payload)
            if got_index != index:
                raise UnexpectedReply(f"GET_VRING_BASE for queue {index} answered for queue {got_index}")
            q.base = base
            bases[index] = base
            q.kick_fd = None
        for fd in self._kick_fds.values():
            os.close(fd)
        self._kick_fds.clear()
        self.started = False
        return bases

    def restart(self, **kw: Any) -> dict[int, int]:
        bases = self.stop()
        self.start(**kw)
        return bases

    # ============================================================ config space

    def get_config(self) -> wire.BalloonConfig:
        """GET_CONFIG of the whole config space (refreshes QEMU's cached copy)."""
        window = wire.pack_config_space(0, self.config_size, 0, bytes(self.config_size))
        payload = self.request(Request.GET_CONFIG, window)
        assert payload is not None
        if len(payload) != wire.CONFIG_HEADER_SIZE + self.config_size:
            raise UnexpectedReply(f"GET_CONFIG reply of {len(payload)} bytes")
        offset, size, _, data = wire.unpack_config_space(payload)
        if (offset, size) != (0, self.config_size):
            raise UnexpectedReply(f"GET_CONFIG reply for window {offset}+{size}")
        self.config_cache[:] = data
        return self.cached_config()

    def cached_config(self) -> wire.BalloonConfig:
        return wire.BalloonConfig.decode(bytes(self.config_cache))

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write: patch QEMU's cached copy, send all of it (stale
        num_pages included) as QEMU's vhost-user-base does."""
        self.config_cache[offset : offset + len(data)] = data
        window = wire.pack_config_space(0, self.config_size, 0, bytes(self.config_cache))
        self.request(Request.SET_CONFIG, window)

    def num_pages(self) -> int:
        """The target the device asks for (reads the config space)."""
        return self.get_config().num_pages

    def set_actual(self, pages: int) -> None:
        self.write_config(wire.OFFSET_ACTUAL, wire.pack_u32(pages))

    def set_poison(self, value: int) -> None:
        self.write_config(wire.OFFSET_POISON_VAL, wire.pack_u32(value))

    # ========================================================= backend channel

    def poll_backend(self, timeout: float = 0.0) -> list[wire.Message]:
        """Read the backend-channel messages already there or, if none, the
        first to arrive within `timeout`. Acknowledges those that ask for it.
        They are also appended to `backend_messages`."""
        if self.backend_sock is None:
            return []
        out: list[wire.Message] = []
        deadline = time.monotonic() + timeout
        while True:
            wait = 0.0 if out else max(0.0, deadline - time.monotonic())
            if not _poll_in(self.backend_sock.fileno(), wait):
                break
            data = self.backend_sock.recv(65536)
            if not data:
                break  # the daemon closed the channel
            self._backend_buffer += data
            while len(self._backend_buffer) >= wire.HEADER_SIZE:
                request, flags, size = wire.unpack_header(self._backend_buffer)
                if len(self._backend_buffer) < wire.HEADER_SIZE + size:
                    break
                payload = bytes(self._backend_buffer[wire.HEADER_SIZE : wire.HEADER_SIZE + size])
                del self._backend_buffer[: wire.HEADER_SIZE + size]
                if flags & wire.FLAG_NEED_REPLY:
                    reply = wire.pack_message(request, wire.pack_u64(0), wire.VERSION | wire.FLAG_REPLY)
                    self.backend_sock.sendall(reply)
                out.append(wire.Message(request, flags, payload))
        self.backend_messages.extend(out)
        return out

    def wait_config_change(self, timeout: float | None = None) -> bool:
        """Wait for a CONFIG_CHANGE_MSG; True if one came."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            for m in self.poll_backend(max(0.0, deadline - time.monotonic())):
                if m.request == BackendRequest.CONFIG_CHANGE_MSG:
                    return True
            if time.monotonic() >= deadline:
                return False

    # ============================================================ the driver

    def queue(self, role: QueueRole) -> DriverQueue:
        return self.queues[self.roles.index(role)]

    def queue_index(self, role: QueueRole) -> int:
        return self.roles.index(role)

    def kick(self, role: QueueRole, force: bool = True) -> bool:
        return self.queue(role).kick(force)

    def _pfn_slot_gpas(self, role: QueueRole) -> list[int]:
        base = self._slots[self.queue_index(role)].pfn_gpa
        return [base + i * PFNS_PER_BUFFER * 4 for i in range(self.pfn_slots)]

    def _tell_host(self, role: QueueRole, pfns: Iterable[int], per_buffer: int, inflight: int, timeout: float | None) -> int:
        """Send PFNs in buffers of `per_buffer`, at most `inflight` outstanding;
        wait until every buffer came back. Returns the number of buffers."""
        if not 1 <= per_buffer <= PFNS_PER_BUFFER:
            raise ValueError(f"per_buffer must be 1..{PFNS_PER_BUFFER}")
        q = self.queue(role)
        free = self._pfn_slot_gpas(role)[: max(1, min(inflight, self.pfn_slots))]
        arr = pfns if isinstance(pfns, array.array) and pfns.typecode == "I" else array.array("I", pfns)
        raw = memoryview(arr).cast("B")
        mem = self.ram.mem
        # Only this call's buffers count: chains a test put on the ring by
        # hand before (its own slots as tokens) may come back in the same
        # collection, and counting them would end the wait too early or never.
        outstanding: set[int] = set()
        buffers = 0
        try:
            for start in range(0, len(arr), per_buffer):
                while not free:
                    for used in q.wait(1, timeout):
                        if used.token in outstanding:
                            free.append(used.token)
                            outstanding.discard(used.token)
                slot = free.pop()
                chunk = raw[start * 4 : (start + per_buffer) * 4]
                off = self.ram.offset(slot, len(chunk))
                mem[off : off + len(chunk)] = chunk
                q.put_avail(q.add([(slot, len(chunk), False)], slot))
                q.kick()
                outstanding.add(slot)
                buffers += 1
            while outstanding:
                for used in q.wait(1, timeout):
                    outstanding.discard(used.token)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; this call: {buffers} buffers sent, {len(outstanding)} not back") from None
        return buffers

    def inflate(
        self, pfns: Iterable[int], *, per_buffer: int = PFNS_PER_BUFFER, inflight: int = 1, timeout: float | None = None
    ) -> int:
        """Give PFNs to the balloon, 256 per buffer, waiting for each (as Linux
        does; `inflight` > 1 pipelines buffers). Returns the buffer count."""
        return self._tell_host(QueueRole.INFLATE, pfns, per_buffer, inflight, timeout)

    def deflate(
        self, pfns: Iterable[int], *, per_buffer: int = PFNS_PER_BUFFER, inflight: int = 1, timeout: float | None = None
    ) -> int:
        """Take PFNs back from the balloon (see `inflate`)."""
        return self._tell_host(QueueRole.DEFLATE, pfns, per_buffer, inflight, timeout)

    # ------------------------------------------------------------------ stats

    def _write_stats(self, values: dict[int, int] | None) -> int:
        if values:
            for tag, value in values.items():
                self._stats_values[int(tag)] = value
        buf = wire.pack_stats((int(tag), self._stats_values.get(int(tag), 0)) for tag in LINUX_STAT_TAGS)
        self.ram.write(self._slots[self.queue_index(QueueRole.STATS)].aux_gpa, buf)
        return len(buf)

    def prime_stats(self, values: dict[int, int] | None = None) -> None:
        """At probe Linux puts one stats buffer on the stats queue (before
        DRIVER_OK, so with no kick the backend sees); do the same."""
        q = self.queue(QueueRole.STATS)
        length = self._write_stats(values)
        gpa = self._slots[self.queue_index(QueueRole.STATS)].aux_gpa
        self._stats_head = q.add([(gpa, length, False)], "stats")
        q.put_avail(self._stats_head)
        q.kick()

    def stats_requested(self, timeout: float = 0.0) -> bool:
        """True if the device has returned the stats buffer (asking for fresh
        stats) within `timeout`."""
        q = self.queue(QueueRole.STATS)
        try:
            used = q.wait(1, timeout) if timeout > 0 else q.get_used()
        except TimeoutError:
            return False
        for u in used:
            if u.token == "stats":
                self._stats_head = None
                return True
        return False

    def answer_stats(self, values: dict[int, int] | None = None) -> None:
        """Refill the stats buffer and hand it back (Linux's stats work)."""
        assert self._stats_head is None, "the device still holds the stats buffer"
        self.prime_stats(values)

    def serve_stats(self, values: dict[int, int] | None = None, timeout: float | None = None) -> bool:
        """Wait for a stats request and answer it; False if none came in time."""
        if not self.stats_requested(self.timeout if timeout is None else timeout):
            return False
        self.answer_stats(values)
        return True

    # ---------------------------------------------------- free page reporting

    def report_free(
        self, ranges: Sequence[tuple[int, int]], *, indirect: bool | None = None, timeout: float | None = None
    ) -> Used:
        """Report free (gpa, length) ranges as one request of device-writable
        descriptors; wait until the device returns it."""
        q = self.queue(QueueRole.REPORTING)
        q.submit([(gpa, length, True) for gpa, length in ranges], "report", indirect=indirect)
        while True:
            for u in q.wait(1, timeout):
                if u.token == "report":
                    return u

    # ---------------------------------------------------------------- migrate

    def migrate(self, moves: Sequence[tuple[int, int]], *, timeout: float | None = None) -> int:
        """Send (old_pfn, new_pfn) records on the migrate queue, 256 per buffer;
        returns the buffer count."""
        q = self.queue(QueueRole.MIGRATE)
        gpa = self._slots[self.queue_index(QueueRole.MIGRATE)].aux_gpa
        buffers = 0
        for start in range(0, len(moves), wire.MIGRATIONS_PER_BUFFER):
            chunk = moves[start : start + wire.MIGRATIONS_PER_BUFFER]
            data = wire.pack_migrations(chunk)
            self.ram.write(gpa, data)
            q.submit([(gpa, len(data), False)], "migrate")
            while not any(u.token == "migrate" for u in q.wait(1, timeout)):
                pass
            buffers += 1
        return buffers

    def migrate_stock(self, old_pfn: int, new_pfn: int) -> None:
        """How a stock Linux driver reports a balloon page migration: a 1-page
        inflate of the new page, then a 1-page deflate of the old one."""
        self.inflate([new_pfn])
        self.deflate([old_pfn])

    # ------------------------------------------------------------ raw chains

    def aux_gpa(self, role: QueueRole) -> int:
        """A page of driver memory belonging to `role`'s queue, free for raw tests
        (not used by inflate/deflate/report; used by stats and migrate)."""
        return self._slots[self.queue_index(role)].aux_gpa
