"""LibraryMemory: guest RAM as libvhost-user mapped it, seen as `GuestRam`.

The library maps each region itself (MAP_SHARED, from the fd QEMU sent)
and closes the fd. The engine keeps a duplicate of each fd, taken before
the library handles the message, only to identify the file (the journal's
guest identity) and to measure its allocated size; discards go through the
library's mapping (MADV_REMOVE, see balloond.device.releaser).

Translation is bounds-checked like `GuestMemory`'s: an address outside
every region, or a range that crosses a region's end, is a GuestAddressError.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

from protocol.errors import GuestAddressError


@dataclass
class LibraryRegion:
    gpa: int
    size: int
    #: The engine's duplicate of the region's fd (see the module docstring).
    fd: int
    #: Offset of `gpa` in that file (the frontend's mmap_offset).
    file_offset: int
    #: Where `gpa` is mapped in this process (the library's mmap_addr + mmap_offset).
    address: int
    view: memoryview = field(repr=False)


class LibraryMemory:
    """The regions of one connection, as the library has them now."""

    def __init__(self, regions: list[LibraryRegion]) -> None:
        self.regions = sorted(regions, key=lambda r: r.gpa)

    @staticmethod
    def region(gpa: int, size: int, fd: int, file_offset: int, address: int) -> LibraryRegion:
        view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
        return LibraryRegion(gpa, size, fd, file_offset, address, view)

    def view(self, gpa: int, length: int) -> memoryview:
        """Writable view of guest-physical [gpa, gpa+length)."""
        for r in self.regions:
            if r.gpa <= gpa < r.gpa + r.size:
                off = gpa - r.gpa
                if length < 0 or off + length > r.size:
                    raise GuestAddressError(f"guest range {gpa:#x}+{length:#x} crosses the end of its RAM region")
                return r.view[off : off + length]
        raise GuestAddressError(f"guest-physical address {gpa:#x} is outside guest RAM")

    def gpa_of(self, address: int, length: int) -> int:
        """The guest-physical address of [address, address+length) in the
        library's mappings (an element's iovec)."""
        for r in self.regions:
            if r.address <= address < r.address + r.size:
                off = address - r.address
                if off + length > r.size:
                    raise GuestAddressError(f"buffer {address:#x}+{length:#x} crosses the end of its RAM region")
                return r.gpa + off
        raise GuestAddressError(f"buffer at {address:#x} is in no RAM region")

    def ram_ranges(self, page_shift: int = 12) -> list[tuple[int, int]]:
        return [(r.gpa >> page_shift, r.size >> page_shift) for r in self.regions]

    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self.regions)

    def release(self) -> None:
        """Drop the views (before the library unmaps)."""
        for r in self.regions:
            r.view.release()
        self.regions = []
