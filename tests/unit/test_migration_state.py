"""The device state a migrating VM carries (balloond/device/migration_state.py)
and its adoption by a BalloonDevice on the destination."""

from __future__ import annotations

import mmap
import os
import struct
import zlib

import pytest

from balloond.device.balloon import BalloonDevice, DeviceSettings
from balloond.device.migration_state import HEADER, MAGIC, MAX_RUNS, MigrationOrigin, MigrationState
from balloond.services.cli import render_detail
from balloond.status import MigrationPeer, VmStatus
from balloond.vm import MigrationPairs, valid_peer
from balloond.engine.memory import GuestMemory
from protocol.balloon import BalloonConfig
from protocol.vhost_user import MemoryRegion

PAGE = 4096


def make_state(**kw) -> MigrationState:
    base = dict(
        features=(1 << 32) | 1 | (1 << 62), config=BalloonConfig(num_pages=5000, actual=4000, poison_val=0xAA),
        stats_interval=2.5, inflate_base=1234, poison_known=True, guest_ram_bytes=1 << 30,
        runs=((256, 10), (300, 1), (4096, 3990)),
    )
    base.update(kw)
    return MigrationState(**base)


def test_round_trip_keeps_every_field():
    state = make_state()
    assert MigrationState.decode(state.encode()) == state
    assert state.frames == 4001
    unknown = make_state(inflate_base=None, poison_known=False, runs=())
    assert MigrationState.decode(unknown.encode()) == unknown


def test_a_fragmented_balloon_stays_small():
    runs = tuple((i * 2, 1) for i in range(100_000))  # every other frame of 800 MiB
    data = make_state(runs=runs).encode()
    assert len(data) < 16 * 1024  # (gap 1, count 1) repeated compresses to almost nothing
    assert MigrationState.decode(data).runs == runs


def corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


def resign(data: bytes) -> bytes:
    """Fix the CRC after a change, so the check behind it is what refuses."""
    head = data[: HEADER.size]
    packed = data[HEADER.size + 4 :]
    return head + struct.pack("<I", zlib.crc32(packed, zlib.crc32(head))) + packed


@pytest.mark.parametrize(
    "mangle,match",
    [
        (lambda d: d[:10], "shorter"),
        (lambda d: corrupt(d, 0, b"XXXXXXXX"), "not a balloond"),
        (lambda d: d[:-1], "bytes of runs"),
        (lambda d: d + b"\0", "bytes of runs"),
        (lambda d: corrupt(d, 20, b"\xff"), "checksum"),
        (lambda d: resign(corrupt(d, 8, struct.pack("<I", 1 << 7))), "unknown flags"),
        (lambda d: resign(corrupt(d, 12, struct.pack("<I", MAX_RUNS + 1))), "runs"),
        (lambda d: resign(corrupt(d, 12, struct.pack("<I", 2))), "do not match"),
        (lambda d: resign(corrupt(d, 12, struct.pack("<I", 4))), "do not match"),
        (lambda d: resign(corrupt(d, 40, struct.pack("<d", float("nan")))), "stats interval"),
    ],
)
def test_hostile_states_are_refused(mangle, match):
    with pytest.raises(ValueError, match=match):
        MigrationState.decode(mangle(make_state().encode()))


def forged(raw: bytes, nruns: int) -> bytes:
    packed = zlib.compress(raw)
    head = HEADER.pack(MAGIC, 0, nruns, 0, bytes(16), 1.0, 0, 0, len(packed))
    return head + struct.pack("<I", zlib.crc32(packed, zlib.crc32(head))) + packed


def test_runs_must_be_coalesced_non_empty_and_inside_any_address_space():
    run = struct.Struct("<QQ")
    with pytest.raises(ValueError, match="empty"):
        MigrationState.decode(forged(run.pack(5, 0), 1))
    with pytest.raises(ValueError, match="coalesced"):
        MigrationState.decode(forged(run.pack(5, 1) + run.pack(0, 1), 2))
    with pytest.raises(ValueError, match="beyond"):
        MigrationState.decode(forged(run.pack(1 << 60, 1), 1))


def test_a_decompression_bomb_is_cut_short():
    bomb = bytes(64 << 20)  # 64 MiB of zeros: 4 million "runs" of count 0
    data = forged(bomb, 1)
    assert len(data) < 100_000
    with pytest.raises(ValueError, match="do not match"):
        MigrationState.decode(data)


# ------------------------------------------------------------------ origin

ORIGIN = MigrationOrigin(id="0123456789abcdef" * 2, vm="web-1.a_b", host="host7.example.org")


def test_the_origin_round_trips_and_a_state_without_one_is_the_first_format():
    state = make_state(origin=ORIGIN)
    assert MigrationState.decode(state.encode()) == state
    assert MigrationState.decode(make_state(origin=MigrationOrigin(ORIGIN.id, "v", "")).encode()).origin.host == ""
    plain = make_state().encode()
    assert struct.unpack_from("<I", plain, 8)[0] & 4 == 0  # no ORIGIN_KNOWN flag: what an older daemon reads
    assert MigrationState.decode(plain).origin is None


def with_origin(raw: bytes) -> bytes:
    """A valid state whose origin bytes are `raw` (CRC fixed)."""
    return resign(make_state(origin=ORIGIN).encode()[: -len(ORIGIN.encode())] + raw)


def origin_bytes(ident: bytes = bytes(range(16)), vm: bytes = b"vm0", host: bytes = b"h") -> bytes:
    return ident + bytes([len(vm)]) + vm + bytes([len(host)]) + host


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"", "too short"),
        (bytes(16), "too short"),
        (origin_bytes()[:-1], "host name is 0 bytes"),
        (origin_bytes() + b"x", "host name is 2 bytes"),
        (bytes(16) + b"\x09vm0", "runs past"),
        (origin_bytes(vm=b""), "not a valid VM name"),
        (origin_bytes(vm=b"\x1b[2Jx"), "not a valid VM name"),
        (origin_bytes(vm=b"a" * 65), "not a valid VM name"),
        (origin_bytes(vm=b"-x"), "not a valid VM name"),
        (origin_bytes(vm="vé".encode()), "not a valid VM name"),
        (origin_bytes(vm=b"vm0\n"), "not a valid VM name"),
        (origin_bytes(host=b"a host"), "not a valid host name"),
        (origin_bytes(host=b"h\x00"), "not a valid host name"),
        (origin_bytes(host=b"\xff\xfe"), "not a valid host name"),
    ],
)
def test_hostile_origins_are_refused(raw, match):
    with pytest.raises(ValueError, match=match):
        MigrationState.decode(with_origin(raw))
    assert MigrationState.decode(with_origin(origin_bytes())).origin.vm == "vm0"


def test_an_origin_the_source_cannot_send_is_an_error_not_a_bad_state():
    with pytest.raises(ValueError):
        make_state(origin=MigrationOrigin("ab", "vm0", "h")).encode()
    with pytest.raises(ValueError):
        make_state(origin=MigrationOrigin(ORIGIN.id, "vm 0", "h")).encode()


def test_one_daemon_pairs_the_source_with_the_destination():
    pairs = MigrationPairs()
    out = MigrationPeer(id="aa" * 16, at=1.0)
    assert pairs.pair(out) is out  # not adopted here (yet): another daemon, as far as this one knows
    pairs.arrived("dst", "bb" * 16)
    pairs.arrived("dst", "aa" * 16)  # dst's latest migration in replaces its previous one
    paired = pairs.pair(out)
    assert paired is not None and paired.vm == "dst" and paired.id == out.id and out.vm is None
    assert pairs.pair(MigrationPeer(id="bb" * 16)).vm is None
    assert "migrated out to another daemon" in render_detail(VmStatus(name="src", migrated_to=out).to_json())
    assert "migrated in from VM src on an unknown host" in render_detail(
        VmStatus(name="dst", migrated_from=MigrationPeer(id="aa" * 16, vm="src")).to_json())


@pytest.mark.parametrize("peer,ok", [
    (None, True),
    (MigrationPeer(id="aa" * 16, vm="vm0", host="h"), True),
    (MigrationPeer(id="AA" * 16), False),  # not how a daemon writes it
    (MigrationPeer(id="aa" * 15), False),
    (MigrationPeer(id="zz" * 16), False),
    (MigrationPeer(id="aa" * 16, vm="\x1b]0;x"), False),
    (MigrationPeer(id="aa" * 16, host="a b"), False),
])
def test_a_worker_reports_only_peers_a_daemon_makes(peer, ok):
    assert valid_peer(peer) is ok


# ------------------------------------------------------------------ adoption


class Ram:
    """A memfd standing for guest RAM, as GuestMemory maps it."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("ram", os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        self.size = size
        self.map = mmap.mmap(self.fd, size)

    def memory(self) -> GuestMemory:
        memory = GuestMemory()
        memory.add(MemoryRegion(0, self.size, 0x7F0000000000, 0), os.dup(self.fd))
        return memory

    def allocated(self) -> int:
        return os.fstat(self.fd).st_blocks * 512


def test_the_destination_tracks_the_frames_and_discards_them_at_the_start():
    """Adopted frames are tracked at once, with the config and settings that
    travelled, and the RAM QEMU wrote for them is discarded only once the
    device runs (all of it has arrived then)."""
    ram = Ram(64 << 20)
    ram.map[:] = b"\x5a" * len(ram.map)  # what loading the migration stream allocated
    state = make_state(runs=((256, 1024), (4096, 512)), features=1 << 32 | 1, inflate_base=7)
    device = BalloonDevice(DeviceSettings(stats_interval=5.0))
    adopted = []
    device.on_adopted = lambda pages, interval, origin: adopted.append((pages, interval))
    device.load_state(state.encode())
    assert adopted == [(5000, 2.5)]
    assert device.config.num_pages == 5000 and device.config.actual == 4000 and device.config.poison_val == 0xAA
    assert device.counters.migrations_in == 1
    device.set_features(1 << 32 | 1)  # VERSION_1, MUST_TELL_HOST
    device.set_memory(ram.memory())
    assert len(device.tracker) == 1536 and device.tracker.runs() == [(256, 1024), (4096, 512)]
    assert ram.allocated() == 64 << 20  # nothing discarded before the start
    device.started()
    assert ram.allocated() == (64 << 20) - 1536 * PAGE
    assert ram.map[255 * PAGE] == 0x5A and ram.map[256 * PAGE] == 0  # the neighbour is untouched
    assert device.save_state() and MigrationState.decode(device.save_state()).runs == state.runs


def test_without_must_tell_host_the_adopted_frames_are_not_discarded():
    """A driver without MUST_TELL_HOST may be using frames it ballooned
    (it needs no deflate to take them back): the destination tracks them but
    never discards them."""
    ram = Ram(16 << 20)
    ram.map[:] = b"\x5a" * len(ram.map)
    device = BalloonDevice(DeviceSettings())
    device.load_state(make_state(runs=((256, 100),), features=1 << 32).encode())
    device.set_features(1 << 32)  # VERSION_1 only
    device.set_memory(ram.memory())
    device.started()
    assert len(device.tracker) == 100
    assert ram.allocated() == 16 << 20


def test_frames_outside_the_destination_ram_are_not_adopted():
    ram = Ram(16 << 20)
    ram.map[:] = b"\x5a" * len(ram.map)
    device = BalloonDevice(DeviceSettings())
    device.load_state(make_state(runs=((256, 10), (8192, 10))).encode())  # 8192 is past 16 MiB
    device.set_features(1 << 32 | 1)
    device.set_memory(ram.memory())
    device.started()
    assert len(device.tracker) == 0
    assert ram.allocated() == 16 << 20


def test_features_this_daemon_does_not_offer_refuse_the_state():
    device = BalloonDevice(DeviceSettings(migrate_extension=False))
    with pytest.raises(ValueError, match="does not offer"):
        device.load_state(make_state().encode())
    assert device.counters.migrations_in == 0


def test_the_source_discards_its_balloon_again_when_logging_ends():
    """Reading RAM for a migration allocates every ballooned page again (a
    hole in a shared memory file reads as a new page): when the VM stays
    (logging off), the balloon is discarded again."""
    ram = Ram(16 << 20)
    device = BalloonDevice(DeviceSettings(discard_max_delay=0))
    device.set_features(1 << 32 | 1)
    device.set_memory(ram.memory())
    device.started()
    device.tracker.inflate(range(256, 512))
    ram.map[:] = b"\x01" * len(ram.map)  # QEMU's migration read every page
    device.logging_changed(True)
    assert ram.allocated() == 16 << 20
    device.logging_changed(False)
    assert ram.allocated() == (16 << 20) - 256 * PAGE
    assert device.counters.rediscards_after_migration == 1


def test_the_runs_a_state_carries_are_exactly_the_tracked_frames():
    """PfnTracker.runs() scans whole bytes (it runs while a migrating VM is
    stopped): it must give the very frames iteration gives, coalesced."""
    import random

    from balloond.device.tracker import PfnTracker

    rng = random.Random(7)
    for _ in range(40):
        tracker = PfnTracker([(0, 70000), (1 << 20, 200000)])
        frames: set[int] = set()
        for _ in range(rng.randint(0, 40)):
            first = rng.choice([rng.randrange(70000), (1 << 20) + rng.randrange(200000)])
            frames.update(p for p in range(first, first + rng.randint(1, 3000)) if tracker.in_ram(p))
        frames.update(rng.sample(range(70000), rng.randint(0, 2000)))
        tracker.inflate(sorted(frames))
        runs = tracker.runs()
        assert [p for first, count in runs for p in range(first, first + count)] == sorted(frames)
        assert all(a[0] + a[1] < b[0] for a, b in zip(runs, runs[1:])), "runs not coalesced"
        assert MigrationState.decode(make_state(runs=tuple(runs)).encode()).runs == tuple(runs)
