"""A hostile frontend on vm0's socket, a well-behaved one on vm1's.

Each test mounts one measured attack on vm0 (fds the frontend shares and
then abuses, rings built to be expensive, memory tables built to be huge,
requests it never reads the replies of) and checks, while the attack is in
effect, that vm1 still inflates in its usual time, that the API answers
within a second, and that the daemon is alive and bounded afterwards.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from protocol.balloon import QueueRole
from tests import wire
from tests.daemon.harness import DaemonProcess
from tests.frontend import GuestRam, Request

EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE
API_DEADLINE = 1.0
#: vm1's inflate+deflate of one frame normally takes a few milliseconds.
BYSTANDER_DEADLINE = 0.5


@pytest.fixture
def bystander(connect):
    fe = connect("vm1")
    first = fe.first_free_pfn
    fe.ram.touch(range(first, first + 64))
    fe.round = 0
    return fe


def still_served(daemon: DaemonProcess, fe) -> None:
    """vm1 inflates and deflates a frame in its usual time; the API answers."""
    start = time.monotonic()
    daemon.api.vms()
    took = time.monotonic() - start
    assert took < API_DEADLINE, f"API took {took:.2f}s"
    pfn = fe.first_free_pfn + fe.round % 64
    fe.round += 1
    start = time.monotonic()
    fe.inflate([pfn])
    fe.deflate([pfn])
    took = time.monotonic() - start
    assert took < BYSTANDER_DEADLINE, f"vm1's inflate took {took:.2f}s"
    assert daemon.alive


def _pfn_buffer(fe, slot: int, pfns: list[int]) -> int:
    gpa = (fe.first_free_pfn + 1024 + slot) << 12
    fe.ram.write(gpa, struct.pack(f"<{len(pfns)}I", *pfns))
    return gpa


def test_a_frontend_cannot_shrink_guest_ram_under_the_daemon(daemon, connect, bystander, monkeypatch):
    real = os.memfd_create
    monkeypatch.setattr(os, "memfd_create", lambda name, flags=0: real(name, flags | os.MFD_ALLOW_SEALING))
    ram = GuestRam(64 << 20)
    monkeypatch.setattr(os, "memfd_create", real)
    fe = connect("vm0", ram=ram)
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(ram.fd, 0)
    except BaseException:
        os.ftruncate(ram.fd, ram.file_size)  # undo before this process touches it
        raise
    first = fe.first_free_pfn
    ram.touch(range(first, first + 4))
    fe.inflate(range(first, first + 4))  # the daemon touches the memfd: no SIGBUS
    still_served(daemon, bystander)
    fe.close()
    ram.close()


def test_a_call_eventfd_at_its_maximum_does_not_block_the_daemon(daemon, connect, bystander):
    """O_NONBLOCK belongs to the open file description, which the frontend
    shares: it is cleared on our copy only after the daemon took and set up
    the fd (REPLY_ACK of SET_VRING_CALL on a running ring), then the counter
    is filled. A daemon that writes without asking poll() first blocks in
    vm0's worker: vm0's next buffer is never returned."""
    fe = connect("vm0")
    index = fe.queue_index(QueueRole.INFLATE)
    q = fe.queue(QueueRole.INFLATE)
    stuck = os.eventfd(0, os.EFD_NONBLOCK)
    fe.request(Request.SET_VRING_CALL, wire.pack_vring_file(index, True), [stuck], ack=True)
    os.set_blocking(stuck, True)  # on the description the daemon shares, after it took the fd
    os.eventfd_write(stuck, EVENTFD_MAX)  # a write of 1 would now wait for a reader
    before = daemon.api.vm("vm0")["counters"]["calls_skipped"]
    for slot in range(2):  # the second buffer is only returned by a daemon the first did not block
        used = q.read_used_idx()
        pfn = fe.first_free_pfn + slot
        fe.ram.touch([pfn])
        q.submit([(_pfn_buffer(fe, slot, [pfn]), 4, False)])
        q.kick(force=True)
        daemon.wait_for(lambda: q.read_used_idx() != used, 2.0, f"buffer {slot} to be returned")
        still_served(daemon, bystander)
    state = daemon.wait_vm("vm0", lambda s: s["counters"]["calls_skipped"] >= before + 1, 2.0, "skipped calls")
    assert state.get("worker", {}).get("restarts", 0) == 0  # vm0's worker was never hung
    os.set_blocking(stuck, False)
    assert os.eventfd_read(stuck) == EVENTFD_MAX  # nothing was added
    time.sleep(0.2)
    with pytest.raises(BlockingIOError):  # and nothing is added later by a write that was waiting
        os.eventfd_read(stuck)
    os.close(stuck)


def test_a_full_blocking_backend_channel_does_not_block_the_daemon(daemon, connect, bystander):
    fe = connect("vm0")
    ours, shared = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fe.request(Request.SET_BACKEND_REQ_FD, b"", [shared.fileno()])
    # `shared` is the very file description the daemon writes to: fill the
    # daemon -> frontend direction through it (never read on `ours`), then
    # clear O_NONBLOCK on it.
    shared.setblocking(False)
    try:
        while True:
            shared.send(b"\0" * 4096)
    except BlockingIOError:
        pass
    shared.setblocking(True)
    start = time.monotonic()
    daemon.api.set_target("vm0", 16 << 20)
    assert time.monotonic() - start < API_DEADLINE
    still_served(daemon, bystander)
    since = getattr(daemon, "test_log_start", 0)
    daemon.wait_for(
        lambda: any(r.get("event", "").startswith("backend channel full") for r in daemon.log_records(since)),
        2.0,
        "the full channel to be noticed",
    )
    still_served(daemon, bystander)
    ours.close()
    shared.close()


@pytest.mark.parametrize("length", [0, 4], ids=["zero-length", "4-byte"])
def test_long_chains_in_every_slot_cost_a_bounded_time_per_turn(daemon, connect, bystander, length):
    """Queue size 1024; slot i holds head i, whose chain runs i -> 1023:
    half a million descriptors in one kick, served a budget at a time."""
    fe = connect("vm0", queue_size=1024)
    q = fe.queue(QueueRole.INFLATE)
    buf = _pfn_buffer(fe, 0, [0])
    for i in range(1024):
        q.write_desc(i, buf, length, 1 if i < 1023 else 0, i + 1 if i < 1023 else 0)
    for i in range(1024):
        q.put_avail(i)
    q.kick(force=True)
    deadline = time.monotonic() + 30
    while q.read_used_idx() < 1024:  # every chain is returned, good or bad
        assert time.monotonic() < deadline, f"only {q.read_used_idx()} chains returned"
        still_served(daemon, bystander)
    still_served(daemon, bystander)


def test_huge_sparse_memory_tables_are_refused_quickly(daemon, connect, bystander):
    rss = daemon.rss_bytes()
    for _ in range(3):
        fe = connect("vm0", start=False)
        fds = []
        for _ in range(2):
            fd = os.memfd_create("sparse", os.MFD_CLOEXEC)
            os.ftruncate(fd, 4 << 40)
            fds.append(fd)
        regions = [wire.MemRegion(i << 42, 4 << 40, (1 << 45) + (i << 42), 0) for i in range(2)]
        start = time.monotonic()
        fe.send(Request.SET_MEM_TABLE, wire.pack_mem_table(regions), fds)
        assert fe.hung_up(2.0)
        assert time.monotonic() - start < 1.0
        for fd in fds:
            os.close(fd)
        fe.close()
        daemon.wait_disconnected("vm0")
        still_served(daemon, bystander)
    assert daemon.rss_bytes() - rss < 16 << 20
    since = getattr(daemon, "test_log_start", 0)
    assert any("exceeds the guest RAM cap" in str(r.get("reason", "")) for r in daemon.log_records(since))


def test_a_frontend_that_never_reads_replies_cannot_grow_the_daemon(daemon, connect, bystander):
    fe = connect("vm0", start=False)
    sock = fe.sock
    sock.setblocking(False)
    request = wire.pack_header(Request.GET_FEATURES, wire.VERSION, 0) * 4096
    sent, stalled_since = 0, None
    rss = daemon.rss_bytes()
    while sent < 8 << 20:
        try:
            sent += sock.send(request)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 1.0:
                break
            time.sleep(0.01)
    still_served(daemon, bystander)
    assert sent < 2 << 20, f"the daemon kept reading: {sent} bytes of requests taken"
    assert daemon.rss_bytes() - rss < 8 << 20
    fe.close()


def test_a_flood_of_unsupported_requests_is_logged_rate_limited(daemon, connect, bystander):
    fe = connect("vm0", start=False)
    since = daemon.log_size()
    fe.send_raw(wire.pack_header(99, wire.VERSION, 0) * 20000)  # 240 KB
    fe.get_u64(Request.GET_FEATURES)  # all read and refused by now
    still_served(daemon, bystander)
    refused = [r for r in daemon.log_records(since) if str(r.get("event", "")).startswith("refused request")]
    assert 1 <= len(refused) <= 10
