"""Hostile frontends and guests.

What a broken or malicious peer sends is dropped and counted; the daemon
stays up, keeps serving the other VM (a bystander on vm1 works throughout),
leaks no fds, and never discards a page the guest did not put in the balloon
(sentinel pages keep their contents; the memfd's allocation only drops by
what was legitimately ballooned).
"""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest

from protocol import extension as ext
from protocol import vhost_user as vu
from protocol.balloon import Feature, QueueRole
from protocol.vhost_user import Request
from protocol.virtqueue import DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from tests.frontend import PAGE_SIZE, GuestRam, TestFrontend

PAGE = PAGE_SIZE
SENTINEL_OFFSET = 8192  # pages past first_free_pfn
SENTINEL_PAGES = 1024


@pytest.fixture
def bystander(connect, daemon):
    """vm1, running next to the victim; `check()` proves it still works."""
    fe = connect("vm1")
    first = fe.first_free_pfn
    fe.ram.touch(range(first, first + 64))
    state = {"round": 0}

    def check():
        pfn = first + state["round"] % 64
        state["round"] += 1
        fe.inflate([pfn])
        fe.deflate([pfn])
        assert daemon.api.vm("vm1")["running"]

    check()
    fe.check = check
    return fe


@pytest.fixture
def victim(connect, daemon, bystander, settled):
    """vm0, started, with sentinel pages and a few ballooned ones (discarded
    before the test starts, so its measurements see only its own effects)."""
    ram = GuestRam(64 << 20)
    fe = connect("vm0", ram=ram)
    s0 = fe.first_free_pfn + SENTINEL_OFFSET
    fe.sentinel = range(s0, s0 + SENTINEL_PAGES)
    fe.ram.fill(fe.sentinel, seed=0x5E)
    fe.ballooned = list(range(fe.first_free_pfn, fe.first_free_pfn + 32))
    fe.ram.touch(fe.ballooned)
    fe.inflate(fe.ballooned)
    settled()
    yield fe
    try:
        settled()  # a discard the test wrongly caused would be done by now
        assert ram.damaged(fe.sentinel, seed=0x5E) == [], "a page outside the balloon lost its contents"
        bystander.check()
    finally:
        fe.close()
        ram.close()


def counters(daemon, vm="vm0"):
    return daemon.api.vm(vm)["counters"]


# ======================================================= protocol violations


def _pipe_fd():
    r, w = os.pipe()
    os.close(w)
    return r


def _eventfd():
    return os.eventfd(0, os.EFD_CLOEXEC)


def _fatal_cases():
    """(name, action(fe) -> fds to close afterwards)."""
    mem_table = Request.SET_MEM_TABLE

    def oversized(fe):
        fe.send(Request.SET_CONFIG, b"\0" * (vu.MAX_PAYLOAD + 1))

    def huge_size(fe):
        fe.send(Request.GET_FEATURES, size=0xFFFFFFFF)

    def bad_version(fe):
        fe.send(Request.GET_FEATURES, flags=0x2)

    def no_version(fe):
        fe.send(Request.GET_FEATURES, flags=0x0)

    def reply_flag(fe):
        fe.send(Request.SET_OWNER, flags=vu.VERSION | vu.FLAG_REPLY)

    def fd_on_get_features(fe):
        fd = _eventfd()
        fe.send(Request.GET_FEATURES, fds=[fd])
        return [fd]

    def kick_without_fd(fe):
        fe.send(Request.SET_VRING_KICK, vu.encode_vring_file(0, True))

    def kick_polling_mode(fe):
        fe.send(Request.SET_VRING_KICK, vu.encode_vring_file(0, False))

    def call_with_two_fds(fe):
        fds = [_eventfd(), _eventfd()]
        fe.send(Request.SET_VRING_CALL, vu.encode_vring_file(0, True), fds)
        return fds

    def call_nofd_with_fd(fe):
        fd = _eventfd()
        fe.send(Request.SET_VRING_CALL, vu.encode_vring_file(0, False), [fd])
        return [fd]

    def mem_table_missing_fd(fe):
        fe.send(mem_table, vu.encode_mem_table(fe.memory_regions()), [fe.ram.fd], need_reply=True)

    def mem_table_beyond_fd(fe):
        region = vu.MemoryRegion(0, fe.ram.file_size + 16 * PAGE, fe.uaddr_base, 0)
        fe.send(mem_table, vu.encode_mem_table([region]), [fe.ram.fd], need_reply=True)

    def mem_table_offset_beyond_fd(fe):
        region = vu.MemoryRegion(0, 1 << 20, fe.uaddr_base, fe.ram.file_size)
        fe.send(mem_table, vu.encode_mem_table([region]), [fe.ram.fd], need_reply=True)

    def mem_table_zero_regions(fe):
        fe.send(mem_table, vu.MEM_TABLE_HEAD.pack(0, 0), need_reply=True)

    def mem_table_nine_regions(fe):
        regions = [vu.MemoryRegion(i << 20, 1 << 20, fe.uaddr_base + (i << 20), i << 20) for i in range(9)]
        fe.send(mem_table, vu.encode_mem_table(regions), [fe.ram.fd] * 8, need_reply=True)

    def mem_table_overlap(fe):
        regions = [vu.MemoryRegion(0, 2 << 20, fe.uaddr_base, 0), vu.MemoryRegion(1 << 20, 2 << 20, fe.uaddr_base, 0)]
        fe.send(mem_table, vu.encode_mem_table(regions), [fe.ram.fd] * 2, need_reply=True)

    def mem_table_pipe(fe):
        fd = _pipe_fd()
        region = vu.MemoryRegion(0, 1 << 20, fe.uaddr_base, 0)
        fe.send(mem_table, vu.encode_mem_table([region]), [fd], need_reply=True)
        return [fd]

    def mem_table_size_overflow(fe):
        region = vu.MemoryRegion((1 << 64) - PAGE, 2 * PAGE, fe.uaddr_base, 0)
        fe.send(mem_table, vu.encode_mem_table([region]), [fe.ram.fd], need_reply=True)

    def nine_fds(fe):
        fds = [_eventfd() for _ in range(9)]
        fe.send(Request.SET_VRING_CALL, vu.encode_vring_file(0, True), fds)
        return fds

    def unoffered_feature(fe):
        fe.send(Request.SET_FEATURES, struct.pack("<Q", fe.device_features | (1 << Feature.FREE_PAGE_HINT)))

    def unoffered_protocol_feature(fe):
        fe.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << 16))

    def vring_num_not_power_of_two(fe):
        fe.send(Request.SET_VRING_NUM, vu.VringState(0, 100).encode())

    def vring_index_out_of_range(fe):
        fe.send(Request.SET_VRING_NUM, vu.VringState(200, 128).encode())

    def vring_addr_short(fe):
        fe.send(Request.SET_VRING_ADDR, b"\0" * 20)

    def enable_with_two(fe):
        fe.send(Request.SET_VRING_ENABLE, vu.VringState(0, 2).encode(), need_reply=True)

    def config_window_outside(fe):
        fe.send(Request.SET_CONFIG, vu.ConfigSpace(250, 16, 0, bytes(16)).encode(), need_reply=True)

    def config_size_mismatch(fe):
        fe.send(Request.GET_CONFIG, vu.CONFIG_HEAD.pack(0, 16, 0) + bytes(8))

    def add_mem_reg_overlap(fe):
        region = fe.memory_regions()[-1]
        fe.send(Request.ADD_MEM_REG, vu.encode_single_region(region), [fe.ram.fd], need_reply=True)

    def rem_mem_reg_unknown(fe):
        region = vu.MemoryRegion(1 << 40, 1 << 20, 0x1234000, 0)
        fe.send(Request.REM_MEM_REG, vu.encode_single_region(region), need_reply=True)

    def backend_fd_not_socket(fe):
        fd = _eventfd()
        fe.send(Request.SET_BACKEND_REQ_FD, b"", [fd], need_reply=True)
        return [fd]

    def backend_fd_udp_socket(fe):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fe.send(Request.SET_BACKEND_REQ_FD, b"", [s.fileno()], need_reply=True)
        fd = os.dup(s.fileno())
        s.close()
        return [fd]

    def fds_mid_payload(fe):
        fd = _eventfd()
        fe.send_raw(vu.HEADER.pack(Request.SET_VRING_CALL, vu.VERSION, 8))
        fe.send_raw(struct.pack("<Q", 0), [fd])
        return [fd]

    return [(name, fn) for name, fn in locals().items() if callable(fn) and name != "mem_table"]


FATAL = _fatal_cases()


@pytest.mark.parametrize("name, action", FATAL, ids=[n for n, _ in FATAL])
def test_protocol_violation_drops_only_that_connection(daemon, connect, bystander, victim, name, action):
    fds = action(victim) or []
    try:
        assert victim.hung_up(3), f"{name}: the daemon kept a connection that broke the protocol"
    finally:
        for fd in fds:
            os.close(fd)
    state = daemon.wait_vm("vm0", lambda s: not s["connected"])
    assert state["last_disconnect"]["reason"]
    bystander.check()
    # The VM's socket serves the next frontend normally.
    victim.close()
    fe = connect("vm0")
    fe.ram.touch(range(fe.first_free_pfn, fe.first_free_pfn + 4))
    fe.inflate(range(fe.first_free_pfn, fe.first_free_pfn + 4))


def test_protocol_violations_leak_no_fds(daemon, connect, bystander):
    daemon.wait_disconnected("vm0")
    baseline = daemon.fd_count()
    for name, action in FATAL:
        fe = TestFrontend(daemon.sockets["vm0"], timeout=3)
        fe.start()
        fds = action(fe) or []
        assert fe.hung_up(3), name
        for fd in fds:
            os.close(fd)
        fe.close()
        daemon.wait_disconnected("vm0")
    daemon.wait_for(lambda: daemon.fd_count() <= baseline, 3, f"the daemon's fds back to {baseline}")


# ================================================== refused but not fatal


@pytest.mark.parametrize("code", [0, 44, 999, 0xFFFFFFFF])
def test_unknown_request_is_refused_without_dropping(daemon, victim, code):
    victim.send(code, b"\0" * 16)  # no reply asked: silently ignored
    victim.send(code, b"\0" * 16, need_reply=True)
    reply = victim.recv_message()
    assert (reply.request, reply.flags) == (code, vu.VERSION | vu.FLAG_REPLY)
    assert len(reply.payload) == 8 and struct.unpack("<Q", reply.payload)[0] != 0
    assert victim.get_u64(Request.GET_FEATURES) == victim.device_features
    victim.inflate([victim.first_free_pfn + 100])
    assert daemon.api.vm("vm0")["connected"]


def test_unsupported_requests_with_fds_leak_nothing(daemon, victim):
    before = daemon.fd_count()
    for _ in range(20):
        for request in (Request.SET_LOG_FD, Request.SET_INFLIGHT_FD, Request.GPU_SET_SOCKET):
            fd = _eventfd()
            victim.send(request, struct.pack("<QQ", 0, 0), [fd], need_reply=True)
            os.close(fd)
            reply = victim.recv_message()
            assert reply.request == request and struct.unpack("<Q", reply.payload)[0] != 0
    assert daemon.fd_count() <= before
    victim.inflate([victim.first_free_pfn + 100])


# ============================================================ hostile rings


def raw_chain(fe, role, descs, token="raw"):
    """Publish a hand-written chain: descs are (addr, length, flags, next) with
    `next` a position in `descs` (or any raw index, as an ("index", n) pair)."""
    q = fe.queue(role)
    idx = q.alloc_desc(len(descs), token)
    for i, (addr, length, flags, nxt) in enumerate(descs):
        if isinstance(nxt, tuple):
            nxt = nxt[1]
        elif flags & VRING_DESC_F_NEXT:
            nxt = idx[nxt]
        q.write_desc(idx[i], addr, length, flags, nxt)
    q.put_avail(idx[0])
    q.always_kick = True  # see test_rejected_chain_keeps_the_ring_alive for why
    q.kick()
    return idx[0]


def wait_errors(daemon, n, vm="vm0"):
    return daemon.wait_vm(vm, lambda s: s["counters"]["guest_errors"] >= n, what=f"{n} guest errors")


def returned(fe, role, head, timeout=3.0):
    """The used entry of `head` once the device returns it (None if it does not).

    Used entries of other heads seen meanwhile are kept for later calls.
    """
    q = fe.queue(role)
    seen = q.__dict__.setdefault("seen_used", {})
    deadline = time.monotonic() + timeout
    while True:
        for u in q.get_used():
            seen[u.head] = u
        if head in seen:
            return seen.pop(head)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def test_pfns_outside_ram_are_refused(daemon, victim, settled):
    fe = victim
    good = [fe.first_free_pfn + 200, fe.first_free_pfn + 201]
    fe.ram.touch(good)
    end_pfn = fe.ram.regions[-1].end >> 12
    before = fe.ram.allocated_bytes()
    fe.inflate([good[0], 0xA0, 0xBF, end_pfn, end_pfn + 12345, 0xFFFFFFFF, good[1]])
    settled()
    assert before - fe.ram.allocated_bytes() == 2 * PAGE
    c = counters(daemon)
    assert c["invalid_pfn"] == 5
    assert daemon.api.pfn_set("vm0") == set(fe.ballooned) | set(good)
    fe.deflate([0xA5, end_pfn + 1])
    assert counters(daemon)["invalid_pfn"] == 7


def test_double_inflate_and_stray_deflate(daemon, victim):
    fe = victim
    before = fe.ram.allocated_bytes()
    fe.inflate(fe.ballooned[:10])
    stray = [fe.sentinel[0], fe.sentinel[1]]
    fe.deflate(stray)
    c = counters(daemon)
    assert c["double_inflate"] == 10 and c["stray_deflate"] == 2
    assert fe.ram.allocated_bytes() == before
    assert daemon.api.pfn_set("vm0") == set(fe.ballooned)


@pytest.mark.parametrize(
    "where",
    ["past-the-end", "vga-hole", "crossing-region-end", "wrapping-64-bit", "frontend-address"],
)
def test_descriptor_outside_ram(daemon, victim, where):
    fe = victim
    end = fe.ram.regions[-1].end
    addr, length = {
        "past-the-end": (end + PAGE, 1024),
        "vga-hole": (0xA0000, 1024),
        "crossing-region-end": (0xA0000 - 512, 1024),
        "wrapping-64-bit": ((1 << 64) - 512, 1024),
        "frontend-address": (fe.uaddr(fe.aux_gpa(QueueRole.INFLATE)), 1024),
    }[where]
    before = fe.ram.allocated_bytes()
    head = raw_chain(fe, QueueRole.INFLATE, [(addr, length, 0, 0)])
    wait_errors(daemon, 1)
    used = returned(fe, QueueRole.INFLATE, head)
    assert used is not None and used.length == 0, "a bad buffer must still be returned"
    assert fe.ram.allocated_bytes() == before
    fe.inflate([fe.first_free_pfn + 300])  # the queue still works
    assert daemon.api.pfns("vm0")["count"] == len(fe.ballooned) + 1


def test_looping_and_broken_chains(daemon, victim):
    fe = victim
    buf = fe.aux_gpa(QueueRole.INFLATE)
    fe.ram.write(buf, struct.pack("<I", fe.sentinel[0]))  # would be a disaster if inflated
    heads = [
        raw_chain(fe, QueueRole.INFLATE, [(buf, 4, VRING_DESC_F_NEXT, 1), (buf, 4, VRING_DESC_F_NEXT, 0)]),  # loop
        raw_chain(fe, QueueRole.INFLATE, [(buf, 4, VRING_DESC_F_NEXT, 0)]),  # self loop
        raw_chain(fe, QueueRole.INFLATE, [(buf, 4, VRING_DESC_F_NEXT, ("index", 500))]),  # next past the table
        # device-readable after device-writable
        raw_chain(fe, QueueRole.INFLATE, [(buf, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1), (buf, 4, 0, 0)]),
        raw_chain(fe, QueueRole.INFLATE, [(buf, 3, 0, 0)]),  # not a whole PFN
    ]
    wait_errors(daemon, len(heads))
    for head in heads:
        used = returned(fe, QueueRole.INFLATE, head)
        assert used is not None and used.length == 0
    assert fe.sentinel[0] not in daemon.api.pfn_set("vm0")
    fe.inflate([fe.first_free_pfn + 301])
    assert daemon.api.pfns("vm0")["count"] == len(fe.ballooned) + 1


def test_indirect_abuse(daemon, victim):
    fe = victim
    buf = fe.aux_gpa(QueueRole.INFLATE)
    fe.ram.write(buf, struct.pack("<I", fe.sentinel[1]))
    table = buf + 512
    inner = buf + 1024
    fe.ram.write(inner, DESC.pack(buf, 4, 0, 0))
    fe.ram.write(table, DESC.pack(inner, 16, VRING_DESC_F_INDIRECT, 0))  # nested
    big = (fe.sentinel[0] - 64) << 12  # a table of 4096 descriptors (> queue size), looping
    fe.ram.write(big, DESC.pack(big, 16, VRING_DESC_F_NEXT, 0) * 4096)
    end = fe.ram.regions[-1].end
    cases = [
        [(table, 16, VRING_DESC_F_INDIRECT, 0)],  # nested indirect
        [(inner, 15, VRING_DESC_F_INDIRECT, 0)],  # not a whole number of descriptors
        [(inner, 0, VRING_DESC_F_INDIRECT, 0)],  # empty
        [(end - 8, 16, VRING_DESC_F_INDIRECT, 0)],  # table crossing the end of RAM
        [(big, 4096 * 16, VRING_DESC_F_INDIRECT, 0)],  # longer than the queue
        [(inner, 16, VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT, 1), (buf, 4, 0, 0)],  # indirect + next
    ]
    heads = [raw_chain(fe, QueueRole.INFLATE, c) for c in cases]
    wait_errors(daemon, len(cases))
    for head in heads:
        assert returned(fe, QueueRole.INFLATE, head) is not None
    assert daemon.api.pfn_set("vm0") == set(fe.ballooned)
    fe.ram.fill(range(fe.sentinel[0] - 64, fe.sentinel[0]), seed=0x5E)
    # A well-formed indirect chain is fine.
    fe.ram.touch([fe.first_free_pfn + 400])
    fe.ram.write(table, DESC.pack(buf, 4, 0, 0))
    fe.ram.write(buf, struct.pack("<I", fe.first_free_pfn + 400))
    head = raw_chain(fe, QueueRole.INFLATE, [(table, 16, VRING_DESC_F_INDIRECT, 0)])
    assert returned(fe, QueueRole.INFLATE, head) is not None
    assert fe.first_free_pfn + 400 in daemon.api.pfn_set("vm0")


def test_a_buffer_the_extension_allows_is_taken_whole_and_a_larger_one_refused(daemon, victim):
    """A driver that negotiated the extension may send ext.PFNS_PER_BUFFER
    frames in one inflate buffer (balloond_ext.h), four times Linux's 256:
    such a buffer is taken whole. One frame more is refused whole, as any
    buffer over the limit: a cut-off prefix could pass for a valid buffer."""
    fe = victim
    frames = list(range(fe.first_free_pfn + 2000, fe.first_free_pfn + 2000 + ext.PFNS_PER_BUFFER + 1))
    assert frames[-1] < fe.sentinel[0]
    buf, rest = fe.aux_gpa(QueueRole.INFLATE), fe.aux_gpa(QueueRole.DEFLATE)
    assert ext.PFNS_PER_BUFFER * 4 == PAGE  # one page of the frontend's memory holds it
    fe.ram.write(buf, struct.pack(f"<{ext.PFNS_PER_BUFFER}I", *frames[:-1]))
    fe.ram.write(rest, struct.pack("<I", frames[-1]))
    errors = counters(daemon)["guest_errors"]

    head = raw_chain(fe, QueueRole.INFLATE, [(buf, PAGE, VRING_DESC_F_NEXT, 1), (rest, 4, 0, 0)])
    wait_errors(daemon, errors + 1)
    assert returned(fe, QueueRole.INFLATE, head) is not None
    assert daemon.api.pfn_set("vm0") == set(fe.ballooned)

    head = raw_chain(fe, QueueRole.INFLATE, [(buf, PAGE, 0, 0)])
    assert returned(fe, QueueRole.INFLATE, head) is not None
    assert daemon.api.pfn_set("vm0") == set(fe.ballooned) | set(frames[:-1])
    assert counters(daemon)["guest_errors"] == errors + 1
    fe.deflate(frames[:-1])
    assert daemon.api.pfn_set("vm0") == set(fe.ballooned)


def test_indirect_without_the_feature(daemon, connect, bystander):
    fe = connect(start=False)
    fe.start(fe.choose_features(drop=[Feature.RING_INDIRECT_DESC]))
    buf = fe.aux_gpa(QueueRole.INFLATE)
    fe.ram.write(buf + 64, DESC.pack(buf, 4, 0, 0))
    fe.ram.write(buf, struct.pack("<I", fe.first_free_pfn))
    head = raw_chain(fe, QueueRole.INFLATE, [(buf + 64, 16, VRING_DESC_F_INDIRECT, 0)])
    wait_errors(daemon, 1)
    assert returned(fe, QueueRole.INFLATE, head) is not None
    assert daemon.api.pfns("vm0")["count"] == 0
    bystander.check()


def test_head_index_out_of_range(daemon, victim):
    fe = victim
    q = fe.queue(QueueRole.INFLATE)
    q.put_avail(1000)  # a head past the descriptor table
    q.always_kick = True
    q.kick()
    wait_errors(daemon, 1)
    fe.inflate([fe.first_free_pfn + 302])  # the ring moved past it
    assert fe.first_free_pfn + 302 in daemon.api.pfn_set("vm0")


def test_avail_index_jump_then_recovery(daemon, victim):
    fe = victim
    q = fe.queue(QueueRole.INFLATE)
    good = q.avail_idx
    q.set_avail_idx(good + 1000)  # more entries than the queue holds
    q.always_kick = True
    q.kick()
    errors = wait_errors(daemon, 1)["counters"]["guest_errors"]
    # Further kicks are refused the same way, and nothing is inflated.
    q.kick(force=True)
    wait_errors(daemon, errors + 1)
    assert daemon.api.pfn_set("vm0") == set(fe.ballooned)
    # The driver repairs its index: service resumes.
    q.set_avail_idx(good)
    fe.ram.touch([fe.first_free_pfn + 303])
    fe.inflate([fe.first_free_pfn + 303])
    assert fe.first_free_pfn + 303 in daemon.api.pfn_set("vm0")
    fe.deflate(fe.ballooned)  # the other queues never noticed
    assert daemon.api.pfns("vm0")["count"] == 1


def test_hostile_reports(daemon, victim):
    fe = victim
    end = fe.ram.regions[-1].end
    before = fe.ram.allocated_bytes()
    q = fe.queue(QueueRole.REPORTING)
    q.always_kick = True
    heads = [
        raw_chain(fe, QueueRole.REPORTING, [(end, 2 << 20, VRING_DESC_F_WRITE, 0)]),
        raw_chain(fe, QueueRole.REPORTING, [(end - PAGE, 2 * PAGE, VRING_DESC_F_WRITE, 0)]),
        raw_chain(fe, QueueRole.REPORTING, [(0x9F000, 0x3000, VRING_DESC_F_WRITE, 0)]),  # into the VGA hole
        raw_chain(fe, QueueRole.REPORTING, [((1 << 64) - PAGE, 2 * PAGE, VRING_DESC_F_WRITE, 0)]),
    ]
    wait_errors(daemon, len(heads))
    for head in heads:
        assert returned(fe, QueueRole.REPORTING, head) is not None
    assert fe.ram.allocated_bytes() == before
    assert daemon.api.vm("vm0")["reported_freed_bytes"] == 0


def test_hostile_migrate_buffers(daemon, victim):
    fe = victim
    gpa = fe.aux_gpa(QueueRole.MIGRATE)
    before = fe.ram.allocated_bytes()
    fe.ram.write(gpa, ext.MIGRATION.pack(fe.ballooned[0], fe.sentinel[0]) + b"\x01")
    h1 = raw_chain(fe, QueueRole.MIGRATE, [(gpa, 17, 0, 0)])  # partial record
    big = ext.MIGRATION.pack(fe.ballooned[0], fe.sentinel[0]) * (ext.MIGRATIONS_PER_BUFFER + 1)
    fe.ram.write(gpa, big)
    h2 = raw_chain(fe, QueueRole.MIGRATE, [(gpa, len(big), 0, 0)])  # too many records
    wait_errors(daemon, 2)
    assert returned(fe, QueueRole.MIGRATE, h1) is not None
    assert returned(fe, QueueRole.MIGRATE, h2) is not None
    assert fe.ram.allocated_bytes() == before
    assert daemon.api.pfn_set("vm0") == set(fe.ballooned)
    assert daemon.api.vm("vm0")["migrations"] == 0


def test_ring_addresses_outside_ram(daemon, connect, bystander):
    """SET_VRING_ADDR pointing outside guest RAM: the ring does not start,
    the connection and the daemon carry on."""
    fe = connect(start=False)
    fe.probe()
    good = fe.uaddr
    fe.uaddr = lambda gpa: good(gpa) + (1 << 40) if gpa == fe.queues[0].desc_gpa else good(gpa)
    fe.start()
    assert not daemon.api.vm("vm0")["running"]
    fe.uaddr = good
    fe.stop()
    fe.start()
    assert daemon.api.vm("vm0")["running"]
    fe.ram.touch([fe.first_free_pfn])
    fe.inflate([fe.first_free_pfn])
    bystander.check()


def test_memory_table_shrinking_under_a_running_device(daemon, victim):
    """The frontend remaps guest RAM smaller while rings and balloon use it."""
    fe = victim
    small = [vu.MemoryRegion(0, 0xA0000, fe.uaddr_base, 0)]  # only the low region
    fe.request(Request.SET_MEM_TABLE, vu.encode_mem_table(small), [fe.ram.fd])
    state = daemon.api.vm("vm0")
    assert state["connected"]
    assert state["guest_ram_bytes"] == 0xA0000
    assert state["ballooned_bytes"] == 0  # frames outside the new RAM left the balloon
    fe.send_memory()  # and back
    fe.stop()
    fe.start()
    fe.ram.touch([fe.first_free_pfn + 500])
    fe.inflate([fe.first_free_pfn + 500])
    assert daemon.api.vm("vm0")["running"]


# ====================================================== known daemon bugs


def test_rejected_chain_keeps_the_ring_alive(daemon, victim):
    """Linux-faithful driver: after the device rejects a buffer, it still must
    ask for the next kick (avail_event) and interrupt the driver."""
    fe = victim
    q = fe.queue(QueueRole.INFLATE)
    q.rekick_after = None  # exactly Linux: no second chances
    q.strict_interrupts = True
    buf = fe.aux_gpa(QueueRole.INFLATE)
    idx = q.alloc_desc(1, "bad")
    q.write_desc(idx[0], buf, 4, VRING_DESC_F_NEXT, idx[0])  # a descriptor chained to itself
    q.put_avail(idx[0])
    q.kick()
    used = q.wait(1, timeout=2)  # the driver asked for an interrupt
    assert used[0].head == idx[0]
    fe.inflate([fe.first_free_pfn + 304], timeout=2)  # kick decided by avail_event


def test_disable_enable_without_get_vring_base(daemon, victim):
    fe = victim
    fe.queue(QueueRole.INFLATE).rekick_after = None
    for i in range(fe.num_vqs):
        fe.request(Request.SET_VRING_ENABLE, vu.VringState(i, 0).encode())
    assert not daemon.api.vm("vm0")["running"]
    for i in range(fe.num_vqs):
        fe.request(Request.SET_VRING_ENABLE, vu.VringState(i, 1).encode())
    assert daemon.api.vm("vm0")["running"]
    fe.ram.touch([fe.first_free_pfn + 305])
    fe.inflate([fe.first_free_pfn + 305], timeout=2)
