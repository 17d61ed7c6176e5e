"""The test frontend's vhost-user conversation, against a scripted backend.

Pins down that tests/frontend.py speaks in QEMU 10.x's order, asks for
REPLY_ACK on exactly QEMU's requests, and that every message it sends is
well-formed according to protocol.vhost_user itself.
"""

from __future__ import annotations

import array
import os
import socket
import struct
import threading
import time

import pytest

from protocol import vhost_user as vu
from protocol.balloon import Feature
from protocol.vhost_user import ProtocolFeature, Request
from tests.frontend import GuestRam, TestFrontend, UnexpectedReply

DEVICE_FEATURES = (
    (1 << Feature.VERSION_1)
    | (1 << Feature.RING_EVENT_IDX)
    | (1 << Feature.RING_INDIRECT_DESC)
    | (1 << Feature.STATS_VQ)
    | (1 << Feature.REPORTING)
    | (1 << Feature.BALLOOND_MIGRATE_VQ)
    | (1 << vu.F_PROTOCOL_FEATURES)
)
PROTOCOL = vu.feature_mask(
    ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ, ProtocolFeature.CONFIG, ProtocolFeature.CONFIGURE_MEM_SLOTS
)


class ScriptedBackend:
    """Accepts one connection; answers like a balloon backend; records every request."""

    def __init__(self, path: str, *, reply_flags: int = vu.VERSION | vu.FLAG_REPLY) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.reply_flags = reply_flags
        self.log: list[tuple[str, int, object, int]] = []  # (name, flags, payload, fd count)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        reader = vu.MessageReader()
        try:
            while True:
                data, anc, _, _ = conn.recvmsg(max(1, reader.wanted), socket.CMSG_SPACE(8 * 4))
                fds: list[int] = []
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
                if not data:
                    return
                for message in reader.feed(data, fds):
                    decoded = vu.decode_request(message)  # raises on anything malformed
                    self.log.append((decoded.request.name, message.flags, decoded.payload, len(message.fds)))
                    for fd in message.fds:
                        os.close(fd)
                    reply = self._answer(decoded)
                    if reply is not None:
                        conn.sendall(vu.encode_message(message.request, reply, self.reply_flags))
                    elif message.need_reply:
                        conn.sendall(vu.encode_message(message.request, struct.pack("<Q", 0), self.reply_flags))
        except BaseException as exc:  # surfaced by the test
            self.errors.append(exc)
        finally:
            conn.close()

    def _answer(self, d: vu.DecodedRequest) -> bytes | None:
        r = d.request
        if r is Request.GET_FEATURES:
            return struct.pack("<Q", DEVICE_FEATURES)
        if r is Request.GET_PROTOCOL_FEATURES:
            return struct.pack("<Q", PROTOCOL)
        if r is Request.GET_MAX_MEM_SLOTS:
            return struct.pack("<Q", 32)
        if r is Request.GET_VRING_BASE:
            return vu.VringState(d.payload.index, 7).encode()  # type: ignore[union-attr]
        if r is Request.GET_CONFIG:
            w = d.payload
            return vu.ConfigSpace(w.offset, w.size, w.flags, bytes(w.size)).encode()  # type: ignore[union-attr]
        return None

    def settle(self, timeout: float = 5.0) -> int:
        """Wait until the log stops growing (requests without replies race us)."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            n = len(self.log)
            if n == last:
                return n
            last = n
            time.sleep(0.05)
        return len(self.log)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def backend(tmp_path):
    b = ScriptedBackend(str(tmp_path / "vm.sock"))
    yield b
    b.close()
    assert not b.errors, b.errors


def names(log):
    return [entry[0] for entry in log]


def test_qemu_order_of_a_full_life(backend, tmp_path):
    fe = TestFrontend(str(tmp_path / "vm.sock"), ram_size=16 << 20)
    try:
        backend.settle()
        init = names(backend.log)
        assert init == [
            "GET_FEATURES",
            "GET_PROTOCOL_FEATURES",
            "SET_PROTOCOL_FEATURES",
            "GET_MAX_MEM_SLOTS",
            "SET_BACKEND_REQ_FD",
            "SET_OWNER",
            "GET_FEATURES",
        ] + ["SET_VRING_CALL", "SET_VRING_ERR"] * 6
        n = len(backend.log)
        fe.start()
        backend.settle()
        queues = len(fe.roles)
        assert queues == 5  # inflate, deflate, stats, reporting, migrate
        start = names(backend.log[n:])
        assert start == (
            ["SET_FEATURES", "SET_MEM_TABLE"]
            + ["SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_CALL"] * queues
            + ["SET_VRING_ENABLE"] * 6
            + ["SET_VRING_CALL"] * 6
            + ["GET_CONFIG"]
        )
        n = backend.settle()
        bases = fe.stop()
        assert names(backend.log[n:]) == ["SET_VRING_ENABLE"] * 6 + ["GET_VRING_BASE"] * queues
        assert bases == {i: 7 for i in range(queues)}
        assert all(q.base == 7 for q in fe.queues.values())
    finally:
        fe.close()
    backend.thread.join(5)

    # REPLY_ACK: NEED_REPLY on exactly QEMU's requests.
    asked = {name for name, flags, _, _ in backend.log if flags & vu.FLAG_NEED_REPLY}
    assert asked == {"SET_BACKEND_REQ_FD", "SET_MEM_TABLE", "SET_VRING_ENABLE"}
    # Payload details.
    entries = {name: (payload, fds) for name, _, payload, fds in backend.log}
    table, fds = entries["SET_MEM_TABLE"]
    assert fds == 2
    low, high = table.regions
    assert (low.guest_phys_addr, low.size, low.mmap_offset) == (0, 0xA0000, 0)
    assert (high.guest_phys_addr, high.mmap_offset) == (0xC0000, 0xC0000)
    assert high.userspace_addr - low.userspace_addr == 0xC0000
    features = entries["SET_FEATURES"][0].value
    assert features & (1 << vu.F_PROTOCOL_FEATURES)
    assert features & ~(1 << vu.F_PROTOCOL_FEATURES) == DEVICE_FEATURES & ~(1 << vu.F_PROTOCOL_FEATURES)
    addrs = [p for name, _, p, _ in backend.log if name == "SET_VRING_ADDR"]
    for a in addrs:  # frontend addresses, not guest-physical ones
        assert a.desc_user_addr >= fe.uaddr_base and a.used_user_addr > a.avail_user_addr > a.desc_user_addr


def test_memory_slots_send_each_region_once(backend, tmp_path):
    ram = GuestRam(16 << 20)
    fe = TestFrontend(str(tmp_path / "vm.sock"), ram=ram, mem_slots=True)
    try:
        fe.start()
        fe.stop()
        fe.start()
    finally:
        fe.close()
        ram.close()
    backend.thread.join(5)
    log = names(backend.log)
    assert log.count("ADD_MEM_REG") == 2
    assert "SET_MEM_TABLE" not in log
    assert {name for name, flags, _, _ in backend.log if flags & vu.FLAG_NEED_REPLY} >= {"ADD_MEM_REG"}


def test_config_write_sends_the_whole_cached_config(backend, tmp_path):
    fe = TestFrontend(str(tmp_path / "vm.sock"), ram_size=16 << 20)
    try:
        fe.get_config()
        fe.set_actual(42)
    finally:
        fe.close()
    backend.thread.join(5)
    window = [p for name, _, p, _ in backend.log if name == "SET_CONFIG"][0]
    assert (window.offset, window.size) == (0, 16)
    assert struct.unpack_from("<I", window.data, 4)[0] == 42
    assert [f for name, f, _, _ in backend.log if name == "SET_CONFIG"][0] & vu.FLAG_NEED_REPLY


def test_reply_with_wrong_flags_is_rejected(tmp_path):
    backend = ScriptedBackend(str(tmp_path / "vm.sock"), reply_flags=vu.VERSION)
    try:
        with pytest.raises(UnexpectedReply, match="flags"):
            TestFrontend(str(tmp_path / "vm.sock"), ram_size=16 << 20)
    finally:
        backend.close()
