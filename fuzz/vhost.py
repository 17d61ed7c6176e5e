"""Fuzz harnesses: a hostile vhost-user frontend.

Two levels, both fed raw fuzzer bytes:

`parse(data)` - the framing and payload validation alone
(`protocol.vhost_user.MessageReader` and `decode_request`): the byte stream
is cut into input-chosen chunks, fake fd numbers ride on some chunks, and
every completed message is decoded. Only `FrontendError` may come out; every
fd fed in ends up in exactly one message or in the reader's pending list;
the reader always wants at least one more byte; decoded payloads re-encode to
the bytes they came from.

`ConnectionFuzzer.run(data)` - the real `VhostUserConnection` with a real
`BalloonDevice`, over a socketpair, inside one asyncio loop that lives for
the whole fuzzing process. The input becomes a sequence of requests, well
formed or not, in any order, carrying real fds of every kind (eventfds,
memfds of several sizes, pipes, sockets, /dev/null, a directory), memory
regions that overlap, lie beyond their fd's size or overflow, split sends,
kicks and guest writes into the shared RAM. Checked per input:

* nothing escapes the connection: `run()` returns a reason, the loop's
  exception handler is never called, and the connection never logs an
  internal error ("internal error handling request", "device error", ...);
  a connection closed for a protocol violation says so in one error line;
* the connection is closed and every fd it received is closed: the process's
  /proc/self/fd set is the same before and after the input;
* no hang: the connection goes away within `hang_seconds` of the hang-up;
* a second connection on the same loop (the bystander, a running balloon
  with rings in its own guest RAM) keeps working: after every input it still
  answers GET_FEATURES and inflates and deflates a frame.

Discards run in both of the daemon's modes: the fuzzed connection defers
them (the default delay, on the loop's real timer) when bit 7 of the
input's first byte is set, and discards before each buffer is returned
otherwise; the bystander always defers.
"""

from __future__ import annotations

import array
import asyncio
import mmap
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any

from balloond.device.balloon import BalloonDevice, DeviceSettings
from balloond.engine.connection import OFFERED_PROTOCOL_FEATURES, VhostUserConnection
from protocol import vhost_user as vu
from protocol.balloon import Feature
from protocol.errors import FrontendError
from protocol.vhost_user import MemoryRegion, Request, VringAddr, VringState
from protocol.virtqueue import DESC, avail_ring_size, desc_table_size

from .common import CapturingLog, FuzzFailure, Input, fd_targets, open_fds

PAGE = 4096

# ===================================================================== parser


def parse(data: bytes) -> dict[str, int]:
    """Frame and decode an arbitrary byte stream; raise FuzzFailure on a broken rule."""
    inp = Input(data)
    reader = vu.MessageReader()
    stream = inp.take(inp.below(256) * 4 + inp.below(64)) if inp.u8() < 128 else data[1:]
    next_fd = 1000
    fed: list[int] = []
    completed: list[vu.Message] = []
    counts = {"messages": 0, "decoded": 0, "frontend_errors": 0, "unsupported": 0}
    pos = 0
    while pos < len(stream):
        size = 1 + (stream[pos] % 40 if stream[pos] & 1 else stream[pos])
        chunk = stream[pos : pos + size]
        pos += size
        nfds = chunk[-1] % 3 if chunk[-1] > 200 else 0
        fds = list(range(next_fd, next_fd + nfds))
        next_fd += nfds
        try:
            messages = reader.feed(chunk, fds)
        except FrontendError:
            counts["frontend_errors"] += 1
            break  # the connection closes: the caller keeps (and closes) `fds`
        except Exception as exc:
            raise FuzzFailure(f"MessageReader.feed raised {type(exc).__name__}: {exc}") from exc
        fed.extend(fds)
        if reader.wanted < 1:
            raise FuzzFailure(f"reader wants {reader.wanted} bytes")
        for message in messages:
            completed.append(message)
            counts["messages"] += 1
            if message.flags & vu.FLAG_VERSION_MASK != vu.VERSION or len(message.payload) > vu.MAX_PAYLOAD:
                raise FuzzFailure(f"reader passed a message with flags {message.flags:#x}, {len(message.payload)} bytes")
            try:
                decoded = vu.decode_request(message)
            except vu.UnsupportedRequest:
                counts["unsupported"] += 1
                continue
            except FrontendError:
                counts["frontend_errors"] += 1
                continue
            except Exception as exc:
                raise FuzzFailure(f"decode_request({message.request_name}) raised {type(exc).__name__}: {exc}") from exc
            counts["decoded"] += 1
            _check_decoded(decoded)
    else:
        pending = reader.take_pending_fds()
        attached = [fd for m in completed for fd in m.fds]
        if sorted(attached + pending) != sorted(fed):
            raise FuzzFailure(f"fds lost or duplicated: fed {fed}, attached {attached}, pending {pending}")
    return counts


def _check_decoded(d: vu.DecodedRequest) -> None:
    p, raw = d.payload, d.message.payload
    if isinstance(p, (VringState, VringAddr)) and p.encode() != raw:
        raise FuzzFailure(f"{d.request.name}: payload does not re-encode")
    if isinstance(p, vu.ConfigSpace):
        if p.encode() != raw or len(p.data) != p.size or p.offset + p.size > vu.MAX_CONFIG_SIZE:
            raise FuzzFailure(f"{d.request.name}: bad config window {p.offset}+{p.size}")
    if isinstance(p, vu.MemTable):
        if len(p.fds) != len(p.regions) or not 1 <= len(p.regions) <= vu.MAX_MEM_TABLE_REGIONS:
            raise FuzzFailure("SET_MEM_TABLE: regions and fds do not match")
        spans = sorted((r.guest_phys_addr, r.guest_phys_addr + r.size) for r in p.regions)
        for r in p.regions:
            if r.size == 0 or r.guest_phys_addr + r.size > 1 << 64 or r.mmap_offset + r.size > 1 << 64:
                raise FuzzFailure(f"SET_MEM_TABLE: invalid region {r} accepted")
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start < end:
                raise FuzzFailure("SET_MEM_TABLE: overlapping regions accepted")
    if isinstance(p, vu.VringFile):
        if (p.fd is None) != (not d.message.fds) or p.index > vu.VRING_INDEX_MASK:
            raise FuzzFailure(f"{d.request.name}: fd/nofd mismatch")


# ============================================================ connection level

RAM_SIZE = 1 << 20
UADDR_BASE = 0x7F00_1234_0000
GOOD_REGIONS = (
    (MemoryRegion(0, RAM_SIZE, UADDR_BASE, 0),),
    (MemoryRegion(0, 0xA0000, UADDR_BASE, 0), MemoryRegion(0xC0000, RAM_SIZE - 0xC0000, UADDR_BASE + 0xC0000, 0xC0000)),
)
QUEUE_SIZES = (1, 2, 8, 64, 128, 256, 1024, 32768, 0, 3, 65536, 1 << 31)
RING_GPA = 0x10000  # queue q's rings at RING_GPA + q * 0x10000 (room for 1024 entries)
BAD_REQUESTS = (
    Request.SET_LOG_BASE,
    Request.SET_LOG_FD,
    Request.IOTLB_MSG,
    Request.SET_VRING_ENDIAN,
    Request.POSTCOPY_ADVISE,
    Request.GET_INFLIGHT_FD,
    Request.SET_INFLIGHT_FD,
    Request.VRING_KICK,
    Request.SET_DEVICE_STATE_FD,
    Request.CHECK_DEVICE_STATE,
    Request.SEND_RARP,
    0,
    44,
    99,
    0xFFFF_FFFF,
)
FLAG_CHOICES = (
    vu.VERSION | vu.FLAG_NEED_REPLY,
    vu.VERSION | vu.FLAG_NEED_REPLY,
    vu.VERSION,
    vu.VERSION | vu.FLAG_REPLY,
    0,
    2,
    3,
    vu.VERSION | 0xFFFF_FFF0,
)


def ring_uaddrs(q: int, num: int) -> tuple[int, int, int]:
    desc = RING_GPA + q * 0x10000
    avail = desc + desc_table_size(min(num, 1024))
    used = (avail + avail_ring_size(min(num, 1024)) + 4095) // PAGE * PAGE
    return UADDR_BASE + desc, UADDR_BASE + used, UADDR_BASE + avail


class FdFactory:
    """Real fds of every kind a frontend could pass; the harness keeps its own
    copies of eventfds (to kick) and of the guest RAM memfd until the input ends."""

    KINDS = ("ram", "memfd", "eventfd", "pipe", "socket", "devnull", "dir", "memfd0", "bigmemfd", "dgram")

    def __init__(self, ram_fd: int) -> None:
        self.ram_fd = ram_fd
        self.eventfds: list[int] = []
        self.sockets: list[socket.socket] = []

    def make(self, kind: str) -> int:
        """A new fd the caller sends and then closes."""
        if kind == "ram":
            return os.dup(self.ram_fd)
        if kind in ("memfd", "memfd0", "bigmemfd"):
            fd = os.memfd_create("balloond-fuzz-fd", os.MFD_CLOEXEC)
            os.ftruncate(fd, {"memfd": PAGE, "memfd0": 0, "bigmemfd": 64 << 20}[kind])
            return fd
        if kind == "eventfd":
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.eventfds.append(os.dup(fd))
            return fd
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            return r
        if kind in ("socket", "dgram"):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM if kind == "socket" else socket.SOCK_DGRAM)
            self.sockets.append(a)  # kept open: the daemon's end stays connected
            return b.detach()
        if kind == "devnull":
            return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        return os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        for fd in self.eventfds:
            os.close(fd)
        for s in self.sockets:
            s.close()
        self.eventfds, self.sockets = [], []


class Outcome:
    def __init__(self) -> None:
        self.messages = 0
        self.reason = ""
        self.started = False
        self.live_rings = 0
        self.memory_regions = 0
        self.kicks = 0


async def _wait_writable(sock: socket.socket, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, timeout)
    finally:
        loop.remove_writer(sock.fileno())


async def send_message(sock: socket.socket, data: bytes, fds: list[int], timeout: float = 5.0) -> bool:
    """sendmsg with SCM_RIGHTS on a non-blocking socket; False once the peer is gone."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = 0
    while sent < len(data) or (anc and not sent):
        try:
            sent += sock.sendmsg([data[sent:]], anc)
            anc = []
        except BlockingIOError:
            await _wait_writable(sock, timeout)
        except OSError:
            return False
    return True


def drain(sock: socket.socket) -> bool:
    """Read whatever the daemon sent; False at EOF. Fds in replies are closed."""
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", payload[: len(payload) - len(payload) % 4]):
                    os.close(fd)
        if not data:
            return False


class Bystander:
    """A second, well-behaved frontend on the same loop: a running balloon
    whose inflate and deflate must keep working whatever the fuzzed
    connection does."""

    NUM = 8

    def __init__(self) -> None:
        self.ram_fd = os.memfd_create("balloond-fuzz-bystander", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, RAM_SIZE)
        self.map = mmap.mmap(self.ram_fd, RAM_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.log = CapturingLog()
        # The default discard delay: its timer runs on the loop the fuzzed
        # connections share, next to whatever they do.
        self.device = BalloonDevice(DeviceSettings(stats_interval=0), log=self.log)
        self.kick_fds: list[int] = []
        self.avail_idx = [0, 0]
        self.rounds = 0

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        self.sock = ours
        self.conn = VhostUserConnection(theirs, self.device, log=self.log)
        self.task = asyncio.get_running_loop().create_task(self.conn.run())
        features = (1 << Feature.VERSION_1) | (1 << vu.F_PROTOCOL_FEATURES)
        await self.request(Request.GET_FEATURES)
        # Without NEED_REPLY: REPLY_ACK is not negotiated yet. Every later request is acknowledged.
        await self.request(Request.SET_PROTOCOL_FEATURES, vu.encode_u64(1 << vu.ProtocolFeature.REPLY_ACK), reply=False)
        await self.request(Request.SET_FEATURES, vu.encode_u64(features))
        await self.request(Request.SET_OWNER)
        fd = os.dup(self.ram_fd)
        try:
            await self.request(Request.SET_MEM_TABLE, vu.encode_mem_table(list(GOOD_REGIONS[0])), [fd])
        finally:
            os.close(fd)
        for q in (0, 1):
            desc, used, avail = ring_uaddrs(q, self.NUM)
            await self.request(Request.SET_VRING_NUM, VringState(q, self.NUM).encode())
            await self.request(Request.SET_VRING_BASE, VringState(q, 0).encode())
            await self.request(Request.SET_VRING_ADDR, VringAddr(q, 0, desc, used, avail, 0).encode())
            for req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL):
                efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                try:
                    await self.request(req, vu.encode_vring_file(q, True), [efd])
                finally:
                    if req is Request.SET_VRING_KICK:
                        self.kick_fds.append(efd)
                    else:
                        os.close(efd)
            await self.request(Request.SET_VRING_ENABLE, VringState(q, 1).encode())
        if not self.conn.started:
            raise FuzzFailure("bystander did not start")

    async def request(self, request: int, payload: bytes = b"", fds: list[int] = (), *, reply: bool = True) -> bytes:  # type: ignore[assignment]
        msg = vu.encode_message(request, payload, vu.VERSION | (vu.FLAG_NEED_REPLY if reply else 0))
        if not await send_message(self.sock, msg, list(fds)):
            raise FuzzFailure(f"bystander: send of {Request(request).name} failed: {self.conn.close_reason}")
        if not reply:
            return b""
        loop = asyncio.get_running_loop()
        try:
            head = await asyncio.wait_for(loop.sock_recv(self.sock, vu.HEADER_SIZE), 5)
            req, flags, size = vu.HEADER.unpack(head)
            body = await asyncio.wait_for(loop.sock_recv(self.sock, size), 5) if size else b""
        except (asyncio.TimeoutError, struct.error) as exc:
            raise FuzzFailure(f"bystander: no reply to {Request(request).name} ({self.conn.close_reason})") from exc
        if req != request or not flags & vu.FLAG_REPLY:
            raise FuzzFailure(f"bystander: bad reply to {Request(request).name}")
        return body

    async def check(self) -> None:
        """GET_FEATURES answers; one frame in and out of the balloon."""
        self.rounds += 1
        await self.request(Request.GET_FEATURES)
        pfn = 0x80 + self.rounds % 64
        for q, present in ((0, True), (1, False)):
            desc, used, avail = (a - UADDR_BASE for a in ring_uaddrs(q, self.NUM))
            buf = 0x8000 + q * 16
            struct.pack_into("<I", self.map, buf, pfn)
            slot = self.avail_idx[q] % self.NUM
            DESC.pack_into(self.map, desc + 16 * slot, buf, 4, 0, 0)
            struct.pack_into("<H", self.map, avail + 4 + 2 * slot, slot)
            self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
            struct.pack_into("<H", self.map, avail + 2, self.avail_idx[q])
            os.eventfd_write(self.kick_fds[q], 1)
            deadline = time.monotonic() + 5
            while struct.unpack_from("<H", self.map, used + 2)[0] != self.avail_idx[q]:
                if time.monotonic() > deadline:
                    raise FuzzFailure(f"bystander: queue {q} not served ({self.conn.close_reason})")
                await asyncio.sleep(0.0005)
            if (pfn in self.device.tracker) != present:
                raise FuzzFailure(f"bystander: frame {pfn:#x} {'not ' if present else ''}in the balloon")
        bugs = [r for r in self.log.records if r[0] in ("exception", "error")]
        if bugs:
            raise FuzzFailure(f"bystander logged {bugs[0][:2]}")


@dataclass
class ConnStats:
    messages_sent: int = 0
    messages_seen: int = 0
    protocol_violation: bool = False
    refused: int = 0
    started: bool = False
    max_live_rings: int = 0
    fds_sent: int = 0
    seconds: float = 0.0
    deferred: bool = False  # the device deferred discards (the daemon's default delay)


class ConnectionFuzzer:
    """One event loop, one bystander, many fuzzed connections."""

    def __init__(self, *, hang_seconds: float = 5.0, bystander: bool = True) -> None:
        self.hang_seconds = hang_seconds
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.bystander: Bystander | None = None
        if bystander:
            self.bystander = Bystander()
            self.loop.run_until_complete(self.bystander.start())

    def close(self) -> None:
        if self.bystander is not None:
            b = self.bystander
            b.sock.close()
            self.loop.run_until_complete(asyncio.wait_for(b.task, 5))
            for fd in b.kick_fds:
                os.close(fd)
            b.map.close()
            os.close(b.ram_fd)
        self.loop.close()

    def run(self, data: bytes) -> ConnStats:
        before = open_fds()
        stats = ConnStats()
        start = time.monotonic()
        try:
            self.loop.run_until_complete(self._run(data, stats))
        finally:
            stats.seconds = time.monotonic() - start
        if self.loop_errors:
            ctx = self.loop_errors[0]
            self.loop_errors.clear()
            raise FuzzFailure(f"exception escaped into the event loop: {ctx.get('message')}: {ctx.get('exception')!r}")
        after = open_fds()
        if after != before:
            leaked = fd_targets(after - before)
            raise FuzzFailure(f"fd leak: {len(after - before)} new fds {leaked}, {len(before - after)} gone")
        return stats

    async def _run(self, data: bytes, stats: ConnStats) -> None:
        loop = asyncio.get_running_loop()
        inp = Input(data)
        ram_fd = os.memfd_create("balloond-fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(ram_fd, RAM_SIZE)
        ram = mmap.mmap(ram_fd, RAM_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        factory = FdFactory(ram_fd)
        log = CapturingLog()
        # The discard mode from bit 7 of the first byte, read without taking
        # it, so the inputs decode as they did before there were two modes.
        stats.deferred = bool(data[:1]) and bool(data[0] & 0x80)
        delay = DeviceSettings().discard_max_delay if stats.deferred else 0.0
        device = BalloonDevice(DeviceSettings(stats_interval=inp.choice((0, 0, 0.001)), discard_max_delay=delay), log=log)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        # The daemon polls a ring for a while after each kick (--poll-us, 200
        # by default): half the inputs run with polling on.
        # BALLOOND_FUZZ_POLL=0 or =1 pins it (a known stall with polling on:
        # see fuzz/repro_ring_alias.py).
        poll = inp.choice((0.0, 200e-6))
        pinned = os.environ.get("BALLOOND_FUZZ_POLL")
        if pinned is not None:
            poll = 200e-6 if pinned == "1" else 0.0
        conn = VhostUserConnection(theirs, device, log=log, poll_seconds=poll)
        task = loop.create_task(conn.run())
        gen = MessageGen(inp, factory)
        try:
            while (gen.script or not inp.exhausted) and stats.messages_sent < 96 and conn.open:
                action = gen.next(device)
                if action is None:
                    continue
                kind, payload = action
                if kind == "yield":
                    for _ in range(payload):
                        await asyncio.sleep(0)
                elif kind == "kick":
                    if factory.eventfds:
                        os.eventfd_write(factory.eventfds[payload % len(factory.eventfds)], 1)
                elif kind == "guest":
                    offset, chunk = payload
                    ram[offset : offset + len(chunk)] = chunk
                elif kind == "operator":
                    target, interval = payload
                    device.set_target(target)
                    device.set_stats_interval(interval)
                else:
                    parts, fds = payload[0], payload[1]
                    fd_part = payload[2] if len(payload) > 2 else 0
                    stats.messages_sent += 1
                    stats.fds_sent += len(fds)
                    try:
                        ok = True
                        for i, part in enumerate(parts):
                            if i:
                                await asyncio.sleep(0)
                            ok = ok and await send_message(ours, part, fds if i == fd_part else [])
                    finally:
                        for fd in fds:
                            os.close(fd)
                    if not ok:
                        break
                    await asyncio.sleep(0)
                if not drain(ours):
                    break
                stats.max_live_rings = max(stats.max_live_rings, sum(1 for v in conn.vrings.values() if v.live))
                stats.started = stats.started or conn.started
            # Hang up, then wait for the connection to notice and clean up.
            try:
                ours.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            deadline = time.monotonic() + self.hang_seconds
            while not task.done():
                drain(ours)
                if time.monotonic() > deadline:
                    raise FuzzFailure(f"connection still open {self.hang_seconds}s after the frontend hung up")
                await asyncio.sleep(0.0005)
            try:
                reason = task.result()
            except Exception as exc:
                raise FuzzFailure(f"VhostUserConnection.run raised {type(exc).__name__}: {exc}") from exc
            stats.messages_seen = conn.messages
            stats.protocol_violation = reason.startswith("protocol violation")
            stats.refused = log.events("warning").count("refused request")
            self._check_log(log, reason)
            if self.bystander is not None:
                await self.bystander.check()
        finally:
            if not task.done():
                conn.close("harness cleanup")
                await asyncio.sleep(0)
            ours.close()
            gen.discard_script()
            factory.close()
            ram.close()
            os.close(ram_fd)

    def _check_log(self, log: CapturingLog, reason: str) -> None:
        internal = [
            (e, f.get("exc_type"), f.get("traceback", "")[-600:])
            for lv, e, f in log.records
            if lv == "exception"
        ]
        if internal:
            raise FuzzFailure(f"the connection hit an internal error: {internal[0]}")
        if reason.startswith("internal error"):
            raise FuzzFailure(f"connection closed by an internal error: {reason}")
        closes = [f for lv, e, f in log.records if e == "frontend connection closed"]
        if len(closes) != 1 or closes[0].get("reason") != reason:
            raise FuzzFailure(f"expected one 'frontend connection closed' line for {reason!r}, got {closes}")
        if reason != "frontend hung up" and not any(lv == "error" and e == "frontend connection closed" for lv, e, _ in log.records):
            raise FuzzFailure(f"connection closed ({reason}) without an error line")


class MessageGen:
    """Input bytes → frontend actions: messages (bytes + fds), kicks, guest
    writes, operator calls and yields to the loop."""

    def __init__(self, inp: Input, fds: FdFactory) -> None:
        self.inp = inp
        self.fds = fds
        self.script: list[tuple[str, Any]] = []

    def discard_script(self) -> None:
        """Close the fds of scripted messages that were never sent."""
        for kind, payload in self.script:
            if kind == "msg":
                for fd in payload[1]:
                    os.close(fd)
        self.script = []

    def fd(self, default: str = "eventfd") -> int:
        k = self.inp.u8()
        return self.fds.make(default if k < 160 else FdFactory.KINDS[k % len(FdFactory.KINDS)])

    def flags(self) -> int:
        k = self.inp.u8()
        return FLAG_CHOICES[k % len(FLAG_CHOICES)] if k >= 200 else vu.VERSION | vu.FLAG_NEED_REPLY

    def msg(self, request: int, payload: bytes, fds: list[int] | None = None) -> tuple[str, Any]:
        return ("msg", ([vu.encode_message(request, payload, self.flags())], fds or []))

    def u64(self) -> int:
        k = self.inp.u8()
        if k < 120:
            return self.inp.u8()
        if k < 200:
            return self.inp.choice((0, 1, 0xFFFF, 0xFFFF_FFFF, 1 << 63, (1 << 64) - 1, 1 << 32, 0x1000))
        return self.inp.u64()

    def queue(self) -> int:
        k = self.inp.u8()
        return k % 6 if k < 230 else self.inp.choice((15, 16, 17, 255, 0x100, 0xFFFF_FFFF))

    def region(self) -> MemoryRegion:
        inp = self.inp
        k = inp.below(12)
        if k < 4:
            regions = inp.choice(GOOD_REGIONS)
            return inp.choice(regions)
        if k == 4:
            return MemoryRegion(inp.choice((0, 0x1000, 0x8_0000)), RAM_SIZE * 2, UADDR_BASE, 0)  # beyond the fd
        if k == 5:
            return MemoryRegion(0, RAM_SIZE, UADDR_BASE, inp.choice((PAGE, 0x800, RAM_SIZE)))  # offset past the end
        if k == 6:
            return MemoryRegion((1 << 64) - PAGE, 2 * PAGE, UADDR_BASE, 0)  # overflows
        if k == 7:
            return MemoryRegion(inp.choice((0, 0x10_0000, 1 << 32)), inp.choice((0, 1, 0x1001, PAGE, 0x8_0000)), inp.u64(), inp.choice((0, 0x800, PAGE)))
        if k == 8:
            return MemoryRegion(0x8_0000, RAM_SIZE, UADDR_BASE + 0x8_0000, 0)  # overlaps the first good one
        if k == 9:
            return MemoryRegion(1 << 40, 1 << 40, UADDR_BASE, 0)  # a terabyte on a small fd
        return MemoryRegion(self.u64(), self.u64(), self.u64(), self.u64())

    def good_setup(self) -> list[tuple[str, Any]]:
        """What QEMU sends up to DRIVER_OK, for a random feature set and ring size."""
        inp = self.inp
        acked = (1 << Feature.VERSION_1) | (1 << vu.F_PROTOCOL_FEATURES)
        for bit in (Feature.STATS_VQ, Feature.REPORTING, Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC, Feature.BALLOOND_MIGRATE_VQ):
            if inp.bool():
                acked |= 1 << bit
        nq = 2 + bin(acked & ((1 << Feature.STATS_VQ) | (1 << Feature.REPORTING) | (1 << Feature.BALLOOND_MIGRATE_VQ))).count("1")
        num = inp.choice((8, 64, 128, 256))
        out = [
            ("msg", ([vu.encode_message(Request.GET_FEATURES, b"", vu.VERSION)], [])),
            ("msg", ([vu.encode_message(Request.SET_FEATURES, vu.encode_u64(acked), vu.VERSION | vu.FLAG_NEED_REPLY)], [])),
            ("msg", ([vu.encode_message(Request.SET_PROTOCOL_FEATURES, vu.encode_u64(OFFERED_PROTOCOL_FEATURES), vu.VERSION)], [])),
            ("msg", ([vu.encode_message(Request.SET_OWNER, b"", vu.VERSION | vu.FLAG_NEED_REPLY)], [])),
        ]
        if inp.bool():
            out.append(("msg", ([vu.encode_message(Request.SET_BACKEND_REQ_FD, b"", vu.VERSION | vu.FLAG_NEED_REPLY)], [self.fds.make("socket")])))
        regions = list(inp.choice(GOOD_REGIONS))
        if inp.u8() < 200:
            payload = vu.encode_mem_table(regions)
            out.append(("msg", ([vu.encode_message(Request.SET_MEM_TABLE, payload, vu.VERSION | vu.FLAG_NEED_REPLY)], [self.fds.make("ram") for _ in regions])))
        else:
            for r in regions:
                out.append(("msg", ([vu.encode_message(Request.ADD_MEM_REG, vu.encode_single_region(r), vu.VERSION | vu.FLAG_NEED_REPLY)], [self.fds.make("ram")])))
        for q in range(nq):
            desc, used, avail = ring_uaddrs(q, num)
            out += [
                ("msg", ([vu.encode_message(Request.SET_VRING_NUM, VringState(q, num).encode(), vu.VERSION | vu.FLAG_NEED_REPLY)], [])),
                ("msg", ([vu.encode_message(Request.SET_VRING_BASE, VringState(q, inp.choice((0, 0, 5))).encode(), vu.VERSION)], [])),
                ("msg", ([vu.encode_message(Request.SET_VRING_ADDR, VringAddr(q, 0, desc, used, avail, 0).encode(), vu.VERSION)], [])),
                ("msg", ([vu.encode_message(Request.SET_VRING_KICK, vu.encode_vring_file(q, True), vu.VERSION)], [self.fds.make("eventfd")])),
                ("msg", ([vu.encode_message(Request.SET_VRING_CALL, vu.encode_vring_file(q, True), vu.VERSION)], [self.fds.make("eventfd")])),
                ("msg", ([vu.encode_message(Request.SET_VRING_ENABLE, VringState(q, 1).encode(), vu.VERSION | vu.FLAG_NEED_REPLY)], [])),
            ]
        return out

    def next(self, device: BalloonDevice) -> tuple[str, Any] | None:
        if self.script:
            return self.script.pop(0)
        inp = self.inp
        op = inp.below(24)
        if op == 0:
            req = inp.choice((Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.SET_OWNER, Request.RESET_OWNER,
                              Request.GET_QUEUE_NUM, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS, Request.RESET_DEVICE))
            return self.msg(req, inp.choice((b"", b"", bytes(8), bytes(4))))
        if op == 1:
            good = device.features | (1 << vu.F_PROTOCOL_FEATURES)
            value = inp.choice((good, good & ~(1 << Feature.REPORTING), 1 << Feature.VERSION_1, 0)) if inp.u8() < 200 else self.u64()
            return self.msg(Request.SET_FEATURES, vu.encode_u64(value))
        if op == 2:
            value = OFFERED_PROTOCOL_FEATURES if inp.u8() < 180 else self.u64()
            return self.msg(Request.SET_PROTOCOL_FEATURES, vu.encode_u64(value))
        if op == 3:
            n = 1 + inp.below(3) if inp.u8() < 230 else inp.choice((0, 9, 0xFFFF_FFFF))
            regions = [self.region() for _ in range(min(n, 8))]
            payload = vu.MEM_TABLE_HEAD.pack(n, 0 if inp.u8() < 240 else 1) + b"".join(r.encode() for r in regions)
            if inp.u8() > 240:
                payload += bytes(32 * inp.below(8))
            nfds = len(regions) if inp.u8() < 220 else inp.below(10)
            return self.msg(Request.SET_MEM_TABLE, payload, [self.fd("ram") for _ in range(nfds)])
        if op in (4, 5):
            req = Request.ADD_MEM_REG if op == 4 else Request.REM_MEM_REG
            payload = vu.encode_single_region(self.region())
            if inp.u8() > 245:
                payload = payload[:-8]
            nfds = 1 if inp.u8() < 220 else inp.below(3)
            return self.msg(req, payload, [self.fd("ram") for _ in range(nfds)])
        if op == 6:
            return self.msg(Request.SET_VRING_NUM, VringState(self.queue(), inp.choice(QUEUE_SIZES) % (1 << 32)).encode())
        if op == 7:
            return self.msg(Request.SET_VRING_BASE, VringState(self.queue(), self.u64() & 0xFFFF_FFFF).encode())
        if op == 8:
            q = self.queue()
            desc, used, avail = ring_uaddrs(q % 16, inp.choice((8, 256, 1024)))
            if inp.u8() > 200:
                desc, used, avail = (inp.choice((desc, used, avail, 0, UADDR_BASE + RAM_SIZE - 8, self.u64())) for _ in range(3))
            return self.msg(Request.SET_VRING_ADDR, VringAddr(q, inp.choice((0, 0, 1, 2)), desc, used, avail, self.u64()).encode())
        if op == 9:
            req = inp.choice((Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR))
            q = self.queue() & 0xFF
            nofd = inp.u8() > 220
            value = q | (vu.VRING_NOFD_MASK if nofd else 0)
            if inp.u8() > 245:
                value |= 1 << inp.below(64)
            nfds = (0 if nofd else 1) if inp.u8() < 230 else inp.below(3)
            return self.msg(req, vu.encode_u64(value), [self.fd("eventfd") for _ in range(nfds)])
        if op == 10:
            return self.msg(Request.SET_VRING_ENABLE, VringState(self.queue(), inp.choice((0, 1, 1, 2, 0xFFFF_FFFF))).encode())
        if op == 11:
            return self.msg(Request.GET_VRING_BASE, VringState(self.queue(), 0).encode())
        if op == 12:
            req = inp.choice((Request.GET_CONFIG, Request.SET_CONFIG))
            offset = inp.choice((0, 4, 8, 12, 16, 255, 256, 0xFFFF_FFFF))
            size = inp.choice((4, 16, 0, 1, 256, 257, 0xFFFF_FFFF))
            data = inp.take(min(size, 300) if inp.u8() < 200 else inp.below(300))
            return self.msg(req, vu.CONFIG_HEAD.pack(offset, size, inp.u8()) + data)
        if op == 13:
            return self.msg(Request.SET_BACKEND_REQ_FD, inp.choice((b"", bytes(8), bytes(3))), [self.fd("socket") for _ in range(1 if inp.u8() < 230 else inp.below(3))])
        if op == 14:
            return self.msg(Request.SET_STATUS, vu.encode_u64(self.u64()))
        if op == 15:
            # anything at all: an unsupported or unknown request, any flags, any payload and fds
            req = inp.choice(BAD_REQUESTS) if inp.u8() < 128 else inp.u32()
            payload = inp.take(inp.below(64))
            size = len(payload) if inp.u8() < 230 else inp.choice((vu.MAX_PAYLOAD, vu.MAX_PAYLOAD + 1, 0xFFFF_FFFF))
            header = vu.HEADER.pack(req, FLAG_CHOICES[inp.below(len(FLAG_CHOICES))], size)
            nfds = inp.below(4) if inp.u8() < 230 else inp.choice((8, 9, 12))
            return ("msg", ([header + payload], [self.fd("eventfd") for _ in range(nfds)]))
        if op == 16:
            return ("kick", inp.u8())
        if op == 17:
            offset = RING_GPA + inp.below(6) * 0x10000 + inp.choice((0, 2, 4, 16, 0x1000, 0x2000, 0x4000))
            return ("guest", (offset, inp.take(1 + inp.below(32))))
        if op in (18, 19):
            self.script = self.good_setup()
            return None
        if op == 20:
            return ("yield", 1 + inp.below(8))
        if op == 21:
            # one message in two sends, fds riding on either part
            inner = self.next(device)
            if inner is None or inner[0] != "msg":
                return inner
            parts, fds = inner[1][0], inner[1][1]
            data = b"".join(parts)
            cut = inp.below(len(data) + 1)
            if not 0 < cut < len(data):
                return ("msg", ([data], fds))
            # fds on the second part arrive mid-message: a protocol violation
            return ("msg", ([data[:cut], data[cut:]], fds, 1 if fds and inp.bool() else 0))
        if op == 22:
            return ("operator", (inp.choice((0, 1, 256, 0xFFFF_FFFF)), inp.choice((0, 0.001, 5.0))))
        return self.msg(Request.GET_VRING_BASE, VringState(self.queue(), 0).encode())


def seeds() -> list[bytes]:
    """QEMU's setup with every feature, then kicks, a stop and a target change;
    the same with polling and a split memory layout, then a bad table; a raw
    unsupported request; a split send. (Each starts with the stats-interval
    and polling choices.)"""
    return [
        bytes([0, 0, 18, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0]) + bytes([16, 0, 16, 1, 20, 4, 11, 0, 22, 1, 1]),
        bytes([0, 1, 19, 0, 0, 0, 0, 0, 2, 0, 1, 0, 0, 0]) + bytes([16, 0, 3, 0, 0, 0, 0]) + bytes([10, 0, 1]),
        bytes([0, 0, 15, 0, 0, 0, 0, 0, 0, 0]),
        bytes([0, 0, 21, 9, 0, 0, 0, 0, 0, 7, 1]),
    ]
