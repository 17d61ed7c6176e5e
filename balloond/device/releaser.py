"""MemoryReleaser: give the host memory behind guest frames back to the kernel.

Guest RAM is a shared memfd (or hugetlbfs file), mapped by QEMU and by us.
MADV_DONTNEED on a shared mapping only drops our page-table entries, the
memory stays in the file; punching a hole in the file (fallocate with
PUNCH_HOLE|KEEP_SIZE) is what frees it, for every mapper at once. Contiguous
frames are coalesced so a long run costs one system call.

On hugetlbfs a punch smaller than a huge page succeeds and frees nothing, so
frames are counted per huge page and the whole huge page is punched only
when every 4 KiB frame in it is ballooned (or, for free page reporting, when
a reported range covers it whole).

What was freed is measured, not computed: the allocated size of the files
(st_blocks) is read before and after each batch.

Two ways to discard, one set of rules: the pure engine holds each region's
fd and punches holes in it; libvhost-user closes the region fds once it has
mapped them, so for memory it mapped (a region with an `address`) the same
coalesced, huge-page-aware spans are discarded with MADV_REMOVE on its
mapping, which frees the file's pages for every mapper just the same. The
engine keeps a duplicate of each fd only to measure (fstat) and to identify
the file.

Data safety: each call here is synchronous: when it returns, the holes are
punched. *When* it is called is the device's business (BalloonDevice._release):
with MUST_TELL_HOST the device may hold inflated frames back for a short while
to coalesce them, and a deflate removes its frames from that pending set
before it is acknowledged, so a deflated page is never discarded; without
MUST_TELL_HOST the device calls here before it returns the inflate buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol.balloon import PAGE_SIZE, PFN_SHIFT

if TYPE_CHECKING:
    from ..engine.device_api import RamRegion

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

#: The longest stretch of already-ballooned frames bridged between two runs (frames).
MAX_BRIDGED_GAP = 1 << 16

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int


_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int


def remove_mapped(address: int, length: int) -> None:
    """MADV_REMOVE [address, address+length) of a shared file mapping: frees
    the file's pages behind it (a hole, as punch_hole makes)."""
    if _madvise(address, length, mmap.MADV_REMOVE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset+length) of a file, keeping its size."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def allocated_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def coalesce(pfns: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, de-duplicated frames → (first_pfn, count) runs."""
    runs: list[tuple[int, int]] = []
    first = prev = -2
    for pfn in sorted(set(pfns)):
        if pfn == prev + 1:
            prev = pfn
            continue
        if first >= 0:
            runs.append((first, prev - first + 1))
        first = prev = pfn
    if first >= 0:
        runs.append((first, prev - first + 1))
    return runs


class ReleasableRegion:
    """What the releaser needs to know about one guest RAM region.

    With `address` (where `gpa` is mapped in this process, by a library that
    closed its fd) spans are discarded by MADV_REMOVE there, and `fd` (a
    duplicate kept by the engine) only measures."""

    def __init__(self, gpa: int, size: int, fd: int, file_offset: int, mapping: mmap.mmap | None, map_offset: int,
                 *, address: int | None = None):
        self.address = address
        self.gpa = gpa
        self.size = size
        self.fd = fd
        self.file_offset = file_offset  # file offset of gpa
        self.mapping = mapping  # for the MADV_REMOVE fallback
        self.map_offset = map_offset  # offset of gpa in `mapping`
        st = os.fstat(fd)
        self.file_key = (st.st_dev, st.st_ino)
        # hugetlbfs reports its page size as the block size; tmpfs/memfd 4 KiB.
        self.page_size = max(PAGE_SIZE, st.st_blksize)
        self.frames_per_page = self.page_size // PAGE_SIZE
        self.first_pfn = gpa >> PFN_SHIFT
        self.pages = size >> PFN_SHIFT
        # Per huge page: ballooned 4 KiB frames in it. Only for hugetlb.
        self.huge_fill: list[int] | None = None
        if self.frames_per_page > 1:
            self.huge_fill = [0] * ((size + self.page_size - 1) // self.page_size)
        self.punch_supported = address is None

    @property
    def hugetlb(self) -> bool:
        return self.frames_per_page > 1

    def contains_pfn(self, pfn: int) -> bool:
        return self.first_pfn <= pfn < self.first_pfn + self.pages


def releasable_region(region: RamRegion) -> ReleasableRegion:
    """The releaser's view of an engine's region: punched through its fd
    (the pure engine's `MappedRegion`, with its mmap as the fallback), or
    discarded on the library's mapping (a region with an `address`)."""
    address: int | None = getattr(region, "address", None)
    if address is not None:
        return ReleasableRegion(region.gpa, region.size, region.fd, region.file_offset, None, 0, address=address)
    mapping: mmap.mmap | None = getattr(region, "mapping", None)
    return ReleasableRegion(region.gpa, region.size, region.fd, region.file_offset, mapping, region.file_offset)


@dataclass
class ReleaseResult:
    requested_bytes: int = 0  # bytes asked to be discarded (after huge-page rounding)
    freed_bytes: int = 0  # measured drop in allocated size
    calls: int = 0  # discard system calls made
    errors: int = 0


class MemoryReleaser:
    """Discards guest frames on the files that back guest RAM."""

    def __init__(self, regions: list[ReleasableRegion]) -> None:
        self.regions = sorted(regions, key=lambda r: r.gpa)
        #: Only huge pages count frames; on 4 KiB memory a returned frame needs no bookkeeping.
        self.has_hugetlb = any(r.hugetlb for r in self.regions)
        self.total_freed = 0
        self.total_calls = 0
        self.errors = 0
        self.last_error: str | None = None

    def _region_for(self, pfn: int) -> ReleasableRegion | None:
        for r in self.regions:
            if r.contains_pfn(pfn):
                return r
        return None

    def allocated_bytes(self) -> int:
        """Host memory currently allocated to guest RAM (each file counted once)."""
        seen: dict[tuple[int, int], int] = {}
        for r in self.regions:
            if r.file_key not in seen:
                seen[r.file_key] = allocated_bytes(r.fd)
        return sum(seen.values())

    # ----------------------------------------------------------- balloon

    def release_frames(
        self, pfns: Iterable[int], ballooned: Callable[[int, int], bool] | None = None
    ) -> ReleaseResult:
        """Discard newly ballooned frames (already validated by the tracker).

        With `ballooned(first, end)` (whether every frame of [first, end) is
        in the balloon), two runs are punched as
        one when every frame between them is already in the balloon: punching
        a frame the guest gave away twice is harmless, and a scattered inflate
        into a mostly ballooned range then costs one call instead of hundreds.
        """
        runs = coalesce(pfns)
        if ballooned is not None:
            runs = self._bridge(runs, ballooned)
        spans: list[tuple[ReleasableRegion, int, int]] = []  # region, gpa offset, length
        for first, count in runs:
            spans.extend(self._split(first, count, entering=True))
        return self._discard(spans)

    def _bridge(self, runs: list[tuple[int, int]], ballooned: Callable[[int, int], bool]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        region: ReleasableRegion | None = None
        for first, count in runs:
            if out:
                prev_first, prev_count = out[-1]
                gap_start = prev_first + prev_count
                gap = first - gap_start
                if region is None or not region.contains_pfn(prev_first):
                    region = self._region_for(prev_first)  # runs ascend: usually the last one's
                if (
                    gap <= MAX_BRIDGED_GAP
                    and region is not None
                    and not region.hugetlb  # huge pages count their frames one by one
                    and region.contains_pfn(first + count - 1)
                    and ballooned(gap_start, first)
                ):
                    out[-1] = (prev_first, first + count - prev_first)
                    continue
            out.append((first, count))
        return out

    def frames_returned(self, pfns: Iterable[int]) -> None:
        """Frames left the balloon: forget them in the huge-page fill counts."""
        for pfn in pfns:
            r = self._region_for(pfn)
            if r is not None and r.huge_fill is not None:
                idx = ((pfn - r.first_pfn) << PFN_SHIFT) // r.page_size
                if r.huge_fill[idx] > 0:
                    r.huge_fill[idx] -= 1

    def _split(self, first: int, count: int, entering: bool) -> list[tuple[ReleasableRegion, int, int]]:
        """A run of frames → discardable spans per region (huge-page aware)."""
        out = []
        pfn, end = first, first + count
        while pfn < end:
            r = self._region_for(pfn)
            if r is None:
                pfn += 1
                continue
            stop = min(end, r.first_pfn + r.pages)
            if r.huge_fill is None:
                out.append((r, (pfn - r.first_pfn) << PFN_SHIFT, (stop - pfn) << PFN_SHIFT))
            else:
                # Count frames per huge page; emit pages that just became full.
                off = (pfn - r.first_pfn) << PFN_SHIFT
                stop_off = (stop - r.first_pfn) << PFN_SHIFT
                while off < stop_off:
                    idx = off // r.page_size
                    page_end = min((idx + 1) * r.page_size, stop_off)
                    frames = (page_end - off) >> PFN_SHIFT
                    r.huge_fill[idx] += frames
                    if r.huge_fill[idx] >= r.frames_per_page:
                        r.huge_fill[idx] = r.frames_per_page
                        page_off = idx * r.page_size
                        if page_off + r.page_size <= r.size:
                            out.append((r, page_off, r.page_size))
                    off = page_end
            pfn = stop
        return out

    # ---------------------------------------------------------- reporting

    def release_free_range(self, gpa: int, length: int) -> ReleaseResult:
        """Discard a range the guest reported free (not ballooned).

        On hugetlbfs only the huge pages the range covers whole are punched.
        """
        spans = []
        end = gpa + length
        for r in self.regions:
            lo, hi = max(gpa, r.gpa), min(end, r.gpa + r.size)
            if lo >= hi:
                continue
            off, stop = lo - r.gpa, hi - r.gpa
            if r.hugetlb:
                off = -(-off // r.page_size) * r.page_size
                stop = stop // r.page_size * r.page_size
            else:
                off = -(-off // PAGE_SIZE) * PAGE_SIZE
                stop = stop // PAGE_SIZE * PAGE_SIZE
            if off < stop:
                spans.append((r, off, stop - off))
        return self._discard(spans)

    # ------------------------------------------------------------ doing it

    def _discard(self, spans: list[tuple[ReleasableRegion, int, int]]) -> ReleaseResult:
        result = ReleaseResult()
        if not spans:
            return result
        # Merge spans adjacent in the same file (huge pages emitted one by one).
        spans.sort(key=lambda s: (id(s[0]), s[1]))
        merged: list[list] = []
        for r, off, length in spans:
            if merged and merged[-1][0] is r and merged[-1][1] + merged[-1][2] == off:
                merged[-1][2] += length
            else:
                merged.append([r, off, length])
        before = self.allocated_bytes()
        for r, off, length in merged:
            result.requested_bytes += length
            result.calls += 1
            try:
                self._discard_span(r, off, length)
            except OSError as exc:
                result.errors += 1
                self.errors += 1
                self.last_error = f"discard of {length} bytes at gpa {r.gpa + off:#x} failed: {exc}"
        result.freed_bytes = max(0, before - self.allocated_bytes())
        self.total_freed += result.freed_bytes
        self.total_calls += result.calls
        return result

    def _discard_span(self, r: ReleasableRegion, off: int, length: int) -> None:
        if r.punch_supported:
            try:
                punch_hole(r.fd, r.file_offset + off, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                r.punch_supported = False
        if r.address is not None:
            remove_mapped(r.address + off, length)
            return
        if r.mapping is None:
            raise OSError(errno.EOPNOTSUPP, "no punch-hole support and no mapping for MADV_REMOVE")
        r.mapping.madvise(mmap.MADV_REMOVE, r.map_offset + off, length)
