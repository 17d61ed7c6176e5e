"""Every wire layout against literal bytes written from its specification.

Why: round trips only prove that an encoder and its decoder agree with each
other, and the test frontend used to share the daemon's codecs, so a constant
flipped or two fields swapped in protocol/ passed every test below the
real-VM ones. Here each layout is a hex literal composed field by field from
the source document (QEMU's docs/interop/vhost-user.rst; virtio 1.x "Split
Virtqueues" and "Memory Balloon Device"; Linux's uapi virtio_balloon.h;
protocol/balloond_ext.h) and both codecs -- the daemon's (protocol/) and the
test frontend's own (tests/wire.py) -- must decode it to the stated values
and encode those values back to it. Neither is checked against the other.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from protocol import balloon as vb
from protocol import extension as ext
from protocol import vhost_user as vu
from protocol import virtqueue as vq
from protocol.errors import GuestAddressError
from tests import wire
from tests.frontend import DriverQueue, GuestRam


def h(text: str) -> bytes:
    """Hex with spaces between fields, as the literals below are written."""
    return bytes.fromhex(text)


def product_decode(data: bytes, fds: tuple[int, ...] = ()) -> vu.DecodedRequest:
    """Frame and decode one request with the daemon's reader (fds are fake
    numbers: decoding only counts them)."""
    messages = vu.MessageReader().feed(data, list(fds))
    assert len(messages) == 1
    return vu.decode_request(messages[0])


# ============================================================== vhost-user

# "Front-end message types" :id: values, and the back-end's.
REQUEST_IDS = {
    "GET_FEATURES": 1,
    "SET_FEATURES": 2,
    "SET_OWNER": 3,
    "RESET_OWNER": 4,
    "SET_MEM_TABLE": 5,
    "SET_LOG_BASE": 6,
    "SET_LOG_FD": 7,
    "SET_VRING_NUM": 8,
    "SET_VRING_ADDR": 9,
    "SET_VRING_BASE": 10,
    "GET_VRING_BASE": 11,
    "SET_VRING_KICK": 12,
    "SET_VRING_CALL": 13,
    "SET_VRING_ERR": 14,
    "GET_PROTOCOL_FEATURES": 15,
    "SET_PROTOCOL_FEATURES": 16,
    "GET_QUEUE_NUM": 17,
    "SET_VRING_ENABLE": 18,
    "SET_BACKEND_REQ_FD": 21,
    "GET_CONFIG": 24,
    "SET_CONFIG": 25,
    "RESET_DEVICE": 34,
    "VRING_KICK": 35,
    "GET_MAX_MEM_SLOTS": 36,
    "ADD_MEM_REG": 37,
    "REM_MEM_REG": 38,
    "SET_STATUS": 39,
    "GET_STATUS": 40,
    "SET_DEVICE_STATE_FD": 42,
    "CHECK_DEVICE_STATE": 43,
}
PROTOCOL_FEATURE_BITS = {
    "MQ": 0,
    "LOG_SHMFD": 1,
    "RARP": 2,
    "REPLY_ACK": 3,
    "MTU": 4,
    "BACKEND_REQ": 5,
    "CROSS_ENDIAN": 6,
    "CRYPTO_SESSION": 7,
    "PAGEFAULT": 8,
    "CONFIG": 9,
    "BACKEND_SEND_FD": 10,
    "HOST_NOTIFIER": 11,
    "INFLIGHT_SHMFD": 12,
    "RESET_DEVICE": 13,
    "INBAND_NOTIFICATIONS": 14,
    "CONFIGURE_MEM_SLOTS": 15,
    "STATUS": 16,
    "DEVICE_STATE": 19,
}


@pytest.mark.parametrize("name,number", sorted(REQUEST_IDS.items(), key=lambda kv: kv[1]))
def test_request_ids(name, number):
    assert vu.Request[name] == number
    assert wire.Request[name] == number


def test_every_request_the_daemon_serves_has_a_pinned_id():
    assert {r.name for r in vu.SUPPORTED_REQUESTS} <= set(REQUEST_IDS)


@pytest.mark.parametrize("name,bit", sorted(PROTOCOL_FEATURE_BITS.items(), key=lambda kv: kv[1]))
def test_protocol_feature_bits(name, bit):
    assert vu.ProtocolFeature[name] == bit
    assert wire.ProtocolFeature[name] == bit


def test_protocol_features_bit_and_backend_config_change_id():
    assert vu.F_PROTOCOL_FEATURES == wire.F_PROTOCOL_FEATURES == 30
    assert vu.BackendRequest.CONFIG_CHANGE_MSG == wire.BackendRequest.CONFIG_CHANGE_MSG == 2
    # The daemon's notification: request 2, version 1, no payload.
    literal = h("02000000 01000000 00000000")
    assert vu.encode_message(vu.BackendRequest.CONFIG_CHANGE_MSG, b"") == literal
    assert wire.pack_message(wire.BackendRequest.CONFIG_CHANGE_MSG) == literal
    assert wire.unpack_header(literal) == (2, 1, 0)


def test_header_of_a_request_without_payload():
    literal = h("01000000 01000000 00000000")  # GET_FEATURES, version 1, size 0
    decoded = product_decode(literal)
    assert decoded.request == 1 and decoded.message.flags == 1 and decoded.message.payload == b""
    assert vu.encode_message(vu.Request.GET_FEATURES) == literal
    assert wire.unpack_header(literal) == (1, 1, 0)
    assert wire.pack_message(wire.Request.GET_FEATURES) == literal


def test_reply_header_has_the_reply_bit_and_a_u64():
    # GET_FEATURES reply: flags = version 1 | reply 0x4; VERSION_1 (32),
    # PROTOCOL_FEATURES (30) and RING_EVENT_IDX (29) set.
    literal = h("01000000 05000000 08000000 00000060 01000000")
    features = (1 << 32) | (1 << 30) | (1 << 29)
    assert vu.encode_reply(vu.Message(1, 1), vu.encode_u64(features)) == literal
    assert wire.pack_message(1, wire.pack_u64(features), wire.VERSION | wire.FLAG_REPLY) == literal
    request, flags, size = wire.unpack_header(literal)
    assert (request, flags, size) == (1, 5, 8)
    assert wire.unpack_u64(literal[12:]) == features


def test_need_reply_bit_and_u64_payload():
    # SET_FEATURES with need_reply (0x8 | version 1), u64 VERSION_1 | PROTOCOL_FEATURES.
    literal = h("02000000 09000000 08000000 00000040 01000000")
    decoded = product_decode(literal)
    assert decoded.request is vu.Request.SET_FEATURES
    assert decoded.message.need_reply
    assert decoded.payload == vu.U64Payload(0x1_4000_0000)
    assert vu.encode_message(vu.Request.SET_FEATURES, vu.encode_u64(0x1_4000_0000), 0x9) == literal
    assert wire.pack_message(wire.Request.SET_FEATURES, wire.pack_u64(0x1_4000_0000), wire.VERSION | wire.FLAG_NEED_REPLY) == literal
    assert wire.Message(*wire.unpack_header(literal)[:2]).need_reply
    # The reply flag on a request is refused; the version bits are checked.
    with pytest.raises(vu.FrontendError):
        product_decode(h("02000000 05000000 08000000 00000040 01000000"))
    with pytest.raises(vu.FrontendError):
        product_decode(h("02000000 02000000 08000000 00000040 01000000"))


def test_vring_state():
    literal = h("08000000 01000000 08000000 02000000 00010000")  # SET_VRING_NUM index 2, num 256
    assert product_decode(literal).payload == vu.VringState(index=2, num=256)
    assert vu.encode_message(vu.Request.SET_VRING_NUM, vu.VringState(index=2, num=256).encode()) == literal
    assert wire.pack_message(wire.Request.SET_VRING_NUM, wire.pack_vring_state(2, 256)) == literal
    assert wire.unpack_vring_state(literal[12:]) == (2, 256)
    # GET_VRING_BASE reply: index 1, base 0x1234.
    reply = h("0b000000 05000000 08000000 01000000 34120000")
    assert vu.encode_reply(vu.Message(11, 1), vu.VringState(index=1, num=0x1234).encode()) == reply
    assert wire.unpack_vring_state(reply[12:]) == (1, 0x1234)


VRING_ADDR_MESSAGE = h(
    "09000000 01000000 28000000"  # SET_VRING_ADDR, version 1, 40 bytes
    " 01000000 00000000"  # index 1, flags 0
    " 0010000000 7f0000"  # descriptor table 0x7f0000001000
    " 0030000000 7f0000"  # used ring       0x7f0000003000
    " 0020000000 7f0000"  # available ring  0x7f0000002000
    " 0000000000000000"  # log 0
)


def test_vring_address_field_order():
    expected = vu.VringAddr(
        index=1,
        flags=0,
        desc_user_addr=0x7F00_0000_1000,
        used_user_addr=0x7F00_0000_3000,
        avail_user_addr=0x7F00_0000_2000,
        log_guest_addr=0,
    )
    assert product_decode(VRING_ADDR_MESSAGE).payload == expected
    assert vu.encode_message(vu.Request.SET_VRING_ADDR, expected.encode()) == VRING_ADDR_MESSAGE
    packed = wire.pack_vring_addr(1, 0, desc=0x7F00_0000_1000, used=0x7F00_0000_3000, avail=0x7F00_0000_2000)
    assert wire.pack_message(wire.Request.SET_VRING_ADDR, packed) == VRING_ADDR_MESSAGE
    assert wire.unpack_vring_addr(VRING_ADDR_MESSAGE[12:]) == {
        "index": 1,
        "flags": 0,
        "desc": 0x7F00_0000_1000,
        "used": 0x7F00_0000_3000,
        "avail": 0x7F00_0000_2000,
        "log": 0,
    }


def test_vring_file_index_and_invalid_fd_flag():
    kick = h("0c000000 01000000 08000000 03000000 00000000")  # SET_VRING_KICK queue 3, fd attached
    assert product_decode(kick, (99,)).payload == vu.VringFile(index=3, fd=99)
    assert vu.encode_vring_file(3, True) == kick[12:]
    assert wire.pack_vring_file(3, True) == kick[12:]
    call = h("0d000000 01000000 08000000 02010000 00000000")  # SET_VRING_CALL queue 2, bit 8: no fd
    assert product_decode(call).payload == vu.VringFile(index=2, fd=None)
    assert vu.encode_vring_file(2, False) == call[12:]
    assert wire.pack_vring_file(2, False) == call[12:]
    err = h("0e000000 01000000 08000000 ff010000 00000000")  # SET_VRING_ERR queue 255 (mask 0xff), no fd
    assert product_decode(err).payload == vu.VringFile(index=255, fd=None)
    assert vu.VRING_INDEX_MASK == wire.VRING_INDEX_MASK == 0xFF
    assert vu.VRING_NOFD_MASK == wire.VRING_NOFD == 0x100
    with pytest.raises(vu.FrontendError):  # bit 9 is reserved
        product_decode(h("0c000000 01000000 08000000 03020000 00000000"))


# QEMU's two x86 "pc" regions: below 640 KiB, and from 768 KiB on.
LOW_REGION = h("0000000000000000 00000a0000000000 000000503a7f0000 0000000000000000")
HIGH_REGION = h("00000c0000000000 0000f40300000000 00000c503a7f0000 00000c0000000000")
LOW = dict(guest_phys_addr=0, size=0xA0000, userspace_addr=0x7F3A_5000_0000, mmap_offset=0)
HIGH = dict(guest_phys_addr=0xC0000, size=0x3F40000, userspace_addr=0x7F3A_500C_0000, mmap_offset=0xC0000)


def test_memory_table():
    literal = h("05000000 01000000 48000000 02000000 00000000") + LOW_REGION + HIGH_REGION
    decoded = product_decode(literal, (50, 51))
    assert decoded.payload == vu.MemTable((vu.MemoryRegion(**LOW), vu.MemoryRegion(**HIGH)), (50, 51))
    assert vu.encode_mem_table([vu.MemoryRegion(**LOW), vu.MemoryRegion(**HIGH)]) == literal[12:]
    assert wire.pack_message(wire.Request.SET_MEM_TABLE, wire.pack_mem_table([wire.MemRegion(**LOW), wire.MemRegion(**HIGH)])) == literal
    assert wire.unpack_mem_table(literal[12:]) == [wire.MemRegion(**LOW), wire.MemRegion(**HIGH)]


@pytest.mark.parametrize("request_id,code", [("ADD_MEM_REG", "25000000"), ("REM_MEM_REG", "26000000")])
def test_single_region_has_a_u64_of_padding_first(request_id, code):
    literal = h(f"{code} 01000000 28000000 0000000000000000") + HIGH_REGION
    decoded = product_decode(literal, (60,))
    assert decoded.payload == vu.SingleRegion(vu.MemoryRegion(**HIGH), 60)
    assert vu.encode_single_region(vu.MemoryRegion(**HIGH)) == literal[12:]
    assert wire.pack_message(wire.Request[request_id], wire.pack_single_region(wire.MemRegion(**HIGH))) == literal


def test_config_space_message():
    get = h("18000000 01000000 1c000000 00000000 10000000 00000000") + bytes(16)  # offset 0, size 16, flags 0
    assert product_decode(get).payload == vu.ConfigSpace(offset=0, size=16, flags=0, data=bytes(16))
    assert vu.encode_message(vu.Request.GET_CONFIG, vu.ConfigSpace(0, 16, 0, bytes(16)).encode()) == get
    assert wire.pack_message(wire.Request.GET_CONFIG, wire.pack_config_space(0, 16, 0, bytes(16))) == get
    set_actual = h("19000000 01000000 10000000 04000000 04000000 00000000 05000000")  # offset 4, size 4: actual = 5
    assert product_decode(set_actual).payload == vu.ConfigSpace(offset=4, size=4, flags=0, data=h("05000000"))
    assert wire.unpack_config_space(set_actual[12:]) == (4, 4, 0, h("05000000"))
    assert wire.pack_message(wire.Request.SET_CONFIG, wire.pack_config_space(4, 4, 0, h("05000000"))) == set_actual


# ========================================================== split virtqueue

# Two chained descriptors: a 4 KiB device-readable buffer (NEXT -> 1), then a
# 32-byte device-writable one (WRITE, end of chain).
DESC_CHAIN = h(
    "0000200000000000 00100000 0100 0100"  # addr 0x200000, len 0x1000, flags NEXT, next 1
    " 0000300000000000 20000000 0200 0000"  # addr 0x300000, len 0x20, flags WRITE, next 0
)
# One descriptor pointing at an indirect table of 32 bytes at 0x400000.
DESC_INDIRECT = h("0000400000000000 20000000 0400 0000")
CHAIN_SEGMENTS = (vq.Segment(0x200000, 0x1000, False), vq.Segment(0x300000, 0x20, True))


class OneTable:
    """Guest memory holding only the indirect table at 0x400000."""

    def view(self, gpa: int, length: int) -> memoryview:
        if (gpa, length) != (0x400000, len(DESC_CHAIN)):
            raise GuestAddressError(f"unexpected access {gpa:#x}+{length}")
        return memoryview(bytearray(DESC_CHAIN))


def test_descriptor_flags_and_layout():
    assert (vq.VRING_DESC_F_NEXT, vq.VRING_DESC_F_WRITE, vq.VRING_DESC_F_INDIRECT) == (1, 2, 4)
    assert (wire.VRING_DESC_F_NEXT, wire.VRING_DESC_F_WRITE, wire.VRING_DESC_F_INDIRECT) == (1, 2, 4)
    assert vq.DESC_SIZE == wire.DESC_SIZE == 16
    chain = vq.walk_chain(memoryview(bytearray(DESC_CHAIN)), 2, 0, OneTable(), indirect_allowed=False)
    assert chain == vq.Chain(0, CHAIN_SEGMENTS, descriptors=2)
    assert vq.DESC.pack(0x200000, 0x1000, vq.VRING_DESC_F_NEXT, 1) + vq.DESC.pack(0x300000, 0x20, vq.VRING_DESC_F_WRITE, 0) == DESC_CHAIN
    assert wire.pack_desc(0x200000, 0x1000, wire.VRING_DESC_F_NEXT, 1) + wire.pack_desc(0x300000, 0x20, wire.VRING_DESC_F_WRITE, 0) == DESC_CHAIN
    assert wire.read_desc(DESC_CHAIN, 1) == (0x300000, 0x20, 2, 0)


def test_indirect_descriptor():
    table = memoryview(bytearray(DESC_INDIRECT + bytes(16)))  # a queue of 2: no chain may exceed it
    chain = vq.walk_chain(table, 2, 0, OneTable(), indirect_allowed=True)
    assert chain == vq.Chain(0, CHAIN_SEGMENTS, descriptors=3)  # the indirect head and its two
    assert vq.DESC.pack(0x400000, 0x20, vq.VRING_DESC_F_INDIRECT, 0) == DESC_INDIRECT
    assert wire.pack_desc(0x400000, 0x20, wire.VRING_DESC_F_INDIRECT, 0) == DESC_INDIRECT


def test_the_frontend_writes_the_same_descriptors_and_avail_entry():
    ram = GuestRam(4 << 20)
    try:
        q = DriverQueue(ram, 0, 4, 0x100000, event_idx=True)
        head = q.add([(0x200000, 0x1000, False), (0x300000, 0x20, True)], indirect=False)
        q.put_avail(head)
        assert head == 0
        assert bytes(q.desc[:32]) == DESC_CHAIN
        assert bytes(q.avail) == h("0000 0100 0000 0000 0000 0000 0000")  # flags 0, idx 1, ring[0] = 0
        q.suppress_interrupts()  # used_event = last_used - 1 = 0xffff, right after ring[3]
        assert bytes(q.avail[12:14]) == h("ffff")
        # Spec alignment of the three parts (virtio 1.x, "Virtqueues").
        assert q.desc_gpa % wire.DESC_ALIGN == 0 and q.avail_gpa % wire.AVAIL_ALIGN == 0 and q.used_gpa % wire.USED_ALIGN == 0
        assert (wire.DESC_ALIGN, wire.AVAIL_ALIGN, wire.USED_ALIGN) == (16, 2, 4)
    finally:
        ram.close()


def split_queue(avail: bytes, *, event_idx: bool) -> vq.SplitQueue:
    return vq.SplitQueue(
        4,
        memoryview(bytearray(64)),
        memoryview(bytearray(avail)),
        memoryview(bytearray(vq.used_ring_size(4, event_idx))),
        event_idx=event_idx,
        indirect=False,
    )


def test_ring_sizes():
    # avail: flags, idx, 4 entries, used_event; used: flags, idx, 4 x {id, len}, avail_event.
    assert vq.desc_table_size(4) == 64
    assert vq.avail_ring_size(4, True) == wire.avail_ring_size(4) == 14
    assert vq.used_ring_size(4, True) == wire.used_ring_size(4) == 38
    assert vq.avail_ring_size(4, False) == 12 and vq.used_ring_size(4, False) == 36


def test_avail_ring_entries_in_order():
    avail = h("0000 0300 0200 0000 0100 0000 0000")  # idx 3, ring [2, 0, 1, -]
    q = split_queue(avail, event_idx=False)
    assert [q.pop_head(), q.pop_head(), q.pop_head(), q.pop_head()] == [2, 0, 1, None]
    assert wire.read_u16(avail, wire.RING_IDX) == 3
    assert [wire.read_u16(avail, wire.avail_slot_offset(i)) for i in range(3)] == [2, 0, 1]


def test_no_interrupt_flag():
    assert vq.VRING_AVAIL_F_NO_INTERRUPT == wire.VRING_AVAIL_F_NO_INTERRUPT == 1
    quiet = split_queue(h("0100 0100 0000 0000 0000 0000 0000"), event_idx=False)
    quiet.pop_head()
    quiet.push(0, 0)
    assert not quiet.should_notify()
    loud = split_queue(h("0000 0100 0000 0000 0000 0000 0000"), event_idx=False)
    loud.pop_head()
    loud.push(0, 0)
    assert loud.should_notify()


def test_used_event_lives_after_the_avail_entries():
    # used_event = 1: the driver wants an interrupt once the used index passes 1.
    q = split_queue(h("0000 0200 0000 0100 0000 0000 0100"), event_idx=True)
    q.pop_head(), q.pop_head()
    q.push(0, 0)
    assert q.should_notify()  # the first signal is always sent
    q.push(1, 0)  # used index 1 -> 2 passes used_event 1
    assert q.should_notify()
    assert wire.used_event_offset(4) == 12


def test_used_ring_elements():
    q = split_queue(h("0000 0200 0200 0000 0000 0000 0000"), event_idx=True)
    q.pop_head(), q.pop_head()
    q.push(2, 0x10)
    q.push(0, 0x200)
    expected = h(
        "0000 0200"  # flags 0, idx 2
        " 02000000 10000000"  # {id 2, len 0x10}
        " 00000000 00020000"  # {id 0, len 0x200}
        " 00000000 00000000 00000000 00000000"
        " 0000"  # avail_event
    )
    assert bytes(q.used) == expected
    assert wire.read_u16(expected, wire.RING_IDX) == 2
    assert [wire.read_used_elem(expected, i) for i in range(2)] == [(2, 0x10), (0, 0x200)]


def test_no_notify_flag():
    assert vq.VRING_USED_F_NO_NOTIFY == wire.VRING_USED_F_NO_NOTIFY == 1
    q = split_queue(bytes(12), event_idx=False)
    q.disable_kicks()
    assert bytes(q.used[:2]) == h("0100")
    q.enable_kicks()
    assert bytes(q.used[:2]) == h("0000")


def test_avail_event_lives_after_the_used_elements():
    q = split_queue(h("0000 0300 0000 0100 0200 0000 0000"), event_idx=True)
    for _ in range(3):
        q.pop_head()
    q.enable_kicks()  # avail_event = 3: kick me when you add the entry after those seen
    assert bytes(q.used) == h("0000 0000") + bytes(32) + h("0300")
    q.disable_kicks()  # avail_event = 3 + 0x7fff: no kick for 32K buffers
    assert bytes(q.used) == h("0000 0000") + bytes(32) + h("0280")
    assert wire.avail_event_offset(4) == 36
    assert wire.read_u16(bytes(q.used), wire.avail_event_offset(4)) == 0x8002


# (event_idx, new_idx, old_idx) -> notify?  Computed by hand from
# (u16)(new - event - 1) < (u16)(new - old).
NEED_EVENT_TABLE = [
    (0, 1, 0, True),  # 0 < 1
    (1, 1, 0, False),  # 65535 < 1
    (5, 10, 5, True),  # 4 < 5: event at old
    (9, 10, 5, True),  # 0 < 5: event at new - 1
    (10, 10, 5, False),  # 65535 < 5: event at new, not yet passed
    (4, 10, 5, False),  # 5 < 5: event before old, already signalled
    (0, 0, 0, False),  # nothing moved
    (65535, 2, 65534, True),  # across the wrap: 2 < 4
    (1, 2, 65534, True),  # 0 < 4
    (2, 2, 65534, False),  # 65535 < 4
    (65533, 2, 65534, False),  # 4 < 4
    (65535, 0, 65535, True),  # 0 < 1: the move 65535 -> 0
    (0, 0, 65535, False),  # 65535 < 1
]


@pytest.mark.parametrize("event,new,old,expected", NEED_EVENT_TABLE)
def test_need_event(event, new, old, expected):
    assert vq.need_event(event, new, old) is expected
    assert wire.need_event(event, new, old) is expected


# ============================================================ virtio-balloon

FEATURE_BITS = {
    "MUST_TELL_HOST": 0,
    "STATS_VQ": 1,
    "DEFLATE_ON_OOM": 2,
    "FREE_PAGE_HINT": 3,
    "PAGE_POISON": 4,
    "REPORTING": 5,
    "RING_INDIRECT_DESC": 28,
    "RING_EVENT_IDX": 29,
    "VERSION_1": 32,
    "BALLOOND_MIGRATE_VQ": 62,
}
# Linux uapi virtio_balloon.h VIRTIO_BALLOON_S_*, under the daemon's names.
STAT_TAGS = {
    "SWAP_IN": 0,
    "SWAP_OUT": 1,
    "MAJOR_FAULTS": 2,
    "MINOR_FAULTS": 3,
    "FREE_MEMORY": 4,
    "TOTAL_MEMORY": 5,
    "AVAILABLE_MEMORY": 6,
    "DISK_CACHES": 7,
    "HUGETLB_ALLOCATIONS": 8,
    "HUGETLB_FAILURES": 9,
    "OOM_KILLS": 10,
    "ALLOC_STALLS": 11,
    "ASYNC_SCANS": 12,
    "DIRECT_SCANS": 13,
    "ASYNC_RECLAIMS": 14,
    "DIRECT_RECLAIMS": 15,
}


@pytest.mark.parametrize("name,bit", sorted(FEATURE_BITS.items(), key=lambda kv: kv[1]))
def test_balloon_feature_bits(name, bit):
    assert vb.Feature[name] == bit
    assert wire.Feature[name] == bit


@pytest.mark.parametrize("name,tag", sorted(STAT_TAGS.items(), key=lambda kv: kv[1]))
def test_stat_tags(name, tag):
    assert vb.StatTag[name] == tag
    assert wire.StatTag[name] == tag


def test_the_daemon_knows_no_stat_tag_beyond_the_pinned_ones():
    assert {t.name for t in vb.StatTag} == set(STAT_TAGS)


CONFIG = h("00010000 80000000 07000000 aa000000")  # num_pages 256, actual 128, cmd id 7, poison 0xaa


def test_config_layout():
    cfg = vb.BalloonConfig(num_pages=0x100, actual=0x80, free_page_hint_cmd_id=7, poison_val=0xAA)
    assert cfg.encode() == CONFIG
    assert (cfg.read(0, 4), cfg.read(4, 4), cfg.read(8, 4), cfg.read(12, 4)) == (CONFIG[0:4], CONFIG[4:8], CONFIG[8:12], CONFIG[12:16])
    assert (
        vb.BalloonConfig.OFFSET_NUM_PAGES,
        vb.BalloonConfig.OFFSET_ACTUAL,
        vb.BalloonConfig.OFFSET_FREE_PAGE_HINT_CMD_ID,
        vb.BalloonConfig.OFFSET_POISON_VAL,
    ) == (0, 4, 8, 12)
    assert vb.CONFIG_SIZE == wire.CONFIG_SIZE == 16
    # A driver write of the whole space takes actual and poison_val only.
    fresh = vb.BalloonConfig(num_pages=3)
    assert fresh.driver_write(0, CONFIG) == ["actual", "poison_val"]
    assert (fresh.num_pages, fresh.actual, fresh.free_page_hint_cmd_id, fresh.poison_val) == (3, 0x80, 0, 0xAA)
    # wire
    assert wire.BalloonConfig.decode(CONFIG) == wire.BalloonConfig(num_pages=0x100, actual=0x80, free_page_hint_cmd_id=7, poison_val=0xAA)
    assert wire.BalloonConfig(0x100, 0x80, 7, 0xAA).encode() == CONFIG
    assert (wire.OFFSET_NUM_PAGES, wire.OFFSET_ACTUAL, wire.OFFSET_FREE_PAGE_HINT_CMD_ID, wire.OFFSET_POISON_VAL) == (0, 4, 8, 12)


def test_stats_entries_are_packed_10_bytes():
    literal = h("0400 8967452301000000 0500 0000004000000000")  # free 0x123456789, total 1 GiB
    assert vb.decode_stats(literal) == {"free_memory": 0x1_2345_6789, "total_memory": 1 << 30}
    assert vb.encode_stats({vb.StatTag.FREE_MEMORY: 0x1_2345_6789, vb.StatTag.TOTAL_MEMORY: 1 << 30}) == literal
    assert vb.STAT.size == wire.STAT_SIZE == 10
    assert wire.unpack_stats(literal) == [(4, 0x1_2345_6789), (5, 1 << 30)]
    assert wire.pack_stats([(wire.StatTag.FREE_MEMORY, 0x1_2345_6789), (wire.StatTag.TOTAL_MEMORY, 1 << 30)]) == literal


def test_pfn_arrays_are_le32_4k_frames():
    literal = h("01000000 45230100 ffff0f00")
    assert list(vb.decode_pfns(literal)) == [1, 0x12345, 0xFFFFF]
    assert vb.encode_pfns([1, 0x12345, 0xFFFFF]) == literal
    assert wire.unpack_pfns(literal) == [1, 0x12345, 0xFFFFF]
    assert wire.pack_pfns([1, 0x12345, 0xFFFFF]) == literal
    assert vb.PFN_SHIFT == wire.PFN_SHIFT == 12 and vb.PAGE_SIZE == wire.PAGE_SIZE == 4096


@pytest.mark.parametrize(
    "features,order",
    [
        (0, ["inflate", "deflate"]),
        (0b10, ["inflate", "deflate", "stats"]),
        (0b1000, ["inflate", "deflate", "free_page_hint"]),
        (0b100000, ["inflate", "deflate", "reporting"]),
        (0b101010, ["inflate", "deflate", "stats", "free_page_hint", "reporting"]),
        (0b100010 | 1 << 62, ["inflate", "deflate", "stats", "reporting", "migrate"]),
        (0b111101 | 1 << 32 | 1 << 29, ["inflate", "deflate", "free_page_hint", "reporting"]),
    ],
)
def test_queue_order(features, order):
    assert [role.value for role in vb.queue_roles(features)] == order
    assert wire.queue_order(features) == order


# ================================================= balloond's own extension

MIGRATION = h("8877665544332211 9900000000000000")  # old_pfn 0x1122334455667788, new_pfn 0x99


def test_migration_record():
    assert ext.decode_migrations(MIGRATION) == [ext.Migration(old_pfn=0x1122_3344_5566_7788, new_pfn=0x99)]
    assert ext.encode_migrations([ext.Migration(old_pfn=0x1122_3344_5566_7788, new_pfn=0x99)]) == MIGRATION
    assert wire.unpack_migrations(MIGRATION) == [(0x1122_3344_5566_7788, 0x99)]
    assert wire.pack_migrations([(0x1122_3344_5566_7788, 0x99)]) == MIGRATION
    assert ext.F_MIGRATE_VQ == wire.F_MIGRATE_VQ == 62
    assert ext.MIGRATIONS_PER_BUFFER == wire.MIGRATIONS_PER_BUFFER == 256


HEADER = Path(__file__).resolve().parents[2] / "protocol" / "balloond_ext.h"
RECORD_PROBE = r"""
#include <stdio.h>
#include <string.h>
#include "balloond_ext.h"
int main(void) {
    struct balloond_migration m;
    unsigned char bytes[sizeof m];
    m.old_pfn = 0x1122334455667788ULL;  /* little-endian build host: __le64 is the value */
    m.new_pfn = 0x99;
    memcpy(bytes, &m, sizeof m);
    for (size_t i = 0; i < sizeof m; i++)
        printf("%02x", bytes[i]);
    printf("\n");
    return 0;
}
"""


def test_the_c_header_lays_out_the_same_bytes(tmp_path):
    """The guest driver's build of the header produces the literal record."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to check the extension header"
    (tmp_path / "probe.c").write_text(RECORD_PROBE)
    subprocess.run(
        [cc, "-Wall", "-Werror", "-I", str(HEADER.parent), "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")],
        check=True,
    )
    out = subprocess.run([str(tmp_path / "probe")], check=True, capture_output=True, text=True).stdout.strip()
    assert bytes.fromhex(out) == MIGRATION
