"""vhost-user framing and payload decoding."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import vhost_user as vu
from protocol.errors import FrontendError


def frame(request, payload=b"", flags=vu.VERSION):
    return vu.encode_message(request, payload, flags)


def test_reader_asks_for_exactly_one_header_then_one_payload():
    reader = vu.MessageReader()
    assert reader.wanted == vu.HEADER_SIZE
    data = frame(vu.Request.SET_FEATURES, struct.pack("<Q", 5))
    assert reader.feed(data[:12]) == []
    assert reader.wanted == 8
    (msg,) = reader.feed(data[12:])
    assert msg.request == vu.Request.SET_FEATURES and msg.payload == struct.pack("<Q", 5)
    assert reader.idle


def test_fds_attach_to_the_message_whose_header_they_came_with():
    reader = vu.MessageReader()
    a = frame(vu.Request.GET_FEATURES)
    b = frame(vu.Request.SET_VRING_KICK, struct.pack("<Q", 0))
    msgs = reader.feed(a)
    msgs += reader.feed(b[:12], [7])
    msgs += reader.feed(b[12:])
    assert [m.fds for m in msgs] == [(), (7,)]


def test_fds_in_the_middle_of_a_payload_are_refused():
    reader = vu.MessageReader()
    data = frame(vu.Request.SET_FEATURES, struct.pack("<Q", 5))
    reader.feed(data[:14])
    with pytest.raises(FrontendError, match="middle of a payload"):
        reader.feed(data[14:], [3])


def test_oversized_payload_is_refused_before_buffering():
    reader = vu.MessageReader()
    with pytest.raises(FrontendError, match="exceeds"):
        reader.feed(struct.pack("<III", 1, vu.VERSION, vu.MAX_PAYLOAD + 1))


def test_wrong_version_is_refused():
    with pytest.raises(FrontendError, match="version"):
        vu.MessageReader().feed(struct.pack("<III", 1, 0x2, 0))


@given(st.lists(st.tuples(st.sampled_from(list(vu.Request)), st.binary(max_size=300)), max_size=8),
       st.integers(min_value=1, max_value=64))
def test_any_chunking_yields_the_same_messages(messages, chunk):
    stream = b"".join(frame(r, p) for r, p in messages)
    reader = vu.MessageReader()
    out = []
    for i in range(0, len(stream), chunk):
        out += reader.feed(stream[i : i + chunk])
    assert [(m.request, m.payload) for m in out] == [(int(r), p) for r, p in messages]


@settings(max_examples=300)
@given(st.binary(max_size=600))
def test_garbage_never_escapes_as_anything_but_frontend_error(data):
    reader = vu.MessageReader()
    try:
        for msg in reader.feed(data):
            try:
                vu.decode_request(msg)
            except FrontendError:
                pass
    except FrontendError:
        pass


def msg(request, payload=b"", fds=(), flags=vu.VERSION):
    return vu.Message(int(request), flags, payload, tuple(fds))


def test_reply_flags_are_exactly_version_and_reply():
    reply = vu.encode_reply(msg(vu.Request.GET_FEATURES), vu.encode_u64(1))
    request, flags, size = struct.unpack_from("<III", reply)
    assert (request, flags, size) == (vu.Request.GET_FEATURES, 0x5, 8)


def test_mem_table_round_trip_and_validation():
    regions = [vu.MemoryRegion(0, 0xA0000, 0x7F0000000000, 0), vu.MemoryRegion(0xC0000, 0x1000000, 0x7F00000C0000, 0xC0000)]
    d = vu.decode_request(msg(vu.Request.SET_MEM_TABLE, vu.encode_mem_table(regions), fds=(10, 11)))
    assert d.payload.regions == tuple(regions)
    with pytest.raises(FrontendError, match="fds"):
        vu.decode_request(msg(vu.Request.SET_MEM_TABLE, vu.encode_mem_table(regions), fds=(10,)))
    overlapping = [vu.MemoryRegion(0, 0x2000, 0, 0), vu.MemoryRegion(0x1000, 0x2000, 0x10000, 0)]
    with pytest.raises(FrontendError, match="overlap"):
        vu.decode_request(msg(vu.Request.SET_MEM_TABLE, vu.encode_mem_table(overlapping), fds=(1, 2)))
    with pytest.raises(FrontendError, match="regions"):
        vu.decode_request(msg(vu.Request.SET_MEM_TABLE, struct.pack("<II", 0, 0), fds=()))
    with pytest.raises(FrontendError, match="size 0"):
        vu.decode_request(msg(vu.Request.SET_MEM_TABLE, vu.encode_mem_table([vu.MemoryRegion(0, 0, 0, 0)]), fds=(1,)))


def test_vring_file_fd_count_follows_the_nofd_bit():
    d = vu.decode_request(msg(vu.Request.SET_VRING_CALL, vu.encode_vring_file(3, True), fds=(9,)))
    assert (d.payload.index, d.payload.fd) == (3, 9)
    d = vu.decode_request(msg(vu.Request.SET_VRING_CALL, vu.encode_vring_file(3, False)))
    assert d.payload.fd is None
    with pytest.raises(FrontendError, match="fds"):
        vu.decode_request(msg(vu.Request.SET_VRING_KICK, vu.encode_vring_file(0, True)))
    with pytest.raises(FrontendError, match="reserved"):
        vu.decode_request(msg(vu.Request.SET_VRING_KICK, struct.pack("<Q", 1 << 20), fds=(3,)))


def test_config_window_must_fit_the_config_space():
    ok = vu.ConfigSpace(0, 16, 0, bytes(16)).encode()
    assert vu.decode_request(msg(vu.Request.GET_CONFIG, ok)).payload.size == 16
    with pytest.raises(FrontendError, match="outside"):
        vu.decode_request(msg(vu.Request.GET_CONFIG, struct.pack("<III", 250, 16, 0) + bytes(16)))
    with pytest.raises(FrontendError, match="payload"):
        vu.decode_request(msg(vu.Request.SET_CONFIG, struct.pack("<III", 0, 16, 0) + bytes(4)))


def test_unknown_and_unsupported_requests_are_distinguished():
    with pytest.raises(vu.UnsupportedRequest, match="unknown"):
        vu.decode_request(msg(999))
    with pytest.raises(vu.UnsupportedRequest, match="SET_LOG_FD"):
        vu.decode_request(msg(vu.Request.SET_LOG_FD, bytes(16)))


def test_wrong_payload_sizes_are_frontend_errors():
    with pytest.raises(FrontendError):
        vu.decode_request(msg(vu.Request.SET_FEATURES, b"\0" * 4))
    with pytest.raises(FrontendError):
        vu.decode_request(msg(vu.Request.SET_VRING_ADDR, b"\0" * 39))
    with pytest.raises(FrontendError, match="reply flag"):
        vu.decode_request(msg(vu.Request.GET_FEATURES, flags=vu.VERSION | vu.FLAG_REPLY))


@given(st.integers(0, 255), st.integers(0, 2**32 - 1))
def test_vring_state_round_trip(index, num):
    d = vu.decode_request(msg(vu.Request.SET_VRING_NUM, vu.VringState(index, num).encode()))
    assert d.payload == vu.VringState(index, num)


@given(st.tuples(*[st.integers(0, 2**32 - 1)] * 2, *[st.integers(0, 2**64 - 1)] * 4))
def test_vring_addr_round_trip(fields):
    addr = vu.VringAddr(*fields)
    assert vu.decode_request(msg(vu.Request.SET_VRING_ADDR, addr.encode())).payload == addr
