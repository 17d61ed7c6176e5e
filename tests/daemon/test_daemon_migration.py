"""Live migration at the vhost-user level, against the real daemon: dirty
logging of used-ring writes, the device state saved on one VM's socket and
adopted on another's (as two QEMUs on one host would do it), and frontends
that break the protocol on the way.

The test frontend plays both QEMUs on one `GuestRam`: after the source's
save it hangs up and connects to the destination's socket with the same
driver state, as a guest that migrated would resume. Before the
destination starts, the test writes the ballooned frames (as QEMU's loading
of the migration stream allocates each as a zero page).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct
import zlib

import pytest

from balloond.device.migration_state import HEADER, MigrationOrigin, MigrationState
from balloond.services.cli import render_detail
from harness.daemon import DaemonProcess
from protocol.balloon import BalloonConfig
from tests import wire
from tests.daemon.conftest import ENGINES
from tests.frontend import FRONTEND_PROTOCOL_FEATURES, PAGE_SIZE, GuestRam, TestFrontend
from tests.wire import ProtocolFeature, Request

#: Both engines migrate the same way (the shared device state requests; the
#: dirty log kept by each engine's own rings).
DAEMON_ENGINES = ENGINES

MIGRATING = FRONTEND_PROTOCOL_FEATURES | wire.bits(ProtocolFeature.LOG_SHMFD, ProtocolFeature.DEVICE_STATE)
F_LOG_ALL = 26
LOG_BYTES = 1 << 20  # 32 GiB of guest-physical space
SAVE, LOAD = 0, 1
NOFD = 0x100


def sealed_log() -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("vhost-log", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, LOG_BYTES)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd, mmap.mmap(fd, LOG_BYTES)


def marked(log: mmap.mmap, gpa: int) -> bool:
    page = gpa // PAGE_SIZE
    return bool(log[page >> 3] & (1 << (page & 7)))


def start_logging(fe: TestFrontend) -> tuple[int, mmap.mmap]:
    """QEMU's log_global_start: the log, LOG_ALL, then each ring's log address."""
    fd, log = sealed_log()
    fe.send(Request.SET_LOG_BASE, wire.pack_u64(LOG_BYTES) + wire.pack_u64(0), [fd])
    assert wire.unpack_u64(fe.recv_reply(Request.SET_LOG_BASE, 8)) == 0
    assert fe.driver_features is not None
    fe.set_u64(Request.SET_FEATURES, fe.driver_features | (1 << wire.F_PROTOCOL_FEATURES) | (1 << F_LOG_ALL))
    for index, q in fe.queues.items():
        fe.request(Request.SET_VRING_ADDR, wire.pack_vring_addr(
            index, 1, desc=fe.uaddr(q.desc_gpa), used=fe.uaddr(q.used_gpa), avail=fe.uaddr(q.avail_gpa),
            log=q.used_gpa))
    return fd, log


def transfer_fd(fe: TestFrontend, direction: int, fd: int) -> int:
    fe.send(Request.SET_DEVICE_STATE_FD, wire.pack_u32(direction) + wire.pack_u32(0), [fd])
    return wire.unpack_u64(fe.recv_reply(Request.SET_DEVICE_STATE_FD, 8))


def check(fe: TestFrontend) -> int:
    fe.send(Request.CHECK_DEVICE_STATE)
    return wire.unpack_u64(fe.recv_reply(Request.CHECK_DEVICE_STATE, 8))


def save(fe: TestFrontend) -> bytes:
    r, w = os.pipe()
    try:
        assert transfer_fd(fe, SAVE, w) == NOFD  # accepted, no fd of its own
    finally:
        os.close(w)
    state = bytearray()
    while chunk := os.read(r, 1 << 16):
        state += chunk
    os.close(r)
    assert check(fe) == 0
    return bytes(state)


def load(fe: TestFrontend, state: bytes) -> int:
    r, w = os.pipe()
    try:
        assert transfer_fd(fe, LOAD, r) == NOFD
    finally:
        os.close(r)
    os.write(w, state)  # small enough for the pipe
    os.close(w)
    return check(fe)


@pytest.fixture
def ram():
    ram = GuestRam(64 << 20)
    yield ram
    ram.close()


def test_a_balloon_migrates_between_two_sockets(daemon, ram, settled):
    fe = TestFrontend(daemon.sockets["vm0"], ram=ram, protocol_features=MIGRATING)
    try:
        fe.start()
        daemon.api.set_target("vm0", 3000 * PAGE_SIZE)
        first = range(fe.first_free_pfn, fe.first_free_pfn + 2048)
        ram.touch(first)
        fe.inflate(first)
        fe.set_actual(2048)

        log_fd, log = start_logging(fe)
        assert daemon.api.vm("vm0")["migration"] == "logging"
        inflate_q = next(q for i, q in fe.queues.items() if fe.roles[i].value == "inflate")
        deflate_q = next(q for i, q in fe.queues.items() if fe.roles[i].value == "deflate")
        log[:] = bytes(LOG_BYTES)
        more = range(first[-1] + 1, first[-1] + 1 + 512)
        ram.touch(more)
        fe.inflate(more)
        assert marked(log, inflate_q.used_gpa), "the inflate ring's used ring was written but not logged"
        log[:] = bytes(LOG_BYTES)
        fe.deflate(range(first[0], first[0] + 256))
        assert marked(log, deflate_q.used_gpa)
        fe.set_actual(2048 + 512 - 256)
        settled("vm0")
        frames = daemon.api.pfn_set("vm0")
        assert len(frames) == 2304

        bases = fe.stop()
        state = save(fe)
        os.close(log_fd)
        src = daemon.api.vm("vm0")
        assert src["counters"]["migrations_out"] == 1
        origin = MigrationState.decode(state).origin
        assert origin is not None and origin.vm == "vm0" and origin.host == socket.gethostname()
        # Where it went is not known until a VM of this daemon adopts that state.
        assert src["migrated_to"] == {"id": origin.id, "vm": None, "host": None, "at": src["migrated_to"]["at"]}
        fe.close()  # the source QEMU, done (the guest's RAM lives on in `ram`)

        ram.touch(frames, value=0)  # QEMU's loading: a zero page for each, allocated
        before = ram.allocated_bytes()
        fe.socket_path = daemon.sockets["vm1"]
        fe.connect()
        assert load(fe, state) == 0
        fe.start()  # the rings resume at the source's indices
        assert {i: q.base for i, q in fe.queues.items()} == bases
        dst = settled("vm1")
        assert daemon.api.pfn_set("vm1") == frames
        assert dst["counters"]["migrations_in"] == 1
        assert dst["counters"]["driver_resets"] == 0
        assert fe.num_pages() == 3000  # the target travelled
        # ... and is the destination VM's target for the API, the policy and
        # a restarted worker, though no one set it on vm1.
        assert dst["target_bytes"] == 3000 * PAGE_SIZE and dst["stats_interval"] == src["stats_interval"]
        assert dst["migration"] is None
        assert "live migration: none now (0 out, 1 in)" in render_detail(dst)
        # Both ends named, paired by the migration's id.
        host = socket.gethostname()
        assert {k: dst["migrated_from"][k] for k in ("id", "vm", "host")} == {"id": origin.id, "vm": "vm0", "host": host}
        src = daemon.api.vm("vm0")
        assert {k: src["migrated_to"][k] for k in ("id", "vm", "host")} == {"id": origin.id, "vm": "vm1", "host": host}
        assert f"migrated in from VM vm0 on host {host}" in render_detail(dst)
        assert f"migrated out to VM vm1 on host {host}" in render_detail(src)
        assert before - ram.allocated_bytes() == len(frames) * PAGE_SIZE  # discarded again, once
        # The destination knows the source's frames: a deflate of one is taken.
        fe.deflate(range(first[-1] - 255, first[-1] + 1))
        assert len(daemon.api.pfn_set("vm1")) == 2048
        assert daemon.api.vm("vm1")["counters"]["stray_deflate"] == 0
        metrics = daemon.api.metrics().splitlines()
        for vm, kind in (("vm0", "migrations_out"), ("vm1", "migrations_in")):
            assert any(f'vm="{vm}"' in line and f'kind="{kind}"' in line and line.endswith(" 1.0")
                       for line in metrics), f"no {kind} count for {vm} in the metrics"
    finally:
        fe.close()


def test_a_frontend_without_the_features_gets_no_transfer_and_no_log(daemon, connect):
    fe = connect("vm0")  # LOG_SHMFD and DEVICE_STATE not negotiated
    r, w = os.pipe()
    assert transfer_fd(fe, SAVE, w) == NOFD | 1
    os.close(w)
    assert os.read(r, 10) == b""  # the daemon closed its copy of the pipe
    os.close(r)
    fd, _ = sealed_log()
    fe.send(Request.SET_LOG_BASE, wire.pack_u64(LOG_BYTES) + wire.pack_u64(0), [fd])
    os.close(fd)
    assert fe.hung_up()


def test_a_state_the_destination_refuses_fails_the_check_only(daemon, connect):
    fe = connect("vm1", start=False, protocol_features=MIGRATING)
    assert load(fe, b"not a balloon state") == 1
    r, w = os.pipe()
    assert transfer_fd(fe, LOAD, r) == NOFD
    os.close(r)
    os.write(w, b"half a state")
    assert check(fe) == 1, "a writer still open must fail the check, not hang it"
    os.close(w)
    for direction, phase in ((2, 0), (SAVE, 1)):
        r, w = os.pipe()
        fe.send(Request.SET_DEVICE_STATE_FD, wire.pack_u32(direction) + wire.pack_u32(phase), [w])
        assert wire.unpack_u64(fe.recv_reply(Request.SET_DEVICE_STATE_FD, 8)) == NOFD | 1
        os.close(w)
        os.close(r)
    assert check(fe) == 1  # no transfer under way
    before = daemon.fd_count()
    for _ in range(20):  # refused, accepted-then-refused: no pipe end is kept
        assert load(fe, b"garbage") == 1
        r, w = os.pipe()
        fe.send(Request.SET_DEVICE_STATE_FD, wire.pack_u32(LOAD) + wire.pack_u32(1), [r])
        assert wire.unpack_u64(fe.recv_reply(Request.SET_DEVICE_STATE_FD, 8)) == NOFD | 1
        os.close(r)
        os.close(w)
    assert daemon.fd_count() <= before
    fe.start()  # the connection is still good
    assert daemon.api.vm("vm1")["running"]
    assert daemon.api.vm("vm1")["counters"]["migrations_in"] == 0


@pytest.mark.parametrize("size", [0, 1 << 40])
def test_a_hostile_log_closes_the_connection(daemon, connect, size):
    fe = connect("vm0", protocol_features=MIGRATING)
    fd, _ = sealed_log()
    fe.send(Request.SET_LOG_BASE, wire.pack_u64(size) + wire.pack_u64(0), [fd])
    os.close(fd)
    assert fe.hung_up()
    assert daemon.alive


def test_an_unsealable_log_closes_the_connection(daemon, connect):
    fe = connect("vm0", protocol_features=MIGRATING)
    fd = os.memfd_create("log")  # no MFD_ALLOW_SEALING: the frontend could shrink it under us
    os.ftruncate(fd, LOG_BYTES)
    fe.send(Request.SET_LOG_BASE, wire.pack_u64(LOG_BYTES) + wire.pack_u64(0), [fd])
    os.close(fd)
    assert fe.hung_up()


def migrate_once(d: DaemonProcess, ram: GuestRam, frames: range) -> tuple[bytes, TestFrontend]:
    """vm0's balloon of `frames` saved and loaded on vm1; returns the state and vm1's frontend."""
    fe = TestFrontend(d.sockets["vm0"], ram=ram, protocol_features=MIGRATING)
    fe.start()
    ram.touch(frames)
    fe.inflate(frames)
    fe.stop()
    state = save(fe)
    fe.close()
    fe.socket_path = d.sockets["vm1"]
    fe.connect()
    assert load(fe, state) == 0
    fe.start()
    return state, fe


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_both_ends_are_named_and_a_source_that_runs_again_has_none_out(tmp_path, ram, isolation):
    """With workers and without (--vm-isolation none: the pairing in one
    process). A VM whose state was saved but that runs again on the source
    (the migration failed after the save) did not go anywhere."""
    d = DaemonProcess(tmp_path / "d", vms=("vm0", "vm1"), extra_args=["--vm-isolation", isolation])
    d.start()
    try:
        state, fe = migrate_once(d, ram, range(4096, 4096 + 64))
        origin = MigrationState.decode(state).origin
        assert origin is not None
        dst = d.api.vm("vm1")
        # With workers the supervisor pairs the ends once vm1's worker has
        # reported the adoption (its next report; a read of vm0 asks vm0's only).
        src = d.wait_vm("vm0", lambda s: s["migrated_to"]["vm"] is not None, 10, "the source paired")
        assert (src["migrated_to"]["id"], src["migrated_to"]["vm"]) == (origin.id, "vm1")
        assert (dst["migrated_from"]["id"], dst["migrated_from"]["vm"]) == (origin.id, "vm0")
        assert "migrated out to VM vm1" in render_detail(src)
        assert "migrated in from VM vm0" in render_detail(dst)
        fe.close()

        # Saved, then running again on vm0: no migration out any more.
        again = TestFrontend(d.sockets["vm0"], ram=ram, protocol_features=MIGRATING)
        again.start()
        again.stop()
        save(again)
        assert d.api.vm("vm0")["migrated_to"]["vm"] is None  # no VM here adopted this one
        again.start()
        assert d.api.vm("vm0")["migrated_to"] is None
        assert "migrated out" not in render_detail(d.api.vm("vm0"))
        again.close()
    finally:
        d.stop()


def test_a_state_with_a_hostile_origin_is_refused(daemon, connect):
    """The origin's names end up in logs, terminals and the API: one that is
    not a VM name fails the check like any malformed state."""
    origin = MigrationOrigin(id="ab" * 16, vm="vm0", host="h1")
    good = MigrationState(features=0, config=BalloonConfig(), stats_interval=0.0, inflate_base=None,
                          poison_known=False, guest_ram_bytes=0, runs=(), origin=origin).encode()
    bad = good.replace(b"\x03vm0", b"\x03\x1b[2")  # an escape sequence for a name
    body = bad[HEADER.size + 4:]
    bad = bad[:HEADER.size] + struct.pack("<I", zlib.crc32(body, zlib.crc32(bad[:HEADER.size]))) + body
    fe = connect("vm1", start=False, protocol_features=MIGRATING)
    assert load(fe, bad) == 1
    assert load(fe, good) == 0  # the same state with a VM's name is taken
