"""DirtyLog: the shared log in which the backend marks the guest pages it writes.

While QEMU migrates a VM it copies guest RAM in passes and copies again the
pages written since; it sees its own and the guest's writes, not ours. So it
turns VHOST_F_LOG_ALL on (SET_FEATURES), hands over a log (SET_LOG_BASE with
a memfd, VHOST_USER_PROTOCOL_F_LOG_SHMFD) and asks each ring to log its used
ring (SET_VRING_ADDR with VRING_ADDR_F_LOG and the used ring's guest-physical
address). A write QEMU does not hear of reaches the destination stale: a used
element the driver never sees is a buffer it waits for for ever.

The log is a bitmap, one bit per 4 KiB of guest-physical address space: bit
`page % 8` of byte `page // 8`. QEMU harvests it with an atomic exchange of
each 64-bit word, and other vhost devices of the same VM share the same log,
so a bit must be set with an atomic OR: a plain read-modify-write could put
back a word another writer changed meanwhile and lose its bit. Python has no
atomic OR on shared memory, but the kernel does one for us: FUTEX_WAKE_OP
with FUTEX_OP_OR applies `*word |= 1 << bit` atomically to any aligned
32-bit word of our mapping (it wakes nobody: no one waits there). A bit found
set already is left alone: QEMU has not harvested it yet, and it copies the
page after it does, so our write, which came before the look, goes along.

The frontend is not trusted: a log larger than any guest needs is refused,
and the memfd must be sealed against shrinking (QEMU's is: it seals grow,
shrink and seal) or an ftruncate would turn our next mark into SIGBUS.
Marks beyond the log's end are counted and dropped (QEMU sizes the log for
the guest's highest address, so only a hostile frontend gets there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os

from protocol.errors import FrontendError

#: One log bit covers this many bytes of guest-physical space (VHOST_LOG_PAGE).
LOG_PAGE = 0x1000

#: The largest log accepted (bytes): covers 2 TiB of guest-physical space.
MAX_LOG_BYTES = 64 << 20

_SYS_FUTEX = 202  # x86-64, the only architecture the daemon supports
_FUTEX_WAKE_OP = 5
_FUTEX_OP_OR = 2
_FUTEX_OP_OPARG_SHIFT = 8  # oparg is a shift: the operand is 1 << oparg
_FUTEX_OP_CMP_EQ = 0

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def check_log_file(fd: int, size: int, offset: int) -> None:
    """What a log must be before it is mapped: 1 byte to MAX_LOG_BYTES,
    page-aligned, within its file, and that file sealed against shrinking
    (sealed here if it is not yet). Raises FrontendError; `fd` stays the
    caller's."""
    if not 0 < size <= MAX_LOG_BYTES:
        raise FrontendError(f"dirty log of {size:#x} bytes (1 to {MAX_LOG_BYTES:#x} accepted)")
    if offset % mmap.ALLOCATIONGRANULARITY:
        raise FrontendError(f"dirty log offset {offset:#x} is not page-aligned")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not seals & fcntl.F_SEAL_SHRINK:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        file_size = os.fstat(fd).st_size
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EINVAL, errno.EBUSY):
            raise FrontendError("dirty log file cannot be sealed against shrinking") from None
        raise FrontendError(f"dirty log fd unusable: {exc}") from None
    if offset + size > file_size:
        raise FrontendError(f"dirty log [{offset:#x}, {offset + size:#x}) lies beyond its file ({file_size:#x})")


def _futex_or_bit(address: int, bit: int) -> None:
    """Atomically `*(u32 *)address |= 1 << bit` (FUTEX_WAKE_OP, waking nobody)."""
    op = ((_FUTEX_OP_OR | _FUTEX_OP_OPARG_SHIFT) << 28) | (_FUTEX_OP_CMP_EQ << 24) | (bit << 12)
    ret = _libc.syscall(
        ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(address), ctypes.c_int(_FUTEX_WAKE_OP), ctypes.c_int(0),
        ctypes.c_void_p(0), ctypes.c_void_p(address), ctypes.c_int(op),
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class DirtyLog:
    """One mapped log; `mark` sets the bits of a guest-physical range."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        """Map `size` bytes of `fd` from `offset`; takes ownership of `fd`
        (closed here, mapped or not). Raises FrontendError for a log that
        is empty, too large, beyond its file or cannot be sealed."""
        try:
            check_log_file(fd, size, offset)
            try:
                self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
            except (OSError, ValueError, OverflowError) as exc:
                raise FrontendError(f"cannot map the dirty log: {exc}") from None
        finally:
            os.close(fd)
        self.size = size
        self._anchor = ctypes.c_char.from_buffer(self._map)
        self._base = ctypes.addressof(self._anchor)
        #: Pages marked (bits newly set) and marks that fell beyond the log.
        self.pages_marked = 0
        self.beyond = 0

    def mark(self, gpa: int, length: int) -> None:
        """Log a write to guest-physical [gpa, gpa + length)."""
        if length <= 0:
            return
        first = gpa // LOG_PAGE
        last = (gpa + length - 1) // LOG_PAGE
        data = self._map
        for page in range(first, last + 1):
            byte = page >> 3
            if byte >= self.size:
                self.beyond += 1
                continue
            if data[byte] & (1 << (page & 7)):
                continue
            # The aligned 32-bit word holding the byte; little-endian, so
            # bit page % 32 of the word is bit page % 8 of byte page // 8.
            word = byte & ~3
            if word + 4 > self.size:  # a log whose size is not a multiple of 4
                self.beyond += 1
                continue
            _futex_or_bit(self._base + word, page & 31)
            self.pages_marked += 1

    def is_marked(self, gpa: int) -> bool:
        page = gpa // LOG_PAGE
        byte = page >> 3
        return byte < self.size and bool(self._map[byte] & (1 << (page & 7)))

    def close(self) -> None:
        if self._map.closed:
            return
        del self._anchor  # the exported buffer must go before the mapping
        self._map.close()
