"""The test side's own encoders and decoders of every wire layout balloond speaks.

Why this exists: the test frontend used to pack its messages and rings with the
product's own codecs (protocol/), so a layout mistake made once would be made
on both sides of every test and stay invisible until a real VM met it. This
module restates each layout from its source, field by field, without importing
anything from protocol/ or balloond/:

* vhost-user framing and payloads: QEMU's docs/interop/vhost-user.rst
  ("Message Specification", "Front-end message types", "Back-end message
  types", "Protocol features");
* the split virtqueue: virtio 1.x, "Split Virtqueues" (descriptor table,
  available ring, used ring, event suppression);
* the balloon device: virtio 1.x, "Memory Balloon Device", and Linux's
  include/uapi/linux/virtio_balloon.h for the statistics tags;
* balloond's migrate-queue extension: protocol/balloond_ext.h (the C header
  is the definition; the Python mirror in protocol/ is not consulted).

Every field is packed with explicit little-endian widths (`_le`) rather than
shared struct formats, so it reads like the spec's tables. tests/unit/
test_wire_golden.py checks this module and protocol/ against the same
literal bytes: each is checked against the spec, neither against the other.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def _le(value: int, width: int) -> bytes:
    """`value` as a `width`-byte little-endian unsigned field (range-checked)."""
    return value.to_bytes(width, "little", signed=False)


def _get(data: bytes | bytearray | memoryview, offset: int, width: int) -> int:
    """The `width`-byte little-endian unsigned field at `offset`."""
    if offset < 0 or offset + width > len(data):
        raise ValueError(f"{width}-byte field at {offset} outside {len(data)} bytes")
    return int.from_bytes(bytes(data[offset : offset + width]), "little", signed=False)


def _put(buf: bytearray | memoryview, offset: int, width: int, value: int) -> None:
    """Store a `width`-byte little-endian field at `offset` of a writable buffer."""
    if offset < 0 or offset + width > len(buf):
        raise ValueError(f"{width}-byte field at {offset} outside {len(buf)} bytes")
    buf[offset : offset + width] = _le(value, width)


# =============================================================== vhost-user
# Header: request u32, flags u32, size u32. Flags: bits 0-1 the version (1),
# bit 2 "reply", bit 3 "need_reply".

HEADER_SIZE = 12
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

#: Feature bit (in GET/SET_FEATURES) announcing protocol-feature negotiation.
F_PROTOCOL_FEATURES = 30

#: SET_VRING_KICK/CALL/ERR u64: bits 0-7 the queue index, bit 8 "no fd".
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8

#: The largest reply the test frontend accepts (a full config space, a memory
#: table of 8 regions and QEMU's replies all fit easily).
MAX_REPLY_PAYLOAD = 4096


class Request(enum.IntEnum):
    """Front-end request ids ("Front-end message types", `:id:`)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Back-end request ids ("Back-end message types")."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the protocol feature word ("Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def bits(*numbers: int) -> int:
    """A feature word with the given bit numbers set."""
    word = 0
    for n in numbers:
        word |= 1 << n
    return word


@dataclass(frozen=True)
class Message:
    """One vhost-user message as the test side sees it (fds not tracked)."""

    request: int
    flags: int
    payload: bytes = b""

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


def pack_header(request: int, flags: int, size: int) -> bytes:
    return _le(request, 4) + _le(flags, 4) + _le(size, 4)


def unpack_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(request, flags, size) of the 12-byte header at the start of `data`."""
    return _get(data, 0, 4), _get(data, 4, 4), _get(data, 8, 4)


def pack_message(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return pack_header(request, flags, len(payload)) + payload


def pack_u32(value: int) -> bytes:
    return _le(value, 4)


def pack_u64(value: int) -> bytes:
    return _le(value, 8)


def unpack_u64(payload: bytes) -> int:
    if len(payload) != 8:
        raise ValueError(f"u64 payload of {len(payload)} bytes")
    return _get(payload, 0, 8)


def pack_vring_state(index: int, num: int) -> bytes:
    """Vring state description: index u32, num u32."""
    return _le(index, 4) + _le(num, 4)


def unpack_vring_state(payload: bytes) -> tuple[int, int]:
    if len(payload) != 8:
        raise ValueError(f"vring state payload of {len(payload)} bytes")
    return _get(payload, 0, 4), _get(payload, 4, 4)


VRING_ADDR_SIZE = 40


def pack_vring_addr(index: int, flags: int, *, desc: int, used: int, avail: int, log: int = 0) -> bytes:
    """Vring address description: index u32, flags u32, then the descriptor,
    used and available ring addresses and the log address, u64 each (the
    rst's table also shows a "size" column, but no such field exists)."""
    return _le(index, 4) + _le(flags, 4) + _le(desc, 8) + _le(used, 8) + _le(avail, 8) + _le(log, 8)


def unpack_vring_addr(payload: bytes) -> dict[str, int]:
    if len(payload) != VRING_ADDR_SIZE:
        raise ValueError(f"vring address payload of {len(payload)} bytes")
    return {
        "index": _get(payload, 0, 4),
        "flags": _get(payload, 4, 4),
        "desc": _get(payload, 8, 8),
        "used": _get(payload, 16, 8),
        "avail": _get(payload, 24, 8),
        "log": _get(payload, 32, 8),
    }


def pack_vring_file(index: int, has_fd: bool) -> bytes:
    """SET_VRING_KICK/CALL/ERR: the index in bits 0-7, bit 8 when no fd comes."""
    if index & ~VRING_INDEX_MASK:
        raise ValueError(f"queue index {index} does not fit in bits 0-7")
    return _le(index | (0 if has_fd else VRING_NOFD), 8)


MEM_REGION_SIZE = 32


@dataclass(frozen=True)
class MemRegion:
    """A memory region: guest address, size, user address, mmap offset (u64 each).

    Field names follow QEMU's VhostUserMemoryRegion so tests can use either."""

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int

    def encode(self) -> bytes:
        return _le(self.guest_phys_addr, 8) + _le(self.size, 8) + _le(self.userspace_addr, 8) + _le(self.mmap_offset, 8)

    @classmethod
    def decode(cls, data: bytes, offset: int = 0) -> MemRegion:
        return cls(_get(data, offset, 8), _get(data, offset + 8, 8), _get(data, offset + 16, 8), _get(data, offset + 24, 8))


def pack_mem_table(regions: Sequence[MemRegion]) -> bytes:
    """Memory regions description: nregions u32, padding u32, the regions."""
    return _le(len(regions), 4) + _le(0, 4) + b"".join(r.encode() for r in regions)


def unpack_mem_table(payload: bytes) -> list[MemRegion]:
    count = _get(payload, 0, 4)
    if len(payload) < 8 + count * MEM_REGION_SIZE:
        raise ValueError(f"memory table of {len(payload)} bytes for {count} regions")
    return [MemRegion.decode(payload, 8 + i * MEM_REGION_SIZE) for i in range(count)]


def pack_single_region(region: MemRegion) -> bytes:
    """Single memory region description (ADD/REM_MEM_REG): padding u64, region."""
    return _le(0, 8) + region.encode()


CONFIG_HEADER_SIZE = 12


def pack_config_space(offset: int, size: int, flags: int, data: bytes) -> bytes:
    """Virtio device config space: offset u32, size u32, flags u32, payload."""
    return _le(offset, 4) + _le(size, 4) + _le(flags, 4) + data


def unpack_config_space(payload: bytes) -> tuple[int, int, int, bytes]:
    if len(payload) < CONFIG_HEADER_SIZE:
        raise ValueError(f"config space payload of {len(payload)} bytes")
    return _get(payload, 0, 4), _get(payload, 4, 4), _get(payload, 8, 4), bytes(payload[CONFIG_HEADER_SIZE:])


# ========================================================== split virtqueue
# struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; }
# struct virtq_avail { le16 flags; le16 idx; le16 ring[num]; le16 used_event; }
# struct virtq_used { le16 flags; le16 idx; struct { le32 id; le32 len; } ring[num]; le16 avail_event; }

DESC_SIZE = 16
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1

#: Alignment the spec requires of each part (virtio 1.x, "Virtqueues").
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

RING_FLAGS = 0  # offset of flags in both rings
RING_IDX = 2  # offset of idx in both rings
USED_ELEM_SIZE = 8


def pack_desc(addr: int, length: int, flags: int, next_index: int) -> bytes:
    return _le(addr, 8) + _le(length, 4) + _le(flags, 2) + _le(next_index, 2)


def write_desc(table: bytearray | memoryview, index: int, addr: int, length: int, flags: int, next_index: int) -> None:
    table[DESC_SIZE * index : DESC_SIZE * (index + 1)] = pack_desc(addr, length, flags, next_index)


def read_desc(table: bytes | bytearray | memoryview, index: int) -> tuple[int, int, int, int]:
    """(addr, len, flags, next) of descriptor `index`."""
    base = DESC_SIZE * index
    return _get(table, base, 8), _get(table, base + 8, 4), _get(table, base + 12, 2), _get(table, base + 14, 2)


def avail_ring_size(num: int) -> int:
    """flags, idx, ring[num], used_event (room for the event index always)."""
    return 2 + 2 + 2 * num + 2


def used_ring_size(num: int) -> int:
    """flags, idx, ring[num] of {id, len}, avail_event."""
    return 2 + 2 + USED_ELEM_SIZE * num + 2


def avail_slot_offset(slot: int) -> int:
    return 4 + 2 * slot


def used_event_offset(num: int) -> int:
    """Where the driver's used_event lives: right after the avail ring's entries."""
    return 4 + 2 * num


def used_elem_offset(slot: int) -> int:
    return 4 + USED_ELEM_SIZE * slot


def avail_event_offset(num: int) -> int:
    """Where the device's avail_event lives: right after the used ring's elements."""
    return 4 + USED_ELEM_SIZE * num


def read_u16(buf: bytes | bytearray | memoryview, offset: int) -> int:
    return _get(buf, offset, 2)


def write_u16(buf: bytearray | memoryview, offset: int, value: int) -> None:
    _put(buf, offset, 2, value & 0xFFFF)


def read_used_elem(used: bytes | bytearray | memoryview, slot: int) -> tuple[int, int]:
    """(id, len) of used-ring element `slot`."""
    base = used_elem_offset(slot)
    return _get(used, base, 4), _get(used, base + 4, 4)


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event: (u16)(new - event - 1) < (u16)(new - old), i.e.
    the other side's event index was passed by the move from old to new."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


# ============================================================ virtio-balloon


class Feature(enum.IntEnum):
    """Feature bits the balloon tests use ("Feature bits" of the balloon
    device, the reserved ring/transport bits, and balloond_ext.h's bit)."""

    MUST_TELL_HOST = 0
    STATS_VQ = 1
    DEFLATE_ON_OOM = 2
    FREE_PAGE_HINT = 3
    PAGE_POISON = 4
    REPORTING = 5
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    BALLOOND_MIGRATE_VQ = 62


PFN_SHIFT = 12
PAGE_SIZE = 1 << PFN_SHIFT

#: struct virtio_balloon_config: num_pages, actual, free_page_hint_cmd_id, poison_val (le32 each).
CONFIG_SIZE = 16
OFFSET_NUM_PAGES = 0
OFFSET_ACTUAL = 4
OFFSET_FREE_PAGE_HINT_CMD_ID = 8
OFFSET_POISON_VAL = 12


@dataclass(frozen=True)
class BalloonConfig:
    """The balloon's config space as the driver reads it."""

    num_pages: int
    actual: int
    free_page_hint_cmd_id: int
    poison_val: int

    def encode(self) -> bytes:
        return _le(self.num_pages, 4) + _le(self.actual, 4) + _le(self.free_page_hint_cmd_id, 4) + _le(self.poison_val, 4)

    @classmethod
    def decode(cls, data: bytes) -> BalloonConfig:
        """Decode a (possibly short) config window; missing bytes read as zero."""
        full = bytes(data[:CONFIG_SIZE]) + bytes(max(0, CONFIG_SIZE - len(data)))
        return cls(
            _get(full, OFFSET_NUM_PAGES, 4),
            _get(full, OFFSET_ACTUAL, 4),
            _get(full, OFFSET_FREE_PAGE_HINT_CMD_ID, 4),
            _get(full, OFFSET_POISON_VAL, 4),
        )


class StatTag(enum.IntEnum):
    """VIRTIO_BALLOON_S_* (Linux uapi virtio_balloon.h; 10-15 since Linux 6.12)."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJOR_FAULTS = 2  # MAJFLT
    MINOR_FAULTS = 3  # MINFLT
    FREE_MEMORY = 4  # MEMFREE
    TOTAL_MEMORY = 5  # MEMTOT
    AVAILABLE_MEMORY = 6  # AVAIL
    DISK_CACHES = 7  # CACHES
    HUGETLB_ALLOCATIONS = 8  # HTLB_PGALLOC
    HUGETLB_FAILURES = 9  # HTLB_PGFAIL
    OOM_KILLS = 10  # OOM_KILL
    ALLOC_STALLS = 11  # ALLOC_STALL
    ASYNC_SCANS = 12  # ASYNC_SCAN
    DIRECT_SCANS = 13  # DIRECT_SCAN
    ASYNC_RECLAIMS = 14  # ASYNC_RECLAIM
    DIRECT_RECLAIMS = 15  # DIRECT_RECLAIM


#: struct virtio_balloon_stat { le16 tag; le64 val; } __attribute__((packed)).
STAT_SIZE = 10


def pack_stat(tag: int, value: int) -> bytes:
    return _le(tag, 2) + _le(value, 8)


def pack_stats(entries: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(pack_stat(tag, value) for tag, value in entries)


def unpack_stats(data: bytes) -> list[tuple[int, int]]:
    if len(data) % STAT_SIZE:
        raise ValueError(f"stats buffer of {len(data)} bytes")
    return [(_get(data, i, 2), _get(data, i + 2, 8)) for i in range(0, len(data), STAT_SIZE)]


def pack_pfns(pfns: Iterable[int]) -> bytes:
    """Inflate/deflate buffer: le32 page frame numbers of 4 KiB pages."""
    return b"".join(_le(p, 4) for p in pfns)


def unpack_pfns(data: bytes) -> list[int]:
    if len(data) % 4:
        raise ValueError(f"PFN buffer of {len(data)} bytes")
    return [_get(data, i, 4) for i in range(0, len(data), 4)]


def queue_order(features: int) -> list[str]:
    """The queues a driver numbers, in order, for a negotiated feature word:
    inflateq, deflateq, then statsq (STATS_VQ), free_page_vq (FREE_PAGE_HINT),
    reporting_vq (REPORTING), each only if negotiated; balloond's migrate
    queue last (balloond_ext.h). Names match protocol.balloon.QueueRole values."""
    order = ["inflate", "deflate"]
    for bit, name in (
        (Feature.STATS_VQ, "stats"),
        (Feature.FREE_PAGE_HINT, "free_page_hint"),
        (Feature.REPORTING, "reporting"),
        (Feature.BALLOOND_MIGRATE_VQ, "migrate"),
    ):
        if features >> bit & 1:
            order.append(name)
    return order


# ================================================ balloond migrate extension
# struct balloond_migration { __le64 old_pfn; __le64 new_pfn; }

F_MIGRATE_VQ = 62
MIGRATION_SIZE = 16
MIGRATIONS_PER_BUFFER = 256


def pack_migrations(moves: Iterable[tuple[int, int]]) -> bytes:
    return b"".join(_le(old, 8) + _le(new, 8) for old, new in moves)


def unpack_migrations(data: bytes) -> list[tuple[int, int]]:
    if len(data) % MIGRATION_SIZE:
        raise ValueError(f"migrate buffer of {len(data)} bytes")
    return [(_get(data, i, 8), _get(data, i + 8, 8)) for i in range(0, len(data), MIGRATION_SIZE)]
