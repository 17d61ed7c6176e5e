"""VhostUserConnection: the backend side of one frontend connection.

One instance per accepted connection. It reads messages exactly one header or
payload at a time (so every fd lands on its own message), validates them in
the protocol layer, applies them to rings and memory, and drives the device
through the `VirtioDevice` seam.

Run states: a connection is `open` until the frontend hangs up or breaks the
protocol, then `closed` for good; the device is `started` between the moment
every configured ring is live and the first stop (ENABLE(0) or GET_VRING_BASE),
and only then may the backend channel carry CONFIG_CHANGE_MSG (QEMU 10.x
crashes on one outside that window).

Errors: a malformed message closes this connection (the frontend cannot be
trusted to be in a sane state after it); an unsupported request is refused
with an error reply when one is asked for. Nothing a frontend sends propagates
as an exception beyond this class.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from typing import Any, Callable

import structlog

from protocol import vhost_user as vu
from protocol.balloon import Feature
from protocol.errors import FrontendError, GuestError, ProtocolError
from protocol.vhost_user import ProtocolFeature, Request

from ..logs import RateLimited
from .device_api import VirtioDevice
from .device_state import StateTransfer
from .dirty_log import DirtyLog
from .frontend_connection import received_fds
from .memory import DEFAULT_MAX_GUEST_RAM, GuestMemory
from .polling import PollingConnection
from .vring import Vring, eventfd_drain

#: Queue indices accepted in vring requests (QEMU's num_vqs for a balloon is < 8).
MAX_QUEUES = 16

#: Largest queue size accepted: QEMU's own maximum (VIRTQUEUE_MAX_SIZE). The
#: split ring allows 32768, but the cost of a pass over a ring grows with its
#: size and no frontend needs more.
MAX_QUEUE_NUM = 1024


#: Reads of the frontend's socket in one callback at most (each is one
#: message header or payload): a request's payload usually follows its header
#: at once, and reading it then saves an event-loop pass per message.
MAX_READS_PER_CALLBACK = 16

#: Replies waiting for a frontend that does not read them: past this, the
#: socket is not read until they drain, so such a frontend cannot grow the
#: daemon's memory (one more reply at most: requests are read one at a time).
MAX_OUTBOX = 64 * 1024

#: Protocol features offered. CONFIG is required by QEMU's generic device,
#: BACKEND_REQ carries config changes, REPLY_ACK lets QEMU confirm each
#: request, CONFIGURE_MEM_SLOTS allows memory hotplug without a full remap.
#: LOG_SHMFD and DEVICE_STATE (with the VHOST_F_LOG_ALL feature bit) let the
#: VM migrate: our writes to guest memory are logged, and the device's state
#: travels in QEMU's migration stream (docs/migration.md).
OFFERED_PROTOCOL_FEATURES = vu.feature_mask(
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.CONFIG,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
    ProtocolFeature.LOG_SHMFD,
    ProtocolFeature.DEVICE_STATE,
)

_connection_ids = itertools.count(1)


def _close_fds(fds: tuple[int, ...] | list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class VhostUserConnection(PollingConnection):
    def __init__(
        self,
        sock: socket.socket,
        device: VirtioDevice,
        *,
        log: Any = None,
        poll_seconds: float = 0.0,
        protocol_features: int = OFFERED_PROTOCOL_FEATURES,
        max_guest_ram: int = DEFAULT_MAX_GUEST_RAM,
    ) -> None:
        self.id = next(_connection_ids)
        self.sock = sock
        self.sock.setblocking(False)
        self.device = device
        self.log = (log or structlog.get_logger()).bind(conn=self.id)
        self.offered_protocol_features = protocol_features
        self.protocol_features = 0
        self.acked_features: int | None = None
        self.protocol_bit_acked = False
        self.owner_set = False
        self.status = 0
        self.reader = vu.MessageReader()
        self.max_guest_ram = max_guest_ram
        self.memory = GuestMemory(max_guest_ram)
        self.vrings: dict[int, Vring] = {}
        self.backend_sock: socket.socket | None = None
        self.started = False
        self.close_reason: str | None = None
        self.messages = 0
        self._loop = asyncio.get_running_loop()
        self._init_polling(poll_seconds)
        self._closed = self._loop.create_future()
        self._outbox = bytearray()
        self._reading = False  # the socket is watched (not while the outbox is full)
        self._backend_retry: asyncio.TimerHandle | None = None
        #: CONFIG_CHANGE_MSGs that found the backend channel full (retried).
        self.backend_full = 0
        #: Requests the frontend asked to have acknowledged (NEED_REPLY).
        self.acks_requested = 0
        #: Migration: the shared dirty log, whether VHOST_F_LOG_ALL is on, and
        #: the device state transfer under way or last done.
        self.dirty_log: DirtyLog | None = None
        self.logging = False
        self.state_transfer: StateTransfer | None = None
        self.limited = RateLimited(self.log)
        self._handlers: dict[Request, Callable[[vu.DecodedRequest], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset,
            Request.RESET_DEVICE: self._reset,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: lambda d: vu.encode_u64(MAX_QUEUES),
            Request.GET_MAX_MEM_SLOTS: lambda d: vu.encode_u64(vu.MAX_MEM_SLOTS),
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            Request.SET_STATUS: self._set_status,
            Request.GET_STATUS: lambda d: vu.encode_u64(self.status),
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            Request.CHECK_DEVICE_STATE: self._check_device_state,
        }
        device.attach(self)

    # ================================================================ running

    def _start_reading(self) -> None:
        self._watch_socket(True)

    def _after_teardown(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _teardown(self) -> None:
        if self._backend_retry is not None:
            self._backend_retry.cancel()
            self._backend_retry = None
        for fd in (self.sock.fileno(),):
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        for vring in self.vrings.values():
            if vring.kick_fd is not None:
                self._loop.remove_reader(vring.kick_fd)
            vring.close()
        if self.started:
            self.started = False
            self._safe_device_call(self.device.stopped)
        self._safe_device_call(self.device.disconnected)
        self.memory.close()
        self._cancel_state_transfer("the frontend went away")
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        if self.backend_sock is not None:
            self._loop.remove_reader(self.backend_sock.fileno())
            self.backend_sock.close()
            self.backend_sock = None
        _close_fds(self.reader.take_pending_fds())

    # ================================================================ input

    def _readable(self) -> None:
        """Read and serve what the frontend sent, a header or a payload per
        read, until the socket is empty (at most MAX_READS_PER_CALLBACK).
        A request in the middle of a run of buffers starts a poll of the
        run's rings (`_poll_after_requests`)."""
        served = self.messages
        for _ in range(MAX_READS_PER_CALLBACK):
            if not (self.open and self._reading and self._read_once()):
                break
        self._poll_after_requests(served)

    def _read_once(self) -> bool:
        """One read (a message header or payload) and the messages it
        completes; False when there was nothing to read or the connection
        closed."""
        try:
            data, ancdata, msg_flags, _ = self.sock.recvmsg(
                max(1, self.reader.wanted), socket.CMSG_SPACE(vu.MAX_FDS * 4)
            )
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.close(f"socket error: {exc}", error=True)
            return False
        fds = received_fds(ancdata)
        if msg_flags & socket.MSG_CTRUNC:
            _close_fds(fds)
            self.close("frontend sent more file descriptors than a message may carry", error=True)
            return False
        if not data:
            _close_fds(fds)
            self.close("frontend hung up")
            return False
        try:
            messages = self.reader.feed(data, fds)
        except FrontendError as exc:
            _close_fds(fds)
            self.close(f"protocol violation: {exc}", error=True)
            return False
        for message in messages:
            if not self.open:
                _close_fds(message.fds)
                continue
            self._dispatch(message)
        return self.open

    def _dispatch(self, message: vu.Message) -> None:
        self.messages += 1
        # A request is the guest at work between two buffers (Linux writes
        # `actual` and reads `num_pages` after each), its vCPU waiting for
        # the reply: a round trip like a buffer's, for the poll window.
        self._request_starts()
        try:
            self._serve_request(message)
        finally:
            self._request_done()

    def _serve_request(self, message: vu.Message) -> None:
        if message.need_reply:
            self.acks_requested += 1
        try:
            decoded = vu.decode_request(message)
        except vu.UnsupportedRequest as exc:
            _close_fds(message.fds)
            self.limited.warning("refused request", request=message.request_name, reason=str(exc))
            if message.need_reply:
                self._send(vu.encode_reply(message, vu.encode_u64(1)))
            return
        except FrontendError as exc:
            _close_fds(message.fds)
            self.close(f"protocol violation: {exc}", error=True)
            return
        self.log.debug("request", request=decoded.request.name, payload=repr(decoded.payload)[:200])
        try:
            reply = self._handlers[decoded.request](decoded)
        except FrontendError as exc:
            self.close(f"protocol violation in {decoded.request.name}: {exc}", error=True)
            return
        except Exception:
            self.log.exception("internal error handling request", request=decoded.request.name)
            self.close(f"internal error in {decoded.request.name}", error=True)
            return
        if reply is not None:
            self._send(vu.encode_reply(message, reply))
        elif message.need_reply and self._has_protocol(ProtocolFeature.REPLY_ACK):
            self._send(vu.encode_reply(message, vu.encode_u64(0)))

    def _watch_socket(self, on: bool) -> None:
        """Read requests, or stop reading them while replies pile up."""
        if on and not self._reading and self.open:
            self._loop.add_reader(self.sock.fileno(), self._readable)
        elif not on and self._reading:
            self._loop.remove_reader(self.sock.fileno())
        self._reading = on and self.open

    def _send(self, data: bytes) -> None:
        if self._outbox:
            self._outbox += data
            if len(self._outbox) > MAX_OUTBOX:
                self._watch_socket(False)
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self.close(f"socket error: {exc}", error=True)
            return
        if sent < len(data):
            self._outbox += data[sent:]
            self._loop.add_writer(self.sock.fileno(), self._writable)
            if len(self._outbox) > MAX_OUTBOX:
                self._watch_socket(False)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"socket error: {exc}", error=True)
            return
        del self._outbox[:sent]
        if not self._outbox:
            self._loop.remove_writer(self.sock.fileno())
            self._watch_socket(True)

    def _has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & (1 << feature))

    # ============================================================= features

    def _get_features(self, d: vu.DecodedRequest) -> bytes:
        return vu.encode_u64(self.device.features | (1 << vu.F_PROTOCOL_FEATURES) | (1 << vu.F_LOG_ALL))

    def _set_features(self, d: vu.DecodedRequest) -> None:
        value = d.payload.value  # type: ignore[union-attr]
        offered = self.device.features | (1 << vu.F_PROTOCOL_FEATURES) | (1 << vu.F_LOG_ALL)
        if value & ~offered:
            raise FrontendError(f"acknowledged features {value & ~offered:#x} that were not offered")
        self.acked_features = value & ~(1 << vu.F_PROTOCOL_FEATURES) & ~(1 << vu.F_LOG_ALL)
        self.protocol_bit_acked = bool(value & (1 << vu.F_PROTOCOL_FEATURES))
        self.log.info("features negotiated", features=self.acked_features)
        self.device.set_features(self.acked_features)
        self._set_logging(bool(value & (1 << vu.F_LOG_ALL)))

    def _get_protocol_features(self, d: vu.DecodedRequest) -> bytes:
        return vu.encode_u64(self.offered_protocol_features)

    def _set_protocol_features(self, d: vu.DecodedRequest) -> None:
        value = d.payload.value  # type: ignore[union-attr]
        if value & ~self.offered_protocol_features:
            raise FrontendError(f"protocol features {value:#x} exceed those offered")
        self.protocol_features = value

    def _set_owner(self, d: vu.DecodedRequest) -> None:
        self.owner_set = True

    def _set_status(self, d: vu.DecodedRequest) -> None:
        self.status = d.payload.value & 0xFF  # type: ignore[union-attr]

    def _reset(self, d: vu.DecodedRequest) -> None:
        self._stop_all()
        for vring in self.vrings.values():
            if vring.kick_fd is not None:
                self._loop.remove_reader(vring.kick_fd)
            vring.close()
        self.vrings.clear()
        self.acked_features = None

    # =============================================================== memory

    def _set_mem_table(self, d: vu.DecodedRequest) -> None:
        table: vu.MemTable = d.payload  # type: ignore[assignment]
        total = sum(r.size for r in table.regions)
        if total > self.max_guest_ram:
            # Refused before anything is unmapped or mapped: the frontend
            # cannot make us build a bitmap for terabytes of sparse memfd.
            _close_fds(list(table.fds))
            raise FrontendError(f"memory table of {total:#x} bytes exceeds the guest RAM cap of {self.max_guest_ram:#x}")
        live = self._suspend_rings()
        self._safe_device_call(self.device.memory_unmapping)
        self.memory.close()
        self.memory = GuestMemory(self.max_guest_ram)
        fds = list(table.fds)
        try:
            while fds:
                region = table.regions[len(table.fds) - len(fds)]
                self.memory.add(region, fds.pop(0))
        except FrontendError:
            _close_fds(fds)
            raise
        self.log.info(
            "guest memory mapped",
            regions=[(hex(r.gpa), r.size) for r in self.memory.regions],
            total_bytes=self.memory.total_bytes,
            # Files the frontend could still shrink under us (SIGBUS).
            unsealed_regions=self.memory.unsealed,
        )
        self.device.set_memory(self.memory)
        self._resume_rings(live)

    def _add_mem_reg(self, d: vu.DecodedRequest) -> None:
        single: vu.SingleRegion = d.payload  # type: ignore[assignment]
        if len(self.memory.regions) >= vu.MAX_MEM_SLOTS:
            _close_fds([single.fd] if single.fd is not None else [])
            raise FrontendError(f"more than {vu.MAX_MEM_SLOTS} memory regions")
        live = self._suspend_rings()
        assert single.fd is not None
        self.memory.add(single.region, single.fd)
        self.device.set_memory(self.memory)
        self._resume_rings(live)

    def _rem_mem_reg(self, d: vu.DecodedRequest) -> None:
        single: vu.SingleRegion = d.payload  # type: ignore[assignment]
        if single.fd is not None:
            _close_fds([single.fd])
        live = self._suspend_rings()
        self._safe_device_call(self.device.memory_unmapping)
        if not self.memory.remove(single.region):
            self._resume_rings(live)
            raise FrontendError(f"REM_MEM_REG of a region that is not mapped ({single.region})")
        self.device.set_memory(self.memory)
        self._resume_rings(live)

    def _suspend_rings(self) -> list[Vring]:
        """Take live rings down while the memory they point into changes."""
        live = [v for v in self.vrings.values() if v.live]
        for vring in live:
            held = self._safe_device_call(self.device.queue_stopped, vring) or 0
            self._unwatch_kick(vring)
            vring.base = (vring.stop() - held) & 0xFFFF
        return live

    def _resume_rings(self, rings: list[Vring]) -> None:
        for vring in rings:
            self._try_start(vring)

    # ================================================================ rings

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < MAX_QUEUES:
            raise FrontendError(f"queue index {index} out of range (0..{MAX_QUEUES - 1})")
        vring = self.vrings.get(index)
        if vring is None:
            vring = self.vrings[index] = Vring(index)
            vring.set_log(self._active_log())
        return vring

    def _set_vring_num(self, d: vu.DecodedRequest) -> None:
        state: vu.VringState = d.payload  # type: ignore[assignment]
        vring = self._vring(state.index)
        if not 0 < state.num <= MAX_QUEUE_NUM or state.num & (state.num - 1):
            raise FrontendError(f"queue {state.index}: size {state.num} is not a power of two up to {MAX_QUEUE_NUM}")
        vring.num = state.num

    def _set_vring_base(self, d: vu.DecodedRequest) -> None:
        state: vu.VringState = d.payload  # type: ignore[assignment]
        self._vring(state.index).base = state.num & 0xFFFF

    def _set_vring_addr(self, d: vu.DecodedRequest) -> None:
        addr: vu.VringAddr = d.payload  # type: ignore[assignment]
        vring = self._vring(addr.index)
        vring.addr = addr
        if vring.live:  # addresses changed under a running ring: remap it
            held = self._safe_device_call(self.device.queue_stopped, vring) or 0
            self._unwatch_kick(vring)
            vring.base = (vring.stop() - held) & 0xFFFF
            self._try_start(vring)

    def _file_vring(self, f: vu.VringFile) -> Vring:
        """The ring a KICK/CALL/ERR fd is for; the fd is closed if there is none."""
        try:
            return self._vring(f.index)
        except FrontendError:
            _close_fds([f.fd] if f.fd is not None else [])
            raise

    def _set_vring_kick(self, d: vu.DecodedRequest) -> None:
        f: vu.VringFile = d.payload  # type: ignore[assignment]
        vring = self._file_vring(f)
        if vring.kick_fd is not None:
            self._loop.remove_reader(vring.kick_fd)
        if f.fd is None:
            raise FrontendError("polling mode (kick without an fd) is not supported")
        os.set_blocking(f.fd, False)
        vring.replace_fd("kick_fd", f.fd)
        if vring.live:
            self._watch_kick(vring)
        else:
            # vhost-user: without PROTOCOL_FEATURES a ring starts on its kick fd.
            if not self.protocol_bit_acked:
                vring.enabled = True
            self._try_start(vring)

    def _set_vring_call(self, d: vu.DecodedRequest) -> None:
        f: vu.VringFile = d.payload  # type: ignore[assignment]
        self._file_vring(f).replace_fd("call_fd", f.fd)

    def _set_vring_err(self, d: vu.DecodedRequest) -> None:
        f: vu.VringFile = d.payload  # type: ignore[assignment]
        self._file_vring(f).replace_fd("err_fd", f.fd)

    def _set_vring_enable(self, d: vu.DecodedRequest) -> None:
        state: vu.VringState = d.payload  # type: ignore[assignment]
        if state.num not in (0, 1):
            raise FrontendError(f"SET_VRING_ENABLE with {state.num}")
        vring = self._vring(state.index)
        vring.enabled = bool(state.num)
        if vring.enabled:
            self._try_start(vring)
        else:
            self._stop_all()
            if vring.live and vring.kick_fd is not None:
                # A disabled ring keeps its state but is not processed.
                self._loop.remove_reader(vring.kick_fd)

    def _get_vring_base(self, d: vu.DecodedRequest) -> bytes:
        state: vu.VringState = d.payload  # type: ignore[assignment]
        vring = self._vring(state.index)
        self._stop_all()
        held = 0
        if vring.live:
            held = self._safe_device_call(self.device.queue_stopped, vring) or 0
            if vring.kick_fd is not None:
                self._loop.remove_reader(vring.kick_fd)
        base = (vring.stop() - held) & 0xFFFF
        vring.base = base
        vring.enabled = False
        return vu.VringState(state.index, base).encode()

    def _try_start(self, vring: Vring) -> None:
        if vring.live and vring.enabled:
            # Re-enabled after ENABLE(0) without a GET_VRING_BASE: the ring
            # kept its state; listen to its kicks again and look at it.
            self._watch_kick(vring)
            self._service(vring)
            self._sleep(vring)
            self._check_started()
            return
        if vring.live or not (vring.configured and vring.enabled and self.memory.regions):
            return
        features = self.acked_features or 0
        try:
            vring.start(
                self.memory,
                event_idx=bool(features & (1 << Feature.RING_EVENT_IDX)),
                indirect=bool(features & (1 << Feature.RING_INDIRECT_DESC)),
            )
        except GuestError as exc:
            vring.counters.guest_errors += 1
            self.log.warning("ring not started: bad ring addresses", queue=vring.index, reason=str(exc))
            return
        self._watch_kick(vring)
        self.log.debug("ring live", queue=vring.index, num=vring.num, base=vring.base)
        self._safe_device_call(self.device.queue_started, vring)
        self._sleep(vring)
        self._check_started()

    def _unwatch_kick(self, vring: Vring) -> None:
        if vring.kick_fd is not None:
            self._loop.remove_reader(vring.kick_fd)

    def _watch_kick(self, vring: Vring) -> None:
        """Listen to a ring's kick fd; one epoll cannot watch (a memfd, a
        directory, /dev/null) is the frontend's error, not ours."""
        if vring.kick_fd is None:
            raise FrontendError(f"queue {vring.index}: no kick fd")
        try:
            self._loop.add_reader(vring.kick_fd, self._kicked, vring)
        except (OSError, ValueError) as exc:
            raise FrontendError(f"queue {vring.index}: kick fd cannot be polled ({exc})") from None

    def _check_started(self) -> None:
        if not self.started and all(v.live and v.enabled for v in self.vrings.values() if v.configured):
            self.started = True
            self.log.info("device started", queues=sorted(i for i, v in self.vrings.items() if v.live))
            self._safe_device_call(self.device.started)

    def _kicked(self, vring: Vring) -> None:
        assert vring.kick_fd is not None
        try:
            # Only after poll() says readable, and non-blocking whatever the
            # frontend did to the shared flag: it may have read it first.
            eventfd_drain(vring.kick_fd)
        except (OSError, ValueError) as exc:
            self.log.warning("kick fd unreadable", queue=vring.index, error=str(exc))
            self._loop.remove_reader(vring.kick_fd)
            return
        vring.counters.kicks += 1
        self._poll(vring)

    # ============================================================ polling

    def _ring_live(self, ring: Vring) -> bool:
        return ring.live

    def _ring_pending(self, vring: Vring) -> bool:
        try:
            return vring.queue is not None and vring.queue.pending() > 0
        except ProtocolError:
            return False  # the device's next pass counts and logs it

    def _set_kicks(self, ring: Vring, on: bool) -> None:
        if ring.queue is not None:
            if on:
                ring.queue.enable_kicks()
            else:
                ring.queue.disable_kicks()

    def _request_fd(self) -> int:
        return self.sock.fileno()

    def _requests_wanted(self) -> bool:
        return self._reading

    def _service(self, vring: Vring) -> None:
        self._safe_device_call(self.device.queue_kicked, vring)

    # ============================================================ migration

    def _active_log(self) -> DirtyLog | None:
        return self.dirty_log if self.logging else None

    def _logging_changed(self, on: bool) -> None:
        """Every ring logs its used-ring writes (those whose SET_VRING_ADDR
        asked for it) while VHOST_F_LOG_ALL is on."""
        self.log.info("dirty logging " + ("on" if on else "off"), log_bytes=self.dirty_log.size if self.dirty_log else 0)
        for vring in self.vrings.values():
            vring.set_log(self._active_log())

    def _set_log_base(self, d: vu.DecodedRequest) -> bytes:
        base: vu.LogBase = d.payload  # type: ignore[assignment]
        if not self._has_protocol(ProtocolFeature.LOG_SHMFD):
            _close_fds([base.fd])
            raise FrontendError("SET_LOG_BASE without LOG_SHMFD negotiated")
        log = DirtyLog(base.fd, base.size, base.offset)  # owns the fd from here
        # The new log is in place before the old one goes: QEMU switches logs
        # while logging and releases the old one after our reply.
        old, self.dirty_log = self.dirty_log, log
        for vring in self.vrings.values():
            vring.set_log(self._active_log())
        if old is not None:
            old.close()
        self.log.info("dirty log mapped", log_bytes=base.size)
        return vu.encode_u64(0)

    def _set_device_state_fd(self, d: vu.DecodedRequest) -> bytes:
        request: vu.DeviceStateFd = d.payload  # type: ignore[assignment]
        return vu.encode_u64(self._start_state_transfer(request, self._has_protocol(ProtocolFeature.DEVICE_STATE)))

    def _check_device_state(self, d: vu.DecodedRequest) -> bytes:
        return vu.encode_u64(self._check_state_transfer())

    # ======================================================== config space

    def _get_config(self, d: vu.DecodedRequest) -> bytes:
        window: vu.ConfigSpace = d.payload  # type: ignore[assignment]
        data = self.device.read_config(window.offset, window.size)
        return vu.ConfigSpace(window.offset, window.size, window.flags, data).encode()

    def _set_config(self, d: vu.DecodedRequest) -> None:
        window: vu.ConfigSpace = d.payload  # type: ignore[assignment]
        self.device.write_config(window.offset, window.data)

    # ====================================================== backend channel

    def _set_backend_req_fd(self, d: vu.DecodedRequest) -> None:
        channel: vu.BackendChannel = d.payload  # type: ignore[assignment]
        if self.backend_sock is not None:
            self._loop.remove_reader(self.backend_sock.fileno())
            self.backend_sock.close()
            self.backend_sock = None  # close() must not touch the closed socket if this request fails
        try:
            sock = socket.socket(fileno=channel.fd)
        except OSError as exc:
            _close_fds([channel.fd])
            raise FrontendError(f"backend channel fd is not a socket: {exc}") from None
        if sock.family != socket.AF_UNIX:
            sock.close()
            raise FrontendError("backend channel is not a Unix socket")
        sock.setblocking(False)
        self.backend_sock = sock
        self._loop.add_reader(sock.fileno(), self._backend_readable)

    def _backend_readable(self) -> None:
        """Drain the frontend's replies on the backend channel; we never wait for them."""
        assert self.backend_sock is not None
        try:
            data, ancdata, _, _ = self.backend_sock.recvmsg(4096, socket.CMSG_SPACE(vu.MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancdata = b"", []
        _close_fds(received_fds(ancdata))
        if not data:
            self._loop.remove_reader(self.backend_sock.fileno())
            self.backend_sock.close()
            self.backend_sock = None
            self.log.info("backend channel closed by the frontend")

    def config_changed(self) -> bool:
        """DeviceHost: send CONFIG_CHANGE_MSG if the device is running.

        Never waits for the frontend's acknowledgement: QEMU may be busy in a
        vCPU thread sending us GET_CONFIG, and waiting would deadlock both.
        """
        if not (self.open and self.started and self.backend_sock is not None):
            return False
        if not self._has_protocol(ProtocolFeature.BACKEND_REQ):
            return False
        message = vu.encode_message(vu.BackendRequest.CONFIG_CHANGE_MSG, b"")
        try:
            # MSG_DONTWAIT: non-blocking for this call whatever the frontend
            # did to O_NONBLOCK on the file description it shares with us.
            sent = self.backend_sock.send(message, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            self._backend_channel_full()
            return False
        except OSError as exc:
            self.log.warning("backend channel send failed", error=str(exc))
            return False
        if sent != len(message):
            # A torn header would desynchronise the channel; drop it.
            self.log.error("backend channel message truncated; closing the channel")
            self._loop.remove_reader(self.backend_sock.fileno())
            self.backend_sock.close()
            self.backend_sock = None
            return False
        return True
