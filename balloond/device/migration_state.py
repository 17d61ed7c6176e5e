"""MigrationState: the balloon device's state as it travels with a migrating VM.

QEMU carries these bytes from the source's daemon to the destination's
(VHOST_USER_PROTOCOL_F_DEVICE_STATE, see balloond/engine/device_state.py)
without looking at them. The destination adopts them so that the balloon
goes on where it was: the same frames tracked (a deflate of a frame ballooned
on the source must be recognised), the same target and config, the same
stats interval, and the inflate ring's position (which tells a resumed
driver from a reset one).

Layout (little-endian), version 1:

    header   magic "BLNDMIG1", u32 flags, u32 nranges,
             u64 features, 16 bytes of config space (num_pages, actual,
             free_page_hint_cmd_id, poison_val), f64 stats_interval,
             u32 inflate ring base, u64 guest RAM bytes,
             u32 compressed length, u32 CRC-32 of all that precedes it
             and of the compressed bytes
    ranges   zlib of nranges × (u64 gap from the previous run's end, u64 count)
    origin   only with flag ORIGIN_KNOWN: 16 bytes of migration id, then
             u8 length + the source VM's name, u8 length + the source's
             host name (ASCII; an empty host name: unknown)

The CRC covers the origin too. Runs as gaps and counts compress to a few
bytes per run of a fragmented balloon and to nothing for a contiguous one.

The origin names where the VM came from: the id is random, made by the
source's daemon for this one state, which it remembers, so that a daemon
serving both ends can pair the source VM with the destination VM; the name
is the source VM's as its daemon knows it. A state without it (from a
daemon before the origin) is adopted as before; a daemon before the origin
refuses a state with it (unknown flag): the migration fails and the source
goes on.

The bytes pass through the frontend, which is not trusted: everything is
checked on decode (magic, version, CRC, sizes, run order, the inflated size
bounded before decompression, the origin's names against the rules for a VM
name and a host name: they end up in logs, terminals and the API), and the destination checks the frames
against its own guest RAM before adopting them (`BalloonDevice.load_state`).
A state that fails is refused and the migration fails; the source goes on.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

from protocol.balloon import CONFIG, BalloonConfig

MAGIC = b"BLNDMIG1"

#: flags
POISON_KNOWN = 1 << 0
INFLATE_BASE_KNOWN = 1 << 1
ORIGIN_KNOWN = 1 << 2
_ALL_FLAGS = POISON_KNOWN | INFLATE_BASE_KNOWN | ORIGIN_KNOWN

HEADER = struct.Struct("<8sIIQ16sdIQI")
CRC = struct.Struct("<I")
RUN = struct.Struct("<QQ")

#: At most this many runs (every other frame of 1 TiB of guest RAM would be
#: 2^27): bounds the memory a decode may take to 256 MiB.
MAX_RUNS = 1 << 24

ORIGIN_ID_BYTES = 16
#: A VM's name as the daemon's configuration allows it (balloond/services/config.py).
VM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: A host name: letters, digits, '.', '_', '-' (no spaces or control characters).
HOST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,252}")


@dataclass(frozen=True)
class MigrationOrigin:
    """Where a migrated state comes from (see the module's docstring)."""

    #: 32 hex digits, random per saved state.
    id: str
    #: The source VM's name, as the source's daemon knows it.
    vm: str
    #: The source's host name; "" if it was not one that fits HOST_NAME.
    host: str

    def encode(self) -> bytes:
        ident = bytes.fromhex(self.id)
        if len(ident) != ORIGIN_ID_BYTES or not VM_NAME.fullmatch(self.vm) \
                or not (self.host == "" or HOST_NAME.fullmatch(self.host)):
            raise ValueError(f"not a valid origin: {self!r}")
        vm, host = self.vm.encode(), self.host.encode()
        return ident + bytes([len(vm)]) + vm + bytes([len(host)]) + host

    @classmethod
    def decode(cls, data: bytes) -> MigrationOrigin:
        if len(data) < ORIGIN_ID_BYTES + 2:
            raise ValueError(f"origin of {len(data)} bytes is too short")
        ident, rest = data[:ORIGIN_ID_BYTES], data[ORIGIN_ID_BYTES:]
        vm_len = rest[0]
        vm, rest = rest[1 : 1 + vm_len], rest[1 + vm_len :]
        if len(vm) != vm_len or not rest:
            raise ValueError("origin's VM name runs past the state's end")
        host_len = rest[0]
        host = rest[1:]
        if len(host) != host_len:
            raise ValueError(f"origin's host name is {len(host)} bytes where its length says {host_len}")
        # Matched as bytes: a non-ASCII byte is refused here, before any decoding.
        if not re.fullmatch(VM_NAME.pattern.encode(), vm):
            raise ValueError("origin's VM name is not a valid VM name")
        if host and not re.fullmatch(HOST_NAME.pattern.encode(), host):
            raise ValueError("origin's host name is not a valid host name")
        return cls(id=ident.hex(), vm=vm.decode(), host=host.decode())


@dataclass(frozen=True)
class MigrationState:
    features: int
    config: BalloonConfig
    stats_interval: float
    #: The inflate ring's next avail index when the source stopped, if known.
    inflate_base: int | None
    #: Whether config.poison_val is the driver's own (not lost to a restart).
    poison_known: bool
    guest_ram_bytes: int
    #: The ballooned frames: (first_pfn, count) runs, ascending, disjoint.
    runs: tuple[tuple[int, int], ...]
    #: Where the state was saved; None from a daemon before the origin.
    origin: MigrationOrigin | None = None

    @property
    def frames(self) -> int:
        return sum(count for _, count in self.runs)

    def encode(self) -> bytes:
        raw = bytearray()
        end = 0
        for first, count in self.runs:
            raw += RUN.pack(first - end, count)
            end = first + count
        packed = zlib.compress(bytes(raw), 6)
        flags = (POISON_KNOWN if self.poison_known else 0) | (INFLATE_BASE_KNOWN if self.inflate_base is not None else 0)
        origin = b""
        if self.origin is not None:
            flags |= ORIGIN_KNOWN
            origin = self.origin.encode()
        head = HEADER.pack(
            MAGIC, flags, len(self.runs), self.features, self.config.encode(), self.stats_interval,
            (self.inflate_base or 0) & 0xFFFF, self.guest_ram_bytes, len(packed),
        )
        return head + CRC.pack(zlib.crc32(packed + origin, zlib.crc32(head))) + packed + origin

    @classmethod
    def decode(cls, data: bytes) -> MigrationState:
        """Raises ValueError for anything but a well-formed state."""
        if len(data) < HEADER.size + CRC.size:
            raise ValueError(f"state of {len(data)} bytes is shorter than its header")
        (magic, flags, nruns, features, config, interval, base, ram, packed_len) = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("not a balloond device state (or another version)")
        (crc,) = CRC.unpack_from(data, HEADER.size)
        body = data[HEADER.size + CRC.size :]
        # The runs, then (with ORIGIN_KNOWN) the origin to the end.
        packed = body[:packed_len] if flags & ORIGIN_KNOWN else body
        if len(packed) != packed_len:
            raise ValueError(f"{len(packed)} bytes of runs where the header says {packed_len}")
        if zlib.crc32(body, zlib.crc32(data[: HEADER.size])) != crc:
            raise ValueError("state checksum mismatch")
        if flags & ~_ALL_FLAGS:
            raise ValueError(f"unknown flags {flags:#x}")
        origin = MigrationOrigin.decode(body[packed_len:]) if flags & ORIGIN_KNOWN else None
        if nruns > MAX_RUNS:
            raise ValueError(f"{nruns} runs (at most {MAX_RUNS})")
        if not 0 <= interval < 1e9:  # NaN fails too
            raise ValueError(f"stats interval {interval!r}")
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(packed, nruns * RUN.size + 1)
        except zlib.error as exc:
            raise ValueError(f"runs do not decompress: {exc}") from None
        if len(raw) != nruns * RUN.size or not inflater.eof or inflater.unconsumed_tail:
            raise ValueError("runs do not match their count")
        runs: list[tuple[int, int]] = []
        end = 0
        for gap, count in RUN.iter_unpack(raw):
            first = end + gap
            if count == 0 or (runs and gap == 0):
                raise ValueError("runs are empty or not coalesced")
            end = first + count
            if end > 1 << 52:
                raise ValueError("run beyond any guest-physical address")
            runs.append((first, count))
        num_pages, actual, hint, poison = CONFIG.unpack(config)
        return cls(
            features=features,
            config=BalloonConfig(num_pages=num_pages, actual=actual, free_page_hint_cmd_id=hint, poison_val=poison),
            stats_interval=interval,
            inflate_base=base if flags & INFLATE_BASE_KNOWN else None,
            poison_known=bool(flags & POISON_KNOWN),
            guest_ram_bytes=ram,
            runs=tuple(runs),
            origin=origin,
        )
