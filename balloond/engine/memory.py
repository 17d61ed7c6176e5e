"""GuestMemory: the guest's RAM regions, mapped shared, and address translation.

The frontend describes each region three ways: its guest-physical address
(used in descriptors), its address in the frontend's own process (used in
SET_VRING_ADDR) and its offset in the fd it passes. Every translation is
bounds-checked against the region it lands in; an address that falls outside
every region, or a range that crosses a region's end, is a GuestAddressError.

Each region is mapped from file offset 0 up to mmap_offset + size, so the
mapping's offset is always aligned whatever the backing page size (hugetlbfs
needs 2 MiB alignment, which an mmap_offset like 0xc0000 would break).

Two things a hostile frontend could do with the fds it sends are closed here:
a table far larger than any guest (terabytes of sparse memfd, costing the
tracker's bitmap and every rescan) is refused above `max_bytes`; and each
region's file is sealed against shrinking (F_SEAL_SHRINK) before it is
mapped, so a later ftruncate by the frontend fails with EPERM instead of
turning our next access to a vanished page into SIGBUS. QEMU's memfd
backend seals its files itself (grow, shrink, seal: the shrink seal is then
already there); a file that cannot be sealed (a regular file, a memfd made
without MFD_ALLOW_SEALING) is mapped as before and counted in `unsealed`.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from dataclasses import dataclass, field

from protocol.errors import FrontendError, GuestAddressError
from protocol.vhost_user import MemoryRegion


@dataclass
class MappedRegion:
    region: MemoryRegion
    fd: int
    mapping: mmap.mmap = field(repr=False)
    view: memoryview = field(repr=False)  # exactly the region's bytes

    @property
    def gpa(self) -> int:
        return self.region.guest_phys_addr

    @property
    def size(self) -> int:
        return self.region.size

    @property
    def uaddr(self) -> int:
        return self.region.userspace_addr

    @property
    def file_offset(self) -> int:
        return self.region.mmap_offset


#: Default cap on a connection's guest RAM (bytes): more than any guest
#: this daemon serves, and what bounds the tracker's and the releaser's work.
DEFAULT_MAX_GUEST_RAM = 1 << 40


def seal_against_shrinking(fd: int) -> bool:
    """Make ftruncate() to a smaller size fail on `fd`'s file; False if the
    file does not allow it (not a memfd, or made without sealing)."""
    try:
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            return True
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EINVAL, errno.EBUSY):
            return False
        raise
    return True


def check_region_file(fd: int, mmap_offset: int, size: int) -> bool:
    """Seal a region's file against shrinking, then check that the region
    [mmap_offset, mmap_offset+size) lies within it: an access past the end of
    a mapped file is SIGBUS. Sealed first, so that the size seen can only
    grow. Returns whether the seal took; FrontendError if the region must not
    be mapped."""
    try:
        sealed = seal_against_shrinking(fd)
        file_size = os.fstat(fd).st_size
    except OSError as exc:
        raise FrontendError(f"memory region fd unusable: {exc}") from None
    end = mmap_offset + size
    if file_size and end > file_size:
        raise FrontendError(f"memory region [{mmap_offset:#x}, {end:#x}) lies beyond its fd's size {file_size:#x}")
    return sealed


class GuestMemory:
    """The set of mapped guest RAM regions of one connection."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_GUEST_RAM) -> None:
        self.regions: list[MappedRegion] = []
        self.max_bytes = max_bytes
        #: Regions whose file could not be sealed against shrinking.
        self.unsealed = 0

    def check_total(self, extra: int) -> None:
        """Refuse a table that would take guest RAM beyond `max_bytes`."""
        total = self.total_bytes + extra
        if total > self.max_bytes:
            raise FrontendError(
                f"guest RAM of {total:#x} bytes exceeds the cap of {self.max_bytes:#x} (--max-guest-ram)"
            )

    # ------------------------------------------------------------ building

    def add(self, region: MemoryRegion, fd: int) -> MappedRegion:
        """Map a region; takes ownership of `fd` (closed on failure too)."""
        try:
            for other in self.regions:
                if region.guest_phys_addr < other.gpa + other.size and other.gpa < region.guest_phys_addr + region.size:
                    raise FrontendError("memory region overlaps an existing region")
            self.check_total(region.size)
            if not check_region_file(fd, region.mmap_offset, region.size):
                self.unsealed += 1
            end = region.mmap_offset + region.size
            try:
                mapping = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, OverflowError) as exc:
                raise FrontendError(f"cannot map memory region of {region.size:#x} bytes: {exc}") from None
        except BaseException:
            os.close(fd)
            raise
        view = memoryview(mapping)[region.mmap_offset : end]
        mapped = MappedRegion(region, fd, mapping, view)
        self.regions.append(mapped)
        self.regions.sort(key=lambda r: r.gpa)
        return mapped

    def remove(self, region: MemoryRegion) -> bool:
        """Unmap the region matching `region` (by gpa, size and uaddr)."""
        for mapped in self.regions:
            r = mapped.region
            if (r.guest_phys_addr, r.size, r.userspace_addr) == (
                region.guest_phys_addr,
                region.size,
                region.userspace_addr,
            ):
                self.regions.remove(mapped)
                _unmap(mapped)
                return True
        return False

    def close(self) -> None:
        regions, self.regions = self.regions, []
        for mapped in regions:
            _unmap(mapped)

    # --------------------------------------------------------- translation

    def _find_gpa(self, gpa: int, length: int) -> tuple[MappedRegion, int]:
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                off = gpa - r.gpa
                if length < 0 or off + length > r.size:
                    raise GuestAddressError(f"guest range {gpa:#x}+{length:#x} crosses the end of its RAM region")
                return r, off
        raise GuestAddressError(f"guest-physical address {gpa:#x} is outside guest RAM")

    def view(self, gpa: int, length: int) -> memoryview:
        """Writable view of guest-physical [gpa, gpa+length)."""
        r, off = self._find_gpa(gpa, length)
        return r.view[off : off + length]

    def view_uaddr(self, uaddr: int, length: int) -> memoryview:
        """Writable view of a range given as a frontend virtual address."""
        for r in self.regions:
            if r.uaddr <= uaddr < r.uaddr + r.size:
                off = uaddr - r.uaddr
                if off + length > r.size:
                    raise GuestAddressError(f"frontend range {uaddr:#x}+{length:#x} crosses the end of its region")
                return r.view[off : off + length]
        raise GuestAddressError(f"frontend address {uaddr:#x} is in no memory region")

    def ram_ranges(self, page_shift: int = 12) -> list[tuple[int, int]]:
        """Guest RAM as (first_pfn, page_count) ranges."""
        return [(r.gpa >> page_shift, r.size >> page_shift) for r in self.regions]

    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self.regions)


def _unmap(mapped: MappedRegion) -> None:
    try:
        mapped.view.release()
        mapped.mapping.close()
    except BufferError:
        # A ring view still references the mapping; it is unmapped when the
        # last view goes away. The fd can be closed now either way.
        pass
    os.close(mapped.fd)
