"""balloond's migrate-queue extension, mirrored from balloond_ext.h.

The C header next to this file is the definition; this module restates it for
the daemon, and tests/unit/test_extension_header.py compiles the header and
checks that every constant and offset here matches.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import GuestError

#: Device feature bit announcing the migrate queue (BALLOOND_F_MIGRATE_VQ).
F_MIGRATE_VQ = 62

#: Device feature bit for split migrations (BALLOOND_F_MIGRATE_SPLIT): with
#: it, a record may be a departure {old, PFN_NONE}, an arrival {PFN_NONE, new}
#: or a return {PFN_RETURN, new} as well as a whole move {old, new}.
F_MIGRATE_SPLIT = 61
PFN_NONE = 0xFFFF_FFFF_FFFF_FFFF
PFN_RETURN = 0xFFFF_FFFF_FFFF_FFFE

#: struct balloond_migration: __le64 old_pfn, __le64 new_pfn.
MIGRATION = struct.Struct("<QQ")
MIGRATION_SIZE = MIGRATION.size
OFFSET_OLD_PFN = 0
OFFSET_NEW_PFN = 8

#: Frame numbers are 4 KiB frames (BALLOOND_PFN_SHIFT).
PFN_SHIFT = 12

#: The most records a driver puts in one buffer (BALLOOND_MIGRATIONS_PER_BUFFER).
MIGRATIONS_PER_BUFFER = 256

#: With F_MIGRATE_VQ offered, the most PFNs an inflate or deflate buffer may
#: carry (BALLOOND_PFNS_PER_BUFFER): four times the 256 of Linux's own driver,
#: so a driver that negotiated the extension waits for a quarter as many
#: round trips per balloon change.
PFNS_PER_BUFFER = 1024


@dataclass(frozen=True)
class Migration:
    old_pfn: int
    new_pfn: int

    @property
    def kind(self) -> str:
        """"move", "depart", "arrive", "return", or "invalid" for a record
        that names no frame at all (or a marker where a frame belongs)."""
        old, new = self.old_pfn, self.new_pfn
        if new in (PFN_NONE, PFN_RETURN):
            return "depart" if new == PFN_NONE and old not in (PFN_NONE, PFN_RETURN) else "invalid"
        if old == PFN_NONE:
            return "arrive"
        if old == PFN_RETURN:
            return "return"
        return "move"


def departure(pfn: int) -> Migration:
    return Migration(pfn, PFN_NONE)


def arrival(pfn: int) -> Migration:
    return Migration(PFN_NONE, pfn)


def returned(pfn: int) -> Migration:
    return Migration(PFN_RETURN, pfn)


def decode_migrations(data: bytes) -> list[Migration]:
    if len(data) % MIGRATION_SIZE:
        raise GuestError(f"migrate buffer of {len(data)} bytes is not a whole number of records")
    if len(data) > MIGRATIONS_PER_BUFFER * MIGRATION_SIZE:
        raise GuestError(f"migrate buffer holds more than {MIGRATIONS_PER_BUFFER} records")
    return [Migration(old, new) for old, new in MIGRATION.iter_unpack(data)]


def encode_migrations(migrations: list[Migration]) -> bytes:
    return b"".join(MIGRATION.pack(m.old_pfn, m.new_pfn) for m in migrations)
