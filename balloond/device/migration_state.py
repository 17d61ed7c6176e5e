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

Runs as gaps and counts compress to a few bytes per run of a fragmented
balloon and to nothing for a contiguous one.

The bytes pass through the frontend, which is not trusted: everything is
checked on decode (magic, version, CRC, sizes, run order, the inflated size
bounded before decompression), and the destination checks the frames
against its own guest RAM before adopting them (`BalloonDevice.load_state`).
A state that fails is refused and the migration fails; the source goes on.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from protocol.balloon import CONFIG, BalloonConfig

MAGIC = b"BLNDMIG1"

#: flags
POISON_KNOWN = 1 << 0
INFLATE_BASE_KNOWN = 1 << 1
_ALL_FLAGS = POISON_KNOWN | INFLATE_BASE_KNOWN

HEADER = struct.Struct("<8sIIQ16sdIQI")
CRC = struct.Struct("<I")
RUN = struct.Struct("<QQ")

#: At most this many runs (every other frame of 1 TiB of guest RAM would be
#: 2^27): bounds the memory a decode may take to 256 MiB.
MAX_RUNS = 1 << 24


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
        head = HEADER.pack(
            MAGIC, flags, len(self.runs), self.features, self.config.encode(), self.stats_interval,
            (self.inflate_base or 0) & 0xFFFF, self.guest_ram_bytes, len(packed),
        )
        return head + CRC.pack(zlib.crc32(packed, zlib.crc32(head))) + packed

    @classmethod
    def decode(cls, data: bytes) -> MigrationState:
        """Raises ValueError for anything but a well-formed state."""
        if len(data) < HEADER.size + CRC.size:
            raise ValueError(f"state of {len(data)} bytes is shorter than its header")
        (magic, flags, nruns, features, config, interval, base, ram, packed_len) = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("not a balloond device state (or another version)")
        (crc,) = CRC.unpack_from(data, HEADER.size)
        packed = data[HEADER.size + CRC.size :]
        if len(packed) != packed_len:
            raise ValueError(f"{len(packed)} bytes of runs where the header says {packed_len}")
        if zlib.crc32(packed, zlib.crc32(data[: HEADER.size])) != crc:
            raise ValueError("state checksum mismatch")
        if flags & ~_ALL_FLAGS:
            raise ValueError(f"unknown flags {flags:#x}")
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
        )
