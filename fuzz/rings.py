"""Fuzz harness: a hostile guest against the real balloon device.

`run(data)` builds a real `BalloonDevice` over a real memfd-backed
`GuestMemory` (two RAM regions with a hole between them, and file pages that
are not guest RAM at all), starts real `Vring`/`SplitQueue` objects whose
rings live in that guest RAM, and then lets the input write whatever it likes
into descriptor tables, avail rings, used rings, indirect tables and buffers
(PFN arrays, stats, migrate records, free-page reports) before kicking
queues with `device.queue_kicked`, as the engine does on a kick.

Every page of the memfd starts with a sentinel pattern unique to the page.
After every call into the device the harness checks:

* nothing raised (the device must turn bad guest data into counted errors);
* no call took longer than `hang_seconds`;
* memory: every byte that changed lies in a used ring (the only guest memory
  the device may write) or in a page that is or was in the balloon during the
  input, or - with free page reporting - in a page the guest reported free
  (inside guest RAM: pages of the file outside every RAM region never
  change); and every hole punched in the memfd (SEEK_HOLE) is such a page;
* in the default ring layout, where the harness can predict the outcome (no
  buffer it reads overlaps a used ring the device writes), an independent
  model of the queue: the number of chains returned on the used ring, the
  number of guest errors counted, the exact set of ballooned frames after
  inflates, deflates and migrations, and the last stats sample;
* log lines of the rate-limited events stay within the burst, and a guest
  error is never counted without a log line;
* in the deferred discard mode (bit 5 of the input's second byte: the
  daemon's default delay, inside an event loop so the device really defers),
  the pending discards are done every DEFERRED_FLUSH_OPS ops, as the timer
  would, and then only pages of frames in the balloon at that moment may
  change: a frame deflated while its discard was pending must keep the data
  the guest wrote since.

Any violation raises `FuzzFailure`, which the fuzzers report as a crash.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from balloond.device.balloon import MAX_BUFFER_BYTES, BalloonDevice, DeviceSettings
from balloond.engine.memory import GuestMemory
from balloond.engine.vring import Vring
from protocol import balloon as vb
from protocol import extension as ext
from protocol.balloon import Feature, QueueRole
from protocol.errors import GuestError, ProtocolError
from protocol.vhost_user import MemoryRegion, VringAddr
from protocol.virtqueue import (
    DESC,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    BudgetExhausted,
    avail_ring_size,
    descriptor_budget,
    desc_table_size,
    used_ring_size,
    walk_chain,
)

from .common import CapturingLog, FuzzFailure, Input

PAGE = 4096
U16 = struct.Struct("<H")

# ------------------------------------------------------------------ layout
# The memfd: region 0 (guest-physical 0, 256 KiB), 16 KiB of file that is not
# guest RAM, region 1 (guest-physical 4 GiB, 256 KiB), 16 KiB more non-RAM.


@dataclass(frozen=True)
class Region:
    gpa: int
    pages: int
    file_page: int

    @property
    def size(self) -> int:
        return self.pages * PAGE

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def first_pfn(self) -> int:
        return self.gpa // PAGE


REGIONS = (Region(0, 64, 0), Region(1 << 32, 64, 68))
FILE_PAGES = 136
FILE_SIZE = FILE_PAGES * PAGE
NON_RAM_FILE_PAGES = frozenset(range(64, 68)) | frozenset(range(132, 136))
UADDR_BASE = 0x7F3A_0000_0000
RAM_PFNS = tuple(p for r in REGIONS for p in range(r.first_pfn, r.first_pfn + r.pages))
RAM_PFN_SET = frozenset(RAM_PFNS)

MAX_QUEUES = 5  # inflate, deflate, stats, reporting, migrate
MAX_OPS = 48

#: Deferred discard mode: the harness lets the discard timer fire after every
#: this many ops (the inputs' notion of time passing).
DEFERRED_FLUSH_OPS = 8

#: Default ring layout: queue q's descriptor table and avail ring in page 2q,
#: its used ring in page 2q+1 (room for 128 entries). Buffers live in the
#: data pages: the rest of region 0 and all of region 1.
DATA_GPAS = tuple(p * PAGE for p in range(2 * MAX_QUEUES, 64)) + tuple((1 << 32) + p * PAGE for p in range(64))
RAM_GPAS = tuple(p * PAGE for p in RAM_PFNS)


def pfn_to_file_page(pfn: int) -> int | None:
    for r in REGIONS:
        if r.first_pfn <= pfn < r.first_pfn + r.pages:
            return r.file_page + pfn - r.first_pfn
    return None


def gpa_to_file(gpa: int, length: int = 1) -> int | None:
    """File offset of [gpa, gpa+length) if it lies inside one RAM region."""
    for r in REGIONS:
        if r.gpa <= gpa and gpa + length <= r.end and length >= 0:
            return r.file_page * PAGE + gpa - r.gpa
    return None


def uaddr_to_file(uaddr: int, length: int) -> int | None:
    """File offset of a frontend address range, if one region maps all of it."""
    for r in REGIONS:
        start = UADDR_BASE + r.file_page * PAGE
        if start <= uaddr and uaddr + length <= start + r.size:
            return r.file_page * PAGE + uaddr - start
    return None


def sentinel_page(page: int) -> bytes:
    return struct.pack("<QQ", 0x5E17_1E1_0000_0000 | page, ~page & 0xFFFF_FFFF_FFFF_FFFF) * (PAGE // 16)


ZERO_PAGE = bytes(PAGE)
SENTINEL = b"".join(sentinel_page(p) for p in range(FILE_PAGES))

# ----------------------------------------------------------- value choices

OFFSETS = (0, 0, 0, 4, 8, 10, 16, 20, PAGE - 16, PAGE - 10, PAGE - 4, PAGE - 1, 2, 1)
REGION_ENDS = tuple(r.end for r in REGIONS)
OUTSIDE = (
    64 * PAGE,  # the hole after region 0
    0x4_4000,
    (1 << 32) - PAGE,
    (1 << 32) + 64 * PAGE,
    1 << 40,
    (1 << 64) - 1,
    (1 << 64) - 16,
    1 << 63,
    0xFFFF_F000,
)
LENGTHS = (0, 1, 2, 4, 8, 10, 16, 20, 32, 160, 256, 1024, 4092, 4096, 4100, 8192, 65536, 65540, 1 << 31, (1 << 32) - 1)
FLAGS = (
    0,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT,
    VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE,
)
OUTSIDE_PFNS = (64, 67, 0xFFFFF, 0x100040, 0x100000 - 1, 0xFFFF_FFFF, 0x8000_0000, 0x1000_0000)
STAT_TAGS = tuple(range(16)) + (16, 255, 0xFFFF)


def ring_gpas(q: int, num: int) -> tuple[int, int, int]:
    desc = 2 * q * PAGE
    return desc, desc + desc_table_size(num), (2 * q + 1) * PAGE


class Opcode:
    DESC = 0
    CHAIN = 1
    INDIRECT = 2
    AVAIL = 3
    PFNS = 4
    STATS = 5
    MIGRATE = 6
    REPORT = 7
    RAW = 8
    KICK = 9
    KICK_ALL = 10
    RESTART = 11
    REMAP = 12
    STATS_TIMER = 13
    CONFIG = 14
    KICK2 = 15
    COUNT = 16


# ---------------------------------------------------------------- helpers


class SnapshotMemory:
    """Guest RAM as it was before a call, for the model; records what was read."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.reads: list[tuple[int, int]] = []  # gpa, length

    def view(self, gpa: int, length: int) -> memoryview:
        for r in REGIONS:
            if r.gpa <= gpa < r.end:
                if length < 0 or gpa + length > r.end:
                    raise GuestError("snapshot: range crosses its region's end")
                self.reads.append((gpa, length))
                off = r.file_page * PAGE + gpa - r.gpa
                return self.data[off : off + length]
        raise GuestError("snapshot: outside guest RAM")


class FakeHost:
    def __init__(self) -> None:
        self.config_changes = 0

    def config_changed(self) -> bool:
        self.config_changes += 1
        return True


@dataclass
class RunStats:
    ops: int = 0
    kicks: int = 0
    chains: int = 0
    guest_errors: int = 0
    ballooned_max: int = 0
    discarded_pages: int = 0
    predicted_kicks: int = 0
    reporting: bool = False
    max_call_seconds: float = 0.0
    stray_discards: int = 0  # always 0 when run() returns; counted for reports
    features: int = 0
    deferred: bool = False  # discards waited (the default delay) instead of being done per buffer
    deferred_flushes: int = 0  # flushes of pending discards the harness did, as the timer would
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------- the run


class RingRun:
    def __init__(self, data: bytes, *, hang_seconds: float = 5.0) -> None:
        self.inp = Input(data)
        self.hang_seconds = hang_seconds
        self.stats = RunStats()
        self.log = CapturingLog()
        self.fd = -1
        self.mapping: mmap.mmap | None = None
        self.mem: memoryview | None = None
        self.memory: GuestMemory | None = None
        self.vrings: list[Vring] = []
        self.device: BalloonDevice | None = None
        self.model: set[int] = set()
        self.model_valid = True
        self.allowed_pages: set[int] = set()  # file pages that may be discarded / rewritten
        self.known_holes: set[int] = set()  # holes seen at the last check
        self.deferred = False
        self.used_ranges: list[tuple[int, int]] = []  # file [start, end) the device may write
        self.custom_layout = False
        self.expected_stats: dict[str, int] | None = None

    # ---------------------------------------------------------- guest side

    def write(self, gpa: int, data: bytes) -> None:
        """Guest writes bytes; parts outside guest RAM are dropped."""
        for r in REGIONS:
            lo, hi = max(gpa, r.gpa), min(gpa + len(data), r.end)
            if lo < hi:
                off = r.file_page * PAGE + lo - r.gpa
                chunk = data[lo - gpa : hi - gpa]
                assert self.mem is not None
                self.mem[off : off + len(chunk)] = chunk
                self.shadow[off : off + len(chunk)] = chunk

    def addr(self) -> int:
        inp = self.inp
        k = inp.below(12)
        if k <= 4:
            return inp.choice(DATA_GPAS) + inp.choice(OFFSETS)
        if k == 5:
            return inp.choice(REGION_ENDS) - inp.choice((0, 1, 4, 16, 160, PAGE))
        if k == 6:
            q = inp.below(MAX_QUEUES)
            return 2 * q * PAGE + inp.choice((0, 16, 512, 1024, 2048, PAGE, PAGE + 4))
        if k == 7:
            return inp.choice(OUTSIDE)
        if k == 8:
            return inp.u64()
        if k == 9:
            return inp.choice(RAM_GPAS) + inp.u16() % PAGE
        if k == 10:
            return inp.choice((0, 1 << 32)) + inp.u8()
        return inp.choice(DATA_GPAS) + inp.u16()

    def length(self) -> int:
        inp = self.inp
        k = inp.below(10)
        if k <= 5:
            return inp.choice(LENGTHS)
        if k == 6:
            return 4 * inp.u8()
        if k == 7:
            return 16 * inp.u8()
        if k == 8:
            return inp.u16()
        return inp.u32()

    def flags(self) -> int:
        k = self.inp.below(len(FLAGS) + 1)
        return FLAGS[k] if k < len(FLAGS) else self.inp.u16()

    def index(self, num: int) -> int:
        v = self.inp.u8()
        return v % num if v < 0xF0 else self.inp.u16()

    def pfn(self) -> int:
        inp = self.inp
        k = inp.below(10)
        if k <= 6:
            return inp.choice(RAM_PFNS)
        if k == 7:
            return inp.choice(OUTSIDE_PFNS)
        if k == 8:
            return (1 << 20) + inp.u8()  # region 1 and just past it
        return inp.u32()

    def data_gpa(self) -> int:
        return self.inp.choice(DATA_GPAS) + self.inp.choice((0, 0, 0, 4, 16, PAGE - 8, 2))

    # ------------------------------------------------------------ set-up

    def setup(self) -> None:
        inp = self.inp
        feat = inp.u8()
        sizes = inp.u8()
        acked = (1 << Feature.VERSION_1) | (1 << Feature.MUST_TELL_HOST)
        for bit, feature in enumerate(
            (
                Feature.STATS_VQ,
                Feature.REPORTING,
                Feature.BALLOOND_MIGRATE_VQ,
                Feature.RING_INDIRECT_DESC,
                Feature.RING_EVENT_IDX,
                Feature.PAGE_POISON,
                Feature.DEFLATE_ON_OOM,
            )
        ):
            if feat & (1 << bit):
                acked |= 1 << feature
        self.custom_layout = bool(feat & 0x80)
        self.event_idx = bool(acked & (1 << Feature.RING_EVENT_IDX))
        self.indirect = bool(acked & (1 << Feature.RING_INDIRECT_DESC))
        roles = vb.queue_roles(acked)
        self.roles = roles
        nq = len(roles)
        self.deferred = self.stats.deferred = bool(sizes & 32)
        nums = [1 << (sizes & 7)] * nq
        if sizes & 8:
            nums = [1 << (inp.u8() & 7) for _ in range(nq)]
        bases = [0] * nq
        if sizes & 16:
            bases = [inp.u16() for _ in range(nq)]
        layouts = []
        for q in range(nq):
            if self.custom_layout:
                layouts.append((self.addr(), self.addr(), self.addr()))
            else:
                layouts.append(ring_gpas(q, nums[q]))

        # Guest RAM: a fresh memfd, every page holding its sentinel.
        self.fd = os.memfd_create("balloond-fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, FILE_SIZE)
        self.mapping = mmap.mmap(self.fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.mem = memoryview(self.mapping)
        self.mem[:] = SENTINEL
        self.shadow = bytearray(SENTINEL)
        # The driver zeroes its rings before it starts them.
        for q, (d, a, u) in enumerate(layouts):
            num = nums[q]
            for gpa, size in ((d, desc_table_size(num)), (a, avail_ring_size(num)), (u, used_ring_size(num))):
                self.write(gpa, bytes(size))
        self.layouts = layouts
        self.nums = nums

        # Deferred: the default delay, with an idle time no input outlasts, so
        # pending discards are done only when the harness says time passed
        # (`_flush_as_the_timer_would`), or by the device's own flushes.
        settings = (
            DeviceSettings(stats_interval=0, discard_idle=3600.0)
            if self.deferred
            else DeviceSettings(stats_interval=0, discard_max_delay=0)
        )
        device = self.device = BalloonDevice(settings, target_pages=inp.u16(), log=self.log)
        acked &= device.features
        self.acked = acked
        self.stats.features = acked
        self.stats.reporting = bool(acked & (1 << Feature.REPORTING))
        self.host = FakeHost()
        device.attach(self.host)
        device.set_features(acked)
        if acked & (1 << Feature.PAGE_POISON):
            device.write_config(vb.BalloonConfig.OFFSET_POISON_VAL, struct.pack("<I", inp.choice((0, 0xAA, 0xFFFFFFFF))))
        self.memory = self._map()
        self.call(device.set_memory, self.memory)
        for q in range(nq):
            vring = Vring(q)
            vring.num = nums[q]
            vring.base = bases[q]
            d, a, u = layouts[q]
            vring.addr = VringAddr(q, 0, self._uaddr(d), self._uaddr(u), self._uaddr(a), 0)
            vring.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            vring.enabled = True
            self.vrings.append(vring)
            # What the device may write: the used ring, wherever its uaddr lands.
            size = used_ring_size(nums[q])
            off = uaddr_to_file(vring.addr.used_user_addr, size)
            if off is not None:
                self.used_ranges.append((off, off + size))
        for vring in self.vrings:
            self._start(vring)
        self.call(device.started)
        # Frames already in the balloon when the input starts.
        initial = [self.pfn() for _ in range(inp.below(65))]
        device.tracker.inflate(initial)
        self.model = set(p for p in initial if p in RAM_PFN_SET)
        self.note_balloon()
        self.check("setup")

    def _uaddr(self, gpa: int) -> int:
        off = gpa_to_file(gpa)
        if off is None:
            return gpa ^ UADDR_BASE  # somewhere no region maps
        return UADDR_BASE + off

    def _map(self) -> GuestMemory:
        memory = GuestMemory()
        for r in REGIONS:
            memory.add(MemoryRegion(r.gpa, r.size, UADDR_BASE + r.file_page * PAGE, r.file_page * PAGE), os.dup(self.fd))
        return memory

    def _start(self, vring: Vring) -> None:
        """The engine's _try_start: map the ring, tell the device."""
        assert self.memory is not None and self.device is not None
        try:
            vring.start(self.memory, event_idx=self.event_idx, indirect=self.indirect)
        except GuestError:
            return
        reported = self.device.counters.reported_bytes
        self.call(self.device.queue_started, vring)
        if self.device.counters.reported_bytes != reported:
            self._any_page_reported()  # queue_started looked at the ring: unpredicted

    def _any_page_reported(self) -> None:
        """Unpredictable reporting: any page of guest RAM (never the rest of the file) may go."""
        for r in REGIONS:
            self.allowed_pages.update(range(r.file_page, r.file_page + r.pages))

    def _stop(self, vring: Vring) -> None:
        """The engine's GET_VRING_BASE / suspend: the device hands back what it holds."""
        assert self.device is not None
        if vring.live:
            held = self.call(self.device.queue_stopped, vring) or 0
            vring.base = (vring.stop() - held) & 0xFFFF

    # --------------------------------------------------------- invariants

    def call(self, fn: Any, *args: Any) -> Any:
        start = time.monotonic()
        try:
            return fn(*args)
        except Exception as exc:
            raise FuzzFailure(f"{getattr(fn, '__name__', fn)} raised {type(exc).__name__}: {exc}") from exc
        finally:
            took = time.monotonic() - start
            self.stats.max_call_seconds = max(self.stats.max_call_seconds, took)
            if took > self.hang_seconds:
                raise FuzzFailure(f"{getattr(fn, '__name__', fn)} took {took:.2f}s (hang bound {self.hang_seconds}s)")

    def note_balloon(self) -> None:
        assert self.device is not None
        tracker = self.device.tracker
        for pfn in tracker:
            page = pfn_to_file_page(pfn)
            if page is None:
                raise FuzzFailure(f"tracker holds frame {pfn:#x} outside guest RAM")
            self.allowed_pages.add(page)
        self.stats.ballooned_max = max(self.stats.ballooned_max, len(tracker))

    def read_file(self) -> bytes:
        return os.pread(self.fd, FILE_SIZE, 0)

    def holes(self) -> list[int]:
        """File pages that are holes in the memfd (discarded)."""
        pages = []
        off = 0
        while off < FILE_SIZE:
            try:
                data = os.lseek(self.fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = FILE_SIZE
            pages.extend(range(off // PAGE, min(data, FILE_SIZE) // PAGE))
            if data >= FILE_SIZE:
                break
            off = os.lseek(self.fd, data, os.SEEK_HOLE)
        return pages

    def _changed_bytes(self, actual: bytes, lo: int, hi: int) -> list[int]:
        out = []
        for line in range(lo, hi, 64):
            if actual[line : line + 64] != self.shadow[line : line + 64]:
                out.extend(i for i in range(line, line + 64) if actual[i] != self.shadow[i])
        return out

    def _in_used(self, start: int, end: int) -> bool:
        return any(lo <= start and end <= hi for lo, hi in self.used_ranges)

    def check_holes(self, where: str, allowed: set[int] | None = None) -> None:
        self.note_balloon()
        holes = self.holes()
        self.stats.discarded_pages = max(self.stats.discarded_pages, len(holes))
        new_holes = set(holes) - self.known_holes if allowed is not None else set()
        self.known_holes = set(holes)
        for page in new_holes:
            if page not in allowed:  # type: ignore[operator]
                self.stats.stray_discards += 1
                raise FuzzFailure(f"after {where}: file page {page} was discarded but is not in the balloon")
        for page in holes:
            if page not in self.allowed_pages:
                self.stats.stray_discards += 1
                raise FuzzFailure(f"after {where}: file page {page} was discarded but was never ballooned or reported")
            if page in NON_RAM_FILE_PAGES:
                raise FuzzFailure(f"after {where}: file page {page}, not guest RAM, was discarded")

    def check(self, where: str, allowed: set[int] | None = None) -> None:
        """`allowed`: the pages that may have been discarded since the last
        check (default: any page ever ballooned or reported)."""
        assert self.mem is not None and self.device is not None
        # Holes first, and contents with pread: a read fault through a shared
        # mapping would allocate the page again and hide the hole.
        self.check_holes(where, allowed)
        actual = self.read_file()
        if actual != self.shadow:
            for page in range(FILE_PAGES):
                lo, hi = page * PAGE, (page + 1) * PAGE
                now = actual[lo:hi]
                if now == self.shadow[lo:hi]:
                    continue
                # A byte may change only by a used-ring write, or to zero by a
                # discard of a page that is (or was) ballooned or reported free.
                discardable = page in (self.allowed_pages if allowed is None else allowed)
                if discardable and now == ZERO_PAGE:
                    continue
                for i in self._changed_bytes(actual, lo, hi):
                    if self._in_used(i, i + 1):
                        continue
                    if discardable and actual[i] == 0:
                        continue
                    self.stats.stray_discards += 1
                    raise FuzzFailure(
                        f"after {where}: file page {page} changed at byte {i - lo} "
                        f"(is {actual[i]:#x}, was {self.shadow[i]:#x}); "
                        f"{'a discardable page, but not to zero' if discardable else 'not ballooned, not reported, not a used ring'}"
                    )
        self.shadow = bytearray(actual)

    # ----------------------------------------------------------- the model

    def _overlaps_used(self, snapshot: SnapshotMemory) -> bool:
        for gpa, length in snapshot.reads:
            off = gpa_to_file(gpa, length)
            if off is None:
                return True
            for lo, hi in self.used_ranges:
                if off < hi and lo < off + max(length, 1):
                    return True
        return False

    def predict(self, vring: Vring) -> dict[str, Any] | None:
        """What a kick of `vring` must do, computed from a copy of guest RAM;
        None where the outcome depends on the device's own writes."""
        device = self.device
        assert device is not None
        if self.custom_layout or vring.queue is None or device.memory is None:
            return None
        q = vring.queue
        role = device.roles.get(vring.index)
        snap = SnapshotMemory(self.read_file())
        d, a, _u = self.layouts[vring.index]
        desc = snap.view(d, desc_table_size(q.num))
        avail = snap.view(a, avail_ring_size(q.num))
        out: dict[str, Any] = {"errors": 0, "pushes": 0, "popped": 0, "report_pages": set()}
        pending = (U16.unpack_from(avail, 2)[0] - q.last_avail) & 0xFFFF
        chains = []
        if pending > q.num:
            out["errors"] += 1
        else:
            # A pass walks at most descriptor_budget(num) descriptors, and a
            # head the device holds (popped, not returned) is an error.
            in_flight, budget = set(q.in_flight), descriptor_budget(q.num)
            for i in range(pending):
                head = U16.unpack_from(avail, 4 + 2 * ((q.last_avail + i) % q.num))[0]
                if head in in_flight:
                    out["popped"] += 1
                    out["errors"] += 1
                    continue
                try:
                    chain = walk_chain(desc, q.num, head, snap, q.indirect, budget=budget)
                except BudgetExhausted:
                    break
                except GuestError:
                    out["popped"] += 1
                    out["errors"] += 1
                    if head < q.num:
                        out["pushes"] += 1
                    continue
                out["popped"] += 1
                budget -= chain.descriptors
                in_flight.add(head)
                chains.append(chain)
        model = set(self.model)
        if role in (QueueRole.INFLATE, QueueRole.DEFLATE, QueueRole.MIGRATE, QueueRole.REPORTING):
            out["pushes"] += len(chains)
        for chain in chains:
            if role is QueueRole.REPORTING:
                if vb.has(device.acked, Feature.PAGE_POISON) and device.config.poison_val != 0:
                    continue
                for seg in chain.segments:
                    try:
                        snap.view(seg.addr, seg.length)
                    except GuestError:
                        out["errors"] += 1
                        continue
                    first = -(-seg.addr // PAGE)
                    for pfn in range(first, (seg.addr + seg.length) // PAGE):
                        page = pfn_to_file_page(pfn)
                        if page is not None:
                            out["report_pages"].add(page)
                continue
            if sum(seg.length for seg in chain.segments if not seg.writable) > MAX_BUFFER_BYTES:
                out["errors"] += 1  # oversized: refused whole
                continue
            try:
                data = chain.read_bytes(snap, MAX_BUFFER_BYTES)
            except ProtocolError:
                out["errors"] += 1
                continue
            if role in (QueueRole.INFLATE, QueueRole.DEFLATE):
                if len(data) % 4:
                    out["errors"] += 1
                    continue
                for (pfn,) in struct.iter_unpack("<I", data):
                    if pfn not in RAM_PFN_SET:
                        continue
                    if role is QueueRole.INFLATE:
                        model.add(pfn)
                    else:
                        model.discard(pfn)
            elif role is QueueRole.MIGRATE:
                if len(data) % 16 or len(data) > 16 * ext.MIGRATIONS_PER_BUFFER:
                    out["errors"] += 1
                    continue
                for old, new in struct.iter_unpack("<QQ", data):
                    if old in model and new in RAM_PFN_SET and new not in model:
                        model.discard(old)
                        model.add(new)
            elif role is QueueRole.STATS:
                if len(data) % 10:
                    out["errors"] += 1
                else:
                    values = {}
                    for tag, value in struct.iter_unpack("<HQ", data):
                        try:
                            values[vb.StatTag(tag).key] = value
                        except ValueError:
                            values[f"tag{tag}"] = value
                    out["stats"] = values
        if role is QueueRole.STATS:
            held_before = device._stats_held is not None
            out["pushes"] += (len(chains) - 1 + held_before) if chains else 0
        if self._overlaps_used(snap):
            return None
        out["model"] = model
        return out

    # -------------------------------------------------------------- the ops

    def kick(self, vring: Vring) -> None:
        device = self.device
        assert device is not None
        prediction = self.predict(vring) if self.model_valid else None
        errors_before = device.counters.guest_errors
        used_before = vring.queue.used_idx if vring.queue is not None else None
        before = self._footprint(vring)
        self.call(device.queue_kicked, vring)
        self.stats.kicks += 1
        moved = self._footprint(vring) != before
        if prediction is not None and vring.queue is not None and used_before is not None:
            self.stats.predicted_kicks += 1
            errors = device.counters.guest_errors - errors_before
            pushed = (vring.queue.used_idx - used_before) & 0xFFFF
            if errors != prediction["errors"]:
                raise FuzzFailure(f"kick of queue {vring.index}: {errors} guest errors counted, model says {prediction['errors']}")
            if pushed != prediction["pushes"]:
                raise FuzzFailure(f"kick of queue {vring.index}: {pushed} chains returned, model says {prediction['pushes']}")
            tracked = set(device.tracker)
            if tracked != prediction["model"]:
                extra, missing = sorted(tracked - prediction["model"])[:5], sorted(prediction["model"] - tracked)[:5]
                raise FuzzFailure(f"kick of queue {vring.index}: balloon differs from the model: extra {extra}, missing {missing}")
            if "stats" in prediction and device.stats.values != prediction["stats"]:
                raise FuzzFailure(f"stats sample {device.stats.values} differs from the model's {prediction['stats']}")
            self.model = prediction["model"]
            self.allowed_pages |= prediction["report_pages"]
        else:
            self.model_valid = False
            if device.roles.get(vring.index) is QueueRole.REPORTING:
                self._any_page_reported()
        if moved:
            self.check(f"kick of queue {vring.index}")
        else:
            self.check_holes(f"kick of queue {vring.index}")

    def _footprint(self, vring: Vring) -> tuple[int, ...]:
        """What any work on guest memory moves; a kick that moves none of it
        did nothing (the full memory check still runs at the end of the input)."""
        device = self.device
        assert device is not None
        q = vring.queue
        c, t = device.counters, device.tracker.counters
        return (
            q.last_avail if q else -1,
            q.used_idx if q else -1,
            len(device.tracker),
            t.inflated,
            t.deflated,
            t.migrations,
            c.discard_calls,
            c.reported_bytes,
            c.stats_buffers,
            c.guest_errors,
        )

    def op(self) -> None:
        inp = self.inp
        device = self.device
        assert device is not None
        nq = len(self.vrings)
        code = inp.below(Opcode.COUNT)
        self.stats.ops += 1
        if code == Opcode.DESC:
            q = inp.below(nq)
            d = self.layouts[q][0]
            i = self.index(self.nums[q])
            self.write(d + 16 * (i % self.nums[q]), DESC.pack(self.addr() % (1 << 64), self.length() % (1 << 32), self.flags(), self.index(self.nums[q]) & 0xFFFF))
        elif code == Opcode.CHAIN:
            # A well-formed chain of 1-4 descriptors, published on the avail ring.
            q = inp.below(nq)
            num = self.nums[q]
            d, a, _ = self.layouts[q]
            n = 1 + inp.below(4)
            start = inp.u8() % num
            idx = [(start + k) % num for k in range(n)]
            for k, i in enumerate(idx):
                last = k == n - 1
                writable = inp.u8() < 40
                flags = (0 if last else VRING_DESC_F_NEXT) | (VRING_DESC_F_WRITE if writable else 0)
                self.write(d + 16 * i, DESC.pack(self.data_gpa() if inp.u8() < 230 else self.addr() % (1 << 64), self.length() % (1 << 32), flags, 0 if last else idx[k + 1]))
            self._publish(q, [idx[0]])
        elif code == Opcode.INDIRECT:
            q = inp.below(nq)
            num = self.nums[q]
            d = self.layouts[q][0]
            table = inp.choice(DATA_GPAS) + inp.choice((0, 0, 16, PAGE - 32, 8))
            n = inp.below(17)
            entries = b""
            for k in range(n):
                flags = inp.choice((0, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT))
                nxt = k + 1 if inp.u8() < 200 else inp.u16()
                entries += DESC.pack(self.data_gpa() if inp.u8() < 200 else self.addr() % (1 << 64), self.length() % (1 << 32), flags, nxt & 0xFFFF)
            self.write(table, entries)
            length = 16 * n if inp.u8() < 220 else self.length()
            i = self.index(num) % num
            extra = inp.choice((0, 0, 0, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE))
            self.write(d + 16 * i, DESC.pack(table, length % (1 << 32), VRING_DESC_F_INDIRECT | extra, self.index(num) & 0xFFFF))
            if inp.u8() < 200:
                self._publish(q, [i])
        elif code == Opcode.AVAIL:
            q = inp.below(nq)
            heads = [self.index(self.nums[q]) & 0xFFFF for _ in range(inp.below(9))]
            self._publish(q, heads, mode=inp.below(8))
        elif code == Opcode.PFNS:
            gpa = self.data_gpa()
            mode = inp.below(4)
            count = inp.choice((1, 2, 8, 32, 64, 128, 256, 257, 1024)) if inp.u8() < 200 else inp.u16() % 1100
            if mode == 0:
                pfns = [self.pfn() for _ in range(min(count, 64))]
            elif mode == 1:
                first = self.pfn()
                pfns = [(first + k) & 0xFFFFFFFF for k in range(count)]
            elif mode == 2:
                first = inp.choice((0, 8, 16, 56, 0x100000, 0x100008, 0x100038))
                pfns = [first + k for k in range(count)]
            else:
                first = self.pfn()
                pfns = [(first + k * inp.choice((2, 3, 8, 4096))) & 0xFFFFFFFF for k in range(min(count, 256))]
            data = struct.pack(f"<{len(pfns)}I", *pfns)
            if inp.u8() > 240:
                data = data[: -1 - inp.below(3)]
            self.write(gpa, data)
        elif code == Opcode.STATS:
            gpa = self.data_gpa()
            entries = b"".join(struct.pack("<HQ", inp.choice(STAT_TAGS), inp.u64()) for _ in range(inp.below(20)))
            if inp.u8() > 230:
                entries += inp.take(1 + inp.below(9))
            self.write(gpa, entries)
        elif code == Opcode.MIGRATE:
            gpa = self.data_gpa()
            n = inp.below(20) if inp.u8() < 240 else 257
            recs = b"".join(
                struct.pack("<QQ", self.pfn() if inp.u8() < 230 else inp.u64(), self.pfn() if inp.u8() < 230 else inp.u64())
                for _ in range(n)
            )
            if inp.u8() > 240:
                recs = recs[:-8]
            self.write(gpa, recs)
        elif code == Opcode.REPORT:
            # A free-page report: one descriptor per range, chained or indirect.
            q = inp.below(nq)
            num = self.nums[q]
            d = self.layouts[q][0]
            n = 1 + inp.below(4)
            start = inp.u8() % num
            idx = [(start + k) % num for k in range(n)]
            for k, i in enumerate(idx):
                last = k == n - 1
                gpa = inp.choice(RAM_GPAS) if inp.u8() < 200 else self.addr() % (1 << 64)
                length = inp.choice((PAGE, 2 * PAGE, 16 * PAGE, PAGE // 2, 3 * PAGE + 100)) if inp.u8() < 200 else self.length()
                self.write(d + 16 * i, DESC.pack(gpa, length, VRING_DESC_F_WRITE | (0 if last else VRING_DESC_F_NEXT), 0 if last else idx[k + 1]))
            self._publish(q, [idx[0]])
        elif code == Opcode.RAW:
            gpa = self.addr() % (1 << 64)
            self.write(gpa, inp.take(inp.below(65)))
        elif code in (Opcode.KICK, Opcode.KICK2):
            self.kick(self.vrings[inp.below(nq)])
        elif code == Opcode.KICK_ALL:
            for vring in self.vrings:
                self.kick(vring)
        elif code == Opcode.RESTART:
            vring = self.vrings[inp.below(nq)]
            self._stop(vring)
            mode = inp.below(4)
            if mode == 1:
                vring.base = 0
            elif mode == 2:
                vring.base = inp.u16()
            self._start(vring)
            self.model_valid = False
            self.check("queue restart")
        elif code == Opcode.REMAP:
            live = [v for v in self.vrings if v.live]
            for vring in live:
                self._stop(vring)
            self.call(device.memory_unmapping)
            assert self.memory is not None
            self.memory.close()
            self.memory = self._map()
            self.call(device.set_memory, self.memory)
            for vring in live:
                self._start(vring)
            self.model_valid = False
            self.check("memory remap")
        elif code == Opcode.STATS_TIMER:
            self.call(device._request_stats)
            self.check("stats request")
        elif code == Opcode.CONFIG:
            offset = inp.below(20)
            self.call(device.write_config, offset, inp.take(inp.below(17)))
            self.model_valid = False  # poison may have changed; keep it simple

    def _publish(self, q: int, heads: list[int], mode: int = 0) -> None:
        """Put heads on queue q's avail ring and move its index."""
        num = self.nums[q]
        a = self.layouts[q][1]
        off = gpa_to_file(a, avail_ring_size(num))
        if off is None:
            return
        assert self.mem is not None
        idx = U16.unpack_from(self.mem, off + 2)[0]
        for k, head in enumerate(heads):
            self.write(a + 4 + 2 * ((idx + k) % num), U16.pack(head))
        if mode <= 4:
            new = idx + len(heads)
        elif mode == 5:
            new = self.inp.u16()
        elif mode == 6:
            new = idx + len(heads) + num + 1  # more than a queue's worth ahead
        else:
            new = idx - 1
        self.write(a + 2, U16.pack(new & 0xFFFF))

    def run(self) -> RunStats:
        """Inside an event loop, as the daemon runs: without one the device
        has no timer to defer discards with and does them at once."""

        async def main() -> RunStats:
            return self._run()

        return asyncio.run(main())

    def _flush_as_the_timer_would(self) -> None:
        """Deferred mode: the discard timer fires. Only frames in the balloon
        now may lose their contents; a frame that left it must not."""
        device = self.device
        assert device is not None
        if not device._pending:
            return
        self.stats.deferred_flushes += 1
        self.check("the ops before a deferred flush")
        in_balloon = {page for pfn in device.tracker if (page := pfn_to_file_page(pfn)) is not None}
        self.call(device.flush_discards)
        self.check("a deferred flush", allowed=in_balloon)

    def _run(self) -> RunStats:
        try:
            self.setup()
            while not self.inp.exhausted and self.stats.ops < MAX_OPS:
                self.op()
                if self.deferred and self.stats.ops % DEFERRED_FLUSH_OPS == 0:
                    self._flush_as_the_timer_would()
            # The driver's last word: every queue is looked at once more.
            for vring in self.vrings:
                self.kick(vring)
            if self.deferred:
                self._flush_as_the_timer_would()
            self.check("the input")
            self.finish()
        finally:
            self.teardown()
        return self.stats

    def finish(self) -> None:
        device = self.device
        assert device is not None
        self.stats.guest_errors = device.counters.guest_errors
        self.stats.chains = sum(v.counters.chains for v in self.vrings)
        warnings = Counter(self.log.events("warning"))
        limited = device.limited
        for event, count in warnings.items():
            if event in limited._state and count > limited.burst:
                raise FuzzFailure(f"rate-limited event {event!r} logged {count} times (burst {limited.burst})")
        if device.counters.guest_errors and not warnings.get("bad buffer from guest"):
            raise FuzzFailure("guest errors counted without a log line")
        bugs = [e for lv, e, _ in self.log.records if lv in ("exception", "error")]
        if bugs:
            raise FuzzFailure(f"the device logged errors: {bugs[:3]}")

    def teardown(self) -> None:
        device = self.device
        try:
            if device is not None:
                for vring in self.vrings:
                    if vring.live:
                        self._stop(vring)
                device.stopped()
                device.disconnected()
        finally:
            for vring in self.vrings:
                vring.close()
            if self.memory is not None:
                self.memory.close()
            if self.mem is not None:
                self.mem.release()
            if self.mapping is not None:
                try:
                    self.mapping.close()
                except BufferError:
                    pass
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def run(data: bytes, *, hang_seconds: float = 5.0) -> RunStats:
    """One input through the device; raises FuzzFailure on a broken invariant."""
    return RingRun(data, hang_seconds=hang_seconds).run()


# ------------------------------------------------------------------ seeds


class Builder:
    """Writes inputs in the format `RingRun` decodes (for seeds and tests)."""

    def __init__(self, features: int = 0x1F, size_exp: int = 3) -> None:
        self.out = bytearray([features & 0x7F, size_exp & 7])
        self.out += struct.pack("<H", 0)  # target pages
        self.features = features
        if features & 0x20:
            self.out += bytes([1])  # poison value choice 0xAA

    def initial(self, pfns: list[int]) -> Builder:
        self.out.append(len(pfns))
        for pfn in pfns:
            self.out += bytes([9]) + struct.pack("<I", pfn)  # raw u32 choice
        return self

    def _addr_data(self, page: int, offset_choice: int = 0) -> bytes:
        return bytes([0, page, offset_choice])

    def _len(self, length: int) -> bytes:
        return bytes([8]) + struct.pack("<H", length)  # u16 choice

    def chain(self, q: int, start: int, buffers: list[tuple[int, int, bool]]) -> Builder:
        """buffers: (data page index, length, writable)."""
        self.out += bytes([Opcode.CHAIN, q, len(buffers) - 1, start])
        for page, length, writable in buffers:
            self.out += bytes([0 if writable else 255, 0, page, 0]) + self._len(length)
        return self

    def pfns(self, page: int, pfns: list[int]) -> Builder:
        # mode 1 (a run) when consecutive, else raw values via mode 0 choices
        self.out += bytes([Opcode.PFNS, page, 0, 0, 255]) + struct.pack("<H", len(pfns))
        for pfn in pfns[:64]:
            self.out += bytes([9]) + struct.pack("<I", pfn)
        self.out += bytes([0])
        return self

    def stats(self, page: int, values: list[tuple[int, int]]) -> Builder:
        self.out += bytes([Opcode.STATS, page, 0, len(values)])
        for tag, value in values:
            self.out += bytes([STAT_TAGS.index(tag)]) + struct.pack("<Q", value)
        self.out += bytes([0])
        return self

    def migrate(self, page: int, records: list[tuple[int, int]]) -> Builder:
        self.out += bytes([Opcode.MIGRATE, page, 0, 0, len(records)])
        for old, new in records:
            self.out += bytes([0, 9]) + struct.pack("<I", old) + bytes([0, 9]) + struct.pack("<I", new)
        self.out += bytes([0])
        return self

    def indirect(self, q: int, desc_index: int, page: int, buffers: list[tuple[int, int, bool]]) -> Builder:
        """An indirect table in data page `page` holding `buffers`, published on queue q."""
        self.out += bytes([Opcode.INDIRECT, q, page, 0, len(buffers)])
        for k, (buf_page, length, writable) in enumerate(buffers):
            last = k == len(buffers) - 1
            flags = (VRING_DESC_F_WRITE if writable else 0) | (0 if last else VRING_DESC_F_NEXT)
            flag_choice = (0, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE).index(flags)
            self.out += bytes([flag_choice, 0, 0, buf_page, 0]) + self._len(length)
        self.out += bytes([0, desc_index, 0, 0, 0])
        return self

    def kick(self, q: int) -> Builder:
        self.out += bytes([Opcode.KICK, q])
        return self

    def op(self, code: int, *payload: int) -> Builder:
        self.out += bytes([code, *payload])
        return self

    def bytes(self) -> bytes:
        return bytes(self.out)


def seeds() -> list[bytes]:
    """A few well-formed sessions: the fuzzers start from these."""
    out = []
    # inflate 64 frames, deflate half, stats, migrate, report
    b = Builder(features=0x1F).initial([])
    b.pfns(0, list(range(0x100000, 0x100040))).chain(0, 0, [(0, 256, False)]).kick(0)
    b.pfns(1, list(range(0x100000, 0x100020))).chain(1, 0, [(1, 128, False)]).kick(1)
    b.stats(2, [(0, 1), (4, 1 << 20), (5, 1 << 30)]).chain(2, 0, [(2, 30, False)]).kick(2)
    b.migrate(3, [(0x100030, 40), (0x100031, 41)]).chain(4, 0, [(3, 32, False)]).kick(4)
    b.chain(3, 0, [(40, 4096, True), (41, 8192, True)]).kick(3)
    out.append(b.bytes())
    # indirect + event idx, no reporting
    b = Builder(features=0x1D, size_exp=4).initial([100, 101, 102])
    b.pfns(5, list(range(0x100000, 0x100040))).indirect(0, 3, 6, [(5, 128, False), (5, 128, False)])
    b.pfns(7, [100, 0x100000]).indirect(1, 0, 8, [(7, 8, False)])
    b.kick(0).kick(1).op(Opcode.KICK_ALL)
    out.append(b.bytes())
    # a reporting-only device with poison
    b = Builder(features=0x22).initial([30])
    b.chain(2, 0, [(10, 4096 * 4, True)]).kick(2).op(Opcode.STATS_TIMER).op(Opcode.RESTART, 0, 1).kick(0)
    out.append(b.bytes())
    return out
