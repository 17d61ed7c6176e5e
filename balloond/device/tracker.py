"""PfnTracker: exactly which guest page frames are in the balloon right now.

One bit per 4 KiB frame of guest RAM (32 KiB per GiB, the bound the design
asks for), kept per RAM range so holes in the guest-physical map (the VGA hole
below 1 MiB, the PCI hole below 4 GiB) cost nothing. Every update is O(1).

The bits are allocated lazily, one 4 KiB chunk (32768 frames, 128 MiB of
guest RAM) at a time, when a frame in it first enters the balloon: a
frontend that describes terabytes of sparse memory costs nothing until the
guest balloons there, and a new memory layout (every SET_MEM_TABLE) costs
time in proportion to the chunks in use, not to the size of guest RAM.

The tracker is the authority on what may be discarded: the device asks it
which frames of an inflate are newly ballooned, and discards only those. A
frame outside guest RAM, an inflate of a frame already in the balloon and a
deflate of a frame not in it are refused and counted; the caller logs them.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

#: Frames per bitmap chunk (4 KiB of bits).
CHUNK_FRAMES = 32768
CHUNK_BYTES = CHUNK_FRAMES // 8
_CHUNK_SHIFT = 15  # log2(CHUNK_FRAMES)
_BYTE_SHIFT = _CHUNK_SHIFT - 3  # byte offset -> chunk index


@dataclass
class TrackerCounters:
    inflated: int = 0  # frames that entered the balloon
    deflated: int = 0  # frames that left it
    migrations: int = 0  # frames whose membership moved (either detection path)
    invalid_pfn: int = 0  # outside guest RAM
    double_inflate: int = 0  # inflate of a frame already ballooned
    stray_deflate: int = 0  # deflate of a frame not ballooned
    bad_migration: int = 0  # migration whose old/new frames did not fit
    #: Split migrations (protocol/balloond_ext.h): frames that left the
    #: balloon ahead of their move, and departed frames put back after a
    #: failed one. An arrival counts as a migration.
    departures: int = 0
    returns: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class FrameBitmap:
    """`nbits` bits, stored as lazily allocated chunks; a missing chunk reads
    as zeros. Byte offsets (as in a flat bytearray) are the interface. The
    tracker keeps one per RAM range, the journal one over all frame numbers
    (`FrameSet`)."""

    __slots__ = ("nbits", "chunks")

    def __init__(self, nbits: int) -> None:
        self.nbits = nbits
        self.chunks: dict[int, bytearray] = {}

    def _chunk(self, index: int) -> bytearray:
        chunk = self.chunks.get(index)
        if chunk is None:
            size = min(CHUNK_BYTES, (self.nbits + 7) // 8 - index * CHUNK_BYTES)
            chunk = self.chunks[index] = bytearray(size)
        return chunk

    def get(self, off: int) -> bool:
        chunk = self.chunks.get(off >> _CHUNK_SHIFT)
        return chunk is not None and bool(chunk[(off >> 3) & (CHUNK_BYTES - 1)] & (1 << (off & 7)))

    def set(self, off: int) -> None:
        self._chunk(off >> _CHUNK_SHIFT)[(off >> 3) & (CHUNK_BYTES - 1)] |= 1 << (off & 7)

    def clear(self, off: int) -> None:
        chunk = self.chunks.get(off >> _CHUNK_SHIFT)
        if chunk is not None:
            chunk[(off >> 3) & (CHUNK_BYTES - 1)] &= ~(1 << (off & 7)) & 0xFF

    def _pieces(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """Bytes [start, end) as (chunk index, start, end) within each chunk."""
        while start < end:
            index = start >> _BYTE_SHIFT
            base = index * CHUNK_BYTES
            stop = min(end, base + CHUNK_BYTES)
            yield index, start - base, stop - base
            start = stop

    def fill_bytes(self, start: int, end: int, value: int) -> None:
        for index, a, b in self._pieces(start, end):
            if value == 0 and index not in self.chunks:
                continue
            self._chunk(index)[a:b] = bytes([value]) * (b - a)

    @staticmethod
    def _edges(start: int, end: int) -> tuple[int, int]:
        """[start, end) of bits → where its whole bytes begin and end (in
        bits); the bits before and after are the partial bytes at its edges."""
        head_end = min(end, (start + 7) & ~7)
        return head_end, max(head_end, end & ~7)

    def count_set(self, start: int, end: int) -> int:
        """Set bits in [start, end): whole bytes at C speed, edges bit by bit."""
        head_end, tail_start = self._edges(start, end)
        n = sum(self.get(off) for off in itertools.chain(range(start, head_end), range(tail_start, end)))
        for index, a, b in self._pieces(head_end >> 3, tail_start >> 3):
            chunk = self.chunks.get(index)
            if chunk is not None:
                n += int.from_bytes(chunk[a:b], "little").bit_count()
        return n

    def fill(self, start: int, end: int, value: bool) -> None:
        """Set (value) or clear every bit of [start, end)."""
        head_end, tail_start = self._edges(start, end)
        flip = self.set if value else self.clear
        for off in itertools.chain(range(start, head_end), range(tail_start, end)):
            flip(off)
        if head_end < tail_start:
            self.fill_bytes(head_end >> 3, tail_start >> 3, 0xFF if value else 0x00)

    def popcount(self) -> int:
        return sum(int.from_bytes(c, "little").bit_count() for c in self.chunks.values())

    def any(self) -> bool:
        return any(any(c) for c in self.chunks.values())

    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks.values())

    def iter_set(self) -> Iterator[int]:
        """Offsets of the set bits, ascending."""
        for index in sorted(self.chunks):
            bits = self.chunks[index]
            # Skip empty stretches 8 bytes at a time: the balloon is usually
            # sparse relative to RAM or made of long runs.
            n = len(bits)
            i = 0
            while i < n:
                if i + 8 <= n and not any(bits[i : i + 8]):
                    i += 8
                    continue
                b = bits[i]
                if b:
                    base = index * CHUNK_FRAMES + i * 8
                    for k in range(8):
                        if b & (1 << k):
                            yield base + k
                i += 1


@dataclass
class _Range:
    first: int
    count: int
    bits: FrameBitmap = field(repr=False)


class PfnTracker:
    """The set of ballooned frames over the guest's RAM ranges."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        """`ranges`: (first_pfn, page_count) of guest RAM, non-overlapping."""
        self._ranges: list[_Range] = []
        self._firsts: list[int] = []
        self.count = 0
        self.counters = TrackerCounters()
        # Stock-driver migration detection: a 1-frame inflate immediately
        # followed by a 1-frame deflate is how Linux reports a compaction move.
        self._single_inflate: int | None = None
        self._parked: dict[tuple[int, int], FrameBitmap] = {}
        self.resize(ranges)

    # ----------------------------------------------------------- layout

    def resize(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """Adopt a new RAM layout, keeping the bits of frames still in RAM.

        Returns the ballooned frames that fell outside the new layout (they
        are dropped from the balloon).
        """
        old = self._ranges
        new = [_Range(first, count, FrameBitmap(count)) for first, count in sorted(ranges) if count > 0]
        for a, b in zip(new, new[1:]):
            if a.first + a.count > b.first:
                raise ValueError("guest RAM ranges overlap")
        self._ranges = new
        self._firsts = [r.first for r in new]
        self.count = 0
        dropped = []
        for r in old:
            same = next((n for n in new if (n.first, n.count) == (r.first, r.count)), None)
            if same is not None:
                same.bits = r.bits  # taken over whole: no copy, no scan
                self.count += r.bits.popcount()
                continue
            for pfn in _iter_bits(r):
                if self._locate(pfn) is not None:
                    self._set(pfn)
                else:
                    dropped.append(pfn)
        # A range that leaves and comes back unchanged (the frontend re-sends
        # a memory slot: REM_MEM_REG, then ADD_MEM_REG) keeps its frames.
        for r in new:
            parked = self._parked.pop((r.first, r.count), None)
            if parked is not None and not r.bits.any():
                r.bits = parked
                self.count += parked.popcount()
        for r in old:
            if not any((n.first, n.count) == (r.first, r.count) for n in new) and r.bits.any():
                self._parked[(r.first, r.count)] = r.bits
        return dropped

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(r.first, r.count) for r in self._ranges]

    @property
    def ram_pages(self) -> int:
        return sum(r.count for r in self._ranges)

    def bitmap_bytes(self) -> int:
        """Bytes of bitmap allocated (chunks in use; parked ranges included)."""
        return sum(r.bits.nbytes() for r in self._ranges) + sum(b.nbytes() for b in self._parked.values())

    def _locate(self, pfn: int) -> tuple[_Range, int] | None:
        i = bisect.bisect_right(self._firsts, pfn) - 1
        if i < 0:
            return None
        r = self._ranges[i]
        off = pfn - r.first
        if off >= r.count:
            return None
        return r, off

    def _set(self, pfn: int) -> None:
        r, off = self._locate(pfn)  # type: ignore[misc]
        r.bits.set(off)
        self.count += 1

    # ----------------------------------------------------------- queries

    def in_ram(self, pfn: int) -> bool:
        return self._locate(pfn) is not None

    def __contains__(self, pfn: int) -> bool:
        hit = self._locate(pfn)
        if hit is None:
            return False
        r, off = hit
        return r.bits.get(off)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        for r in self._ranges:
            yield from _iter_bits(r)

    def runs(self) -> list[tuple[int, int]]:
        """The ballooned frames as (first_pfn, count) runs, ascending.

        Whole bytes of 0xFF are taken eight frames at a time and empty
        stretches skipped by the regex engine: a migrating VM's state is
        built from this while the VM is stopped (docs/migration.md), and a
        frame-by-frame walk took 26 ms for a 384 MiB balloon."""
        out: list[tuple[int, int]] = []

        def add(first: int, count: int) -> None:
            if out and out[-1][0] + out[-1][1] == first:
                out[-1] = (out[-1][0], out[-1][1] + count)
            else:
                out.append((first, count))

        for r in self._ranges:
            for index in sorted(r.bits.chunks):
                chunk = r.bits.chunks[index]
                base = r.first + index * CHUNK_FRAMES
                for span in _NONZERO.finditer(chunk):
                    i, end = span.start(), span.end()
                    while i < end:
                        full = _FULL.match(chunk, i, end)
                        if full is not None:
                            add(base + 8 * i, 8 * (full.end() - i))
                            i = full.end()
                            continue
                        b = chunk[i]
                        for k in range(8):
                            if b & (1 << k):
                                add(base + 8 * i + k, 1)
                        i += 1
        return out

    def covers(self, first: int, end: int) -> bool:
        """Whether every frame of [first, end) is ballooned (an empty span is).

        Whole bytes of the bitmap are counted at C speed, so asking about a
        long stretch (the releaser bridging two runs over frames ballooned
        earlier) costs far less than a membership test per frame. A span
        leaving its RAM range is not covered: frames outside RAM never are.
        """
        if end <= first:
            return True
        hit = self._locate(first)
        if hit is None:
            return False
        r, off = hit
        stop = off + (end - first)
        if stop > r.count:
            return False
        return r.bits.count_set(off, stop) == stop - off

    def count_in(self, first: int, count: int) -> int:
        """How many frames of [first, first+count) are ballooned."""
        n = 0
        for pfn in range(first, first + count):
            if pfn in self:
                n += 1
        return n

    # ----------------------------------------------------------- updates

    def _fast_runs(self, pfns: list[int]) -> list[tuple[_Range, int, int]] | None:
        """`pfns` as a few (range, first offset, count) runs (`runs_of`),
        updated a byte at a time but for the partial bytes at each run's
        edges. None for scattered frames, duplicates or frames outside RAM
        (the per-frame path counts those)."""
        runs = runs_of(pfns)
        if runs is None:
            return None
        out = []
        for first, count in runs:
            hit = self._locate(first)
            if hit is None:
                return None
            r, off = hit
            if off + count > r.count:
                return None
            out.append((r, off, count))
        return out

    def inflate(self, pfns: Iterable[int]) -> list[int]:
        """Add frames; return those newly ballooned (the ones to discard)."""
        pfns = list(pfns)
        added = self._update(pfns, entering=True)
        self.counters.inflated += len(added)
        self._single_inflate = added[0] if len(pfns) == 1 and len(added) == 1 else None
        return added

    def deflate(self, pfns: Iterable[int]) -> list[int]:
        """Remove frames; return those that were ballooned."""
        pfns = list(pfns)
        removed = self._update(pfns, entering=False)
        self.counters.deflated += len(removed)
        if self._single_inflate is not None and len(pfns) == 1 and len(removed) == 1:
            self.counters.migrations += 1
        self._single_inflate = None
        return removed

    def _update(self, pfns: list[int], *, entering: bool) -> list[int]:
        """Set (entering) or clear frames; return those that changed, counting
        the ones outside RAM and the ones already in (or not in) the balloon."""
        runs = self._fast_runs(pfns)
        # The fast path only when every frame changes: none ballooned yet
        # (entering), or all of them (leaving); otherwise the per-frame path
        # finds and counts the ones that do not.
        if runs is not None and all(
            r.bits.count_set(o, o + c) == (0 if entering else c) for r, o, c in runs
        ):
            for r, o, c in runs:
                r.bits.fill(o, o + c, entering)
            self.count += len(pfns) if entering else -len(pfns)
            return pfns
        changed = self._enter(pfns) if entering else self._leave(pfns)
        self.count += len(changed) if entering else -len(changed)
        return changed

    # The two loops below are the cost of every buffer of scattered frames
    # (a stock driver's, one frame at a time from the page allocator): the
    # bit is tested and flipped in its chunk directly, and the range found
    # by bisection is kept for the next frame, which is nearly always in it.

    def _enter(self, pfns: list[int]) -> list[int]:
        changed: list[int] = []
        keep = changed.append
        invalid = repeated = 0
        first = span = 0
        bits: FrameBitmap | None = None
        chunks: dict[int, bytearray] = {}
        for pfn in pfns:
            off = pfn - first
            if not 0 <= off < span:
                hit = self._locate(pfn)
                if hit is None:
                    invalid += 1
                    continue
                r, off = hit
                first, span, bits = r.first, r.count, r.bits
                chunks = bits.chunks
            index = off >> _CHUNK_SHIFT
            chunk = chunks.get(index)
            if chunk is None:
                assert bits is not None
                chunk = bits._chunk(index)
            byte = (off >> 3) & (CHUNK_BYTES - 1)
            mask = 1 << (off & 7)
            if chunk[byte] & mask:
                repeated += 1
                continue
            chunk[byte] |= mask
            keep(pfn)
        self.counters.invalid_pfn += invalid
        self.counters.double_inflate += repeated
        return changed

    def _leave(self, pfns: list[int]) -> list[int]:
        changed: list[int] = []
        keep = changed.append
        invalid = repeated = 0
        first = span = 0
        chunks: dict[int, bytearray] = {}
        for pfn in pfns:
            off = pfn - first
            if not 0 <= off < span:
                hit = self._locate(pfn)
                if hit is None:
                    invalid += 1
                    continue
                r, off = hit
                first, span, chunks = r.first, r.count, r.bits.chunks
            chunk = chunks.get(off >> _CHUNK_SHIFT)
            byte = (off >> 3) & (CHUNK_BYTES - 1)
            mask = 1 << (off & 7)
            if chunk is None or not chunk[byte] & mask:
                repeated += 1
                continue
            chunk[byte] ^= mask
            keep(pfn)
        self.counters.invalid_pfn += invalid
        self.counters.stray_deflate += repeated
        return changed

    def migrate(self, old_pfn: int, new_pfn: int) -> bool:
        """Move membership from old_pfn to new_pfn atomically.

        Refused (and counted) unless old is ballooned and new is guest RAM
        that is not.
        """
        old_hit, new_hit = self._locate(old_pfn), self._locate(new_pfn)
        if old_hit is None or new_hit is None:
            self.counters.bad_migration += 1
            return False
        (ro, oo), (rn, on) = old_hit, new_hit
        if not ro.bits.get(oo) or rn.bits.get(on):
            self.counters.bad_migration += 1
            return False
        ro.bits.clear(oo)
        rn.bits.set(on)
        self.counters.migrations += 1
        self._single_inflate = None
        return True

    def depart(self, pfn: int) -> bool:
        """Half of a split migration: a ballooned frame leaves ahead of its
        move. Refused (counted as a bad migration) unless it is ballooned."""
        hit = self._locate(pfn)
        if hit is None or not hit[0].bits.get(hit[1]):
            self.counters.bad_migration += 1
            return False
        hit[0].bits.clear(hit[1])
        self.count -= 1
        self.counters.departures += 1
        self._single_inflate = None
        return True

    def arrive(self, pfn: int, *, moved: bool) -> bool:
        """The other half: a frame of RAM not ballooned enters, as the
        destination of a move (`moved`, counted as a migration) or as a
        departed frame put back. Refused (counted) otherwise."""
        hit = self._locate(pfn)
        if hit is None or hit[0].bits.get(hit[1]):
            self.counters.bad_migration += 1
            return False
        hit[0].bits.set(hit[1])
        self.count += 1
        if moved:
            self.counters.migrations += 1
        else:
            self.counters.returns += 1
        self._single_inflate = None
        return True

    def clear(self) -> int:
        """Empty the balloon (the driver was reset); return how many frames it held."""
        self._parked.clear()
        held = self.count
        for r in self._ranges:
            r.bits = FrameBitmap(r.count)
        self.count = 0
        self._single_inflate = None
        return held


def runs_of(pfns: list[int]) -> list[tuple[int, int]] | None:
    """`pfns` as (first, count) runs, ascending, if they are a few: the
    common shape of a driver's buffer (the page allocator hands out
    neighbouring frames: Linux's stock driver fills nearly every 256-frame
    buffer with one run). None for fewer than 64 frames, for more than one
    run per 16 frames, and for a frame given twice."""
    if len(pfns) < 64:
        return None
    ordered = sorted(pfns)
    runs: list[tuple[int, int]] = []
    start = prev = ordered[0]
    limit = len(pfns) // 16
    for pfn in ordered[1:]:
        if pfn != prev + 1:
            if pfn == prev or len(runs) >= limit:
                return None
            runs.append((start, prev - start + 1))
            start = pfn
        prev = pfn
    runs.append((start, prev - start + 1))
    return runs


_NONZERO = re.compile(rb"[^\x00]+")
_FULL = re.compile(rb"\xff+")


def _iter_bits(r: _Range) -> Iterator[int]:
    for off in r.bits.iter_set():
        yield r.first + off
