"""The virtio-balloon device: feature bits, config space, stats, queue roles.

Layouts follow the virtio 1.2 spec (5.5) and Linux's uapi virtio_balloon.h.
Everything is little-endian: balloond offers VIRTIO_F_VERSION_1, so the
legacy guest-endian layouts never apply.
"""

from __future__ import annotations

import array
import enum
import struct
import sys
from dataclasses import dataclass

from . import extension
from .errors import GuestError

#: Balloon PFNs are always in 4 KiB units, whatever the guest's page size.
PFN_SHIFT = 12
PAGE_SIZE = 1 << PFN_SHIFT


class Feature(enum.IntEnum):
    """Feature bits a balloon device and driver can negotiate."""

    MUST_TELL_HOST = 0
    STATS_VQ = 1
    DEFLATE_ON_OOM = 2
    FREE_PAGE_HINT = 3
    PAGE_POISON = 4
    REPORTING = 5
    # transport / ring features (virtio 1.2, 6)
    NOTIFY_ON_EMPTY = 24
    ANY_LAYOUT = 27
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    # balloond's extension (protocol/balloond_ext.h)
    BALLOOND_MIGRATE_VQ = extension.F_MIGRATE_VQ
    BALLOOND_MIGRATE_SPLIT = extension.F_MIGRATE_SPLIT


def has(features: int, feature: Feature) -> bool:
    return bool(features & (1 << feature))


def feature_names(features: int) -> list[str]:
    names = []
    for bit in range(64):
        if features & (1 << bit):
            try:
                names.append(Feature(bit).name)
            except ValueError:
                names.append(f"bit{bit}")
    return names


class QueueRole(enum.Enum):
    INFLATE = "inflate"
    DEFLATE = "deflate"
    STATS = "stats"
    FREE_PAGE_HINT = "free_page_hint"
    REPORTING = "reporting"
    MIGRATE = "migrate"


def queue_roles(features: int) -> list[QueueRole]:
    """Which queue index serves which role, for a negotiated feature set.

    The driver numbers only the queues it uses, consecutively, in the order the
    spec lists them; a queue that is not negotiated takes no index. The
    extension's migrate queue comes last.
    """
    roles = [QueueRole.INFLATE, QueueRole.DEFLATE]
    if has(features, Feature.STATS_VQ):
        roles.append(QueueRole.STATS)
    if has(features, Feature.FREE_PAGE_HINT):
        roles.append(QueueRole.FREE_PAGE_HINT)
    if has(features, Feature.REPORTING):
        roles.append(QueueRole.REPORTING)
    if has(features, Feature.BALLOOND_MIGRATE_VQ):
        roles.append(QueueRole.MIGRATE)
    return roles


# ----------------------------------------------------------------- config

CONFIG = struct.Struct("<IIII")
CONFIG_SIZE = CONFIG.size  # 16


@dataclass
class BalloonConfig:
    """The device config space (virtio_balloon_config).

    num_pages is written by the device (the target), actual by the driver
    (what it holds); poison_val by the driver when PAGE_POISON is negotiated.
    """

    num_pages: int = 0
    actual: int = 0
    free_page_hint_cmd_id: int = 0
    poison_val: int = 0

    OFFSET_NUM_PAGES = 0
    OFFSET_ACTUAL = 4
    OFFSET_FREE_PAGE_HINT_CMD_ID = 8
    OFFSET_POISON_VAL = 12

    def encode(self) -> bytes:
        return CONFIG.pack(self.num_pages, self.actual, self.free_page_hint_cmd_id, self.poison_val)

    def read(self, offset: int, size: int) -> bytes:
        """A window of the config space; bytes past its end read as zero."""
        data = self.encode() + bytes(max(0, offset + size - CONFIG_SIZE))
        return data[offset : offset + size]

    def driver_write(self, offset: int, data: bytes) -> list[str]:
        """Apply a driver write. Only driver-writable fields change.

        QEMU forwards a write as its whole cached config, which holds a stale
        num_pages, so writes to device-owned fields are ignored. Returns the
        names of the fields that changed.
        """
        current = bytearray(self.encode())
        end = min(CONFIG_SIZE, offset + len(data))
        if offset >= CONFIG_SIZE:
            return []
        current[offset:end] = data[: end - offset]
        _, actual, _, poison_val = CONFIG.unpack(bytes(current))
        changed = []
        if actual != self.actual:
            self.actual = actual
            changed.append("actual")
        if poison_val != self.poison_val:
            self.poison_val = poison_val
            changed.append("poison_val")
        return changed


# ------------------------------------------------------------------ stats

STAT = struct.Struct("<HQ")  # packed: 10 bytes


class StatTag(enum.IntEnum):
    """Tags of virtio_balloon_stat; 10-15 were added in Linux 6.12."""

    SWAP_IN = 0
    SWAP_OUT = 1
    MAJOR_FAULTS = 2
    MINOR_FAULTS = 3
    FREE_MEMORY = 4
    TOTAL_MEMORY = 5
    AVAILABLE_MEMORY = 6
    DISK_CACHES = 7
    HUGETLB_ALLOCATIONS = 8
    HUGETLB_FAILURES = 9
    OOM_KILLS = 10
    ALLOC_STALLS = 11
    ASYNC_SCANS = 12
    DIRECT_SCANS = 13
    ASYNC_RECLAIMS = 14
    DIRECT_RECLAIMS = 15

    @property
    def key(self) -> str:
        return self.name.lower()


def decode_stats(data: bytes) -> dict[str, int]:
    """Stats buffer → {tag name: value}. Unknown tags are kept as `tag<N>`.

    A trailing partial entry is a guest error; a repeated tag keeps the last value.
    """
    if len(data) % STAT.size:
        raise GuestError(f"stats buffer of {len(data)} bytes is not a whole number of entries")
    out: dict[str, int] = {}
    for tag, value in STAT.iter_unpack(data):
        try:
            name = StatTag(tag).key
        except ValueError:
            name = f"tag{tag}"
        out[name] = value
    return out


def encode_stats(stats: dict[StatTag, int]) -> bytes:
    return b"".join(STAT.pack(tag, value) for tag, value in stats.items())


#: QEMU's names for the same statistics in its built-in device's
#: `guest-stats` QOM property (the QMP side of a VM that uses QEMU's balloon).
QEMU_STAT_NAMES: dict[StatTag, str] = {
    StatTag.SWAP_IN: "stat-swap-in",
    StatTag.SWAP_OUT: "stat-swap-out",
    StatTag.MAJOR_FAULTS: "stat-major-faults",
    StatTag.MINOR_FAULTS: "stat-minor-faults",
    StatTag.FREE_MEMORY: "stat-free-memory",
    StatTag.TOTAL_MEMORY: "stat-total-memory",
    StatTag.AVAILABLE_MEMORY: "stat-available-memory",
    StatTag.DISK_CACHES: "stat-disk-caches",
    StatTag.HUGETLB_ALLOCATIONS: "stat-htlb-pgalloc",
    StatTag.HUGETLB_FAILURES: "stat-htlb-pgfail",
    StatTag.OOM_KILLS: "stat-oom-kills",
    StatTag.ALLOC_STALLS: "stat-alloc-stalls",
    StatTag.ASYNC_SCANS: "stat-async-scans",
    StatTag.DIRECT_SCANS: "stat-direct-scans",
    StatTag.ASYNC_RECLAIMS: "stat-async-reclaims",
    StatTag.DIRECT_RECLAIMS: "stat-direct-reclaims",
}
#: The value QEMU shows for a statistic the guest never sent.
QEMU_STAT_UNSET = (1 << 64) - 1


def decode_qemu_guest_stats(stats: object) -> dict[str, int]:
    """QEMU's `guest-stats` "stats" member → {tag name: value}, as decode_stats.

    Statistics the guest did not send (QEMU shows 2^64-1, or -1) are left
    out; anything that is not a whole number is ignored.
    """
    if not isinstance(stats, dict):
        return {}
    out: dict[str, int] = {}
    for tag, qemu_name in QEMU_STAT_NAMES.items():
        value = stats.get(qemu_name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < QEMU_STAT_UNSET:
            out[tag.key] = value
    return out


# ------------------------------------------------------- inflate / deflate


def decode_pfns(data: bytes) -> array.array:
    """An inflate/deflate buffer is an array of 32-bit little-endian PFNs."""
    if len(data) % 4:
        raise GuestError(f"PFN buffer of {len(data)} bytes is not a whole number of 32-bit PFNs")
    pfns = array.array("I", data)
    if sys.byteorder != "little":
        pfns.byteswap()
    return pfns


def encode_pfns(pfns: list[int]) -> bytes:
    return struct.pack(f"<{len(pfns)}I", *pfns)
