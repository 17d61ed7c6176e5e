"""LibvhostUserConnection: one frontend served by libvhost-user.

The library owns the protocol: it reads each message (vu_dispatch), keeps
the rings and the memory table, and calls back. This class is the glue:

- the library's watches (the kick eventfds) become the event loop's
  readers, and the frontend's socket is a reader that calls vu_dispatch;
- a kicked ring is polled as on the pure engine (`PollingConnection`, the
  same window and loop), once the library's kick callback has returned;
- its device callbacks (features, config space) go to the `VirtioDevice`;
- after every message the engine compares the library's rings and memory
  with what it last told the device, and tells the device what changed
  (set_memory, queue_started, started, stopped), as the pure engine does
  from its own handlers;
- messages are read by the binding (`_read_msg`, the library's read_msg
  hook) with the pure engine's framer: a header may come in pieces, more
  than 8 fds or a payload larger than the library's are refused, and a
  message not whole within MESSAGE_WAIT closes the connection. The
  library's own reader took whatever one recvmsg() returned as the header,
  aborted the process on a short payload or more than 8 fds, and waited
  for a missing payload holding the worker;
- a few messages are looked at before the library sees them
  (`_process_msg`): the memory table (fds duplicated for measuring and
  identity, files sealed and sized, the guest-RAM cap), GET_VRING_BASE (the
  device stops the ring first, and chains it still holds are handed back
  with vu_queue_rewind so the reported base does not count them),
  SET_LOG_BASE (the pure engine's DirtyLog, kept and marked by the binding,
  not by the library), the device state requests (FrontendConnection's, shared
  with the pure engine), ring indices the library would not check, and
  requests it would answer with exit().

A protocol error makes the library "panic" (`_panic`): the connection
closes and QEMU reconnects. An assertion inside the library aborts the
process: with one worker process per VM that ends this VM's worker, which
the supervisor restarts.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import select
import socket
import time
from typing import Any, Callable

import structlog

from protocol import vhost_user as vu
from protocol.balloon import Feature
from protocol.errors import FrontendError
from protocol.vhost_user import ProtocolFeature
from protocol.virtqueue import avail_ring_size, desc_table_size, used_ring_size

from ...logs import RateLimited
from ..device_api import VirtioDevice
from ..frontend_connection import received_fds
from ..dirty_log import DirtyLog
from ..memory import DEFAULT_MAX_GUEST_RAM, check_region_file
from ..polling import PollingConnection
from . import abi
from .memory import LibraryMemory
from .ring import LibRing

#: Queues the library is set up for (as many as the pure engine serves).
MAX_QUEUES = 16
#: Seconds the binding waits for the rest of a message once its first bytes
#: came (QEMU sends each in one go). Reading holds the worker's loop, so
#: this stays well below the supervisor's heartbeat timeout.
MESSAGE_WAIT = 1.0
#: The largest payload the library's message struct holds.
MAX_LIBRARY_PAYLOAD = ctypes.sizeof(abi.VhostUserPayload)

# Request numbers (libvhost-user.h, the vhost-user spec).
NONE, GET_FEATURES, SET_FEATURES = 0, 1, 2
RESET_OWNER, RESET_DEVICE = 4, 34
SET_MEM_TABLE, SET_LOG_BASE = 5, 6
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL = 12, 13
SET_VRING_ENABLE = 18
#: In a SET_VRING_KICK/CALL/ERR payload: no fd comes with it.
VRING_NOFD = 1 << 8
#: The largest queue the library serves (its VIRTQUEUE_MAX_SIZE).
MAX_QUEUE_NUM = 1024
GET_CONFIG, SET_CONFIG = 24, 25
GET_INFLIGHT_FD, SET_INFLIGHT_FD = 31, 32
ADD_MEM_REG, REM_MEM_REG = 37, 38
SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE = 42, 43
_RING_INDEXED = (SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE, SET_VRING_ENABLE)

#: Protocol features offered: what QEMU's generic device needs and this
#: engine wires to the device, as the pure engine does (the library would
#: also offer HOST_NOTIFIER, INBAND_NOTIFICATIONS and, with userfaultfd,
#: PAGEFAULT). LOG_SHMFD and DEVICE_STATE, with VHOST_F_LOG_ALL, are live
#: migration: the library keeps the dirty log of its used-ring writes, the
#: device's state goes through the pipe QEMU hands over (FrontendConnection).
OFFERED_PROTOCOL_FEATURES = vu.feature_mask(
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.CONFIG,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
    ProtocolFeature.LOG_SHMFD,
    ProtocolFeature.DEVICE_STATE,
)
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, SET_BACKEND_REQ_FD = 15, 16, 21

F_PROTOCOL_FEATURES = 1 << vu.F_PROTOCOL_FEATURES
F_LOG_ALL = 1 << vu.F_LOG_ALL

_connection_ids = itertools.count(1)


class LibvhostUserConnection(PollingConnection):
    """Serves one frontend with libvhost-user; the interface `VirtualMachine`
    uses of `VhostUserConnection` (run, open, vrings, counters)."""

    def __init__(
        self,
        sock: socket.socket,
        device: VirtioDevice,
        *,
        library: abi.Library,
        log: Any = None,
        poll_seconds: float = 0.0,
        max_guest_ram: int = DEFAULT_MAX_GUEST_RAM,
    ) -> None:
        self.id = next(_connection_ids)
        self.lib = library
        self.device = device
        self.log = (log or structlog.get_logger()).bind(conn=self.id, engine="libvhost-user")
        self.limited = RateLimited(self.log)
        self.max_guest_ram = max_guest_ram
        self._loop = asyncio.get_running_loop()
        self._closed: asyncio.Future[str] = self._loop.create_future()
        self._init_polling(poll_seconds)
        #: Rings the library's kick callback named, polled once it returns (`_watch_fired`).
        self._kicked: list[int] = []
        self.close_reason: str | None = None
        #: Set by the library's panic callback: the connection is broken.
        self.broken_reason: str | None = None
        self._refused: str | None = None
        self._hung_up = False
        # The library reads whole messages with blocking calls: the socket is
        # handed over blocking, and closed by vu_deinit.
        sock.setblocking(True)
        self._sock_fd = sock.detach()
        #: The binding's own handle on the socket, for _read_msg (the library
        #: closes its fd at vu_deinit).
        self._reader = socket.socket(fileno=os.dup(self._sock_fd))
        self._request_poller = select.poll()
        self._request_poller.register(self._sock_fd, select.POLLIN)
        self.dev = abi.VuDev()
        self.dev_ref = ctypes.pointer(self.dev)
        # ctypes callbacks must outlive every call the library makes.
        self._iface = abi.VuDevIface(
            get_features=abi.GET_FEATURES(self._guard(self._get_features, 0)),
            set_features=abi.SET_FEATURES(self._guard(self._set_features, None)),
            get_protocol_features=abi.GET_FEATURES(),
            set_protocol_features=abi.SET_FEATURES(),
            process_msg=abi.PROCESS_MSG(self._guard(self._process_msg, 0)),
            queue_set_started=abi.QUEUE_SET_STARTED(),
            queue_is_processed_in_order=abi.QUEUE_IN_ORDER(),
            get_config=abi.GET_CONFIG(),  # GET_CONFIG is answered by _reply_config
            set_config=abi.SET_CONFIG(self._guard(self._set_config, -1)),
            get_shared_object=abi.GET_SHARED_OBJECT(),
        )
        self._panic_cb = abi.PANIC(self._guard(self._panic, None))
        self._set_watch_cb = abi.SET_WATCH(self._guard(self._set_watch, None))
        self._remove_watch_cb = abi.REMOVE_WATCH(self._guard(self._remove_watch, None))
        self._handler_cb = abi.QUEUE_HANDLER(self._guard(self._queue_handler, None))
        self._read_msg_cb = abi.READ_MSG(self._guard(self._read_msg, False))
        self._watches: dict[int, tuple[Any, int, int]] = {}
        if not library.vu_init(self.dev_ref, MAX_QUEUES, self._sock_fd, self._panic_cb,
                               ctypes.cast(self._read_msg_cb, ctypes.c_void_p),
                               self._set_watch_cb, self._remove_watch_cb, ctypes.byref(self._iface)):
            os.close(self._sock_fd)
            self._reader.close()
            raise abi.LibraryError("vu_init failed (out of memory)")
        self._initialised = True
        self.vrings: dict[int, LibRing] = {}
        for index in range(MAX_QUEUES):
            ring = LibRing(index, self)
            self.vrings[index] = ring
            library.vu_set_queue_handler(self.dev_ref, ring._vq, self._handler_cb)
        self.memory: LibraryMemory | None = None
        #: The engine's duplicates of the region fds, by (gpa, size, frontend address).
        self._region_fds: dict[tuple[int, int, int], tuple[int, int]] = {}
        self._memory_dirty = False
        self.started = False
        self.messages = 0
        self.acked_features: int | None = None
        #: CONFIG_CHANGE_MSGs that found the backend channel full (sent again later).
        self.backend_full = 0
        #: Requests the frontend asked to have acknowledged (NEED_REPLY).
        self.acks_requested = 0
        self._backend_retry: asyncio.TimerHandle | None = None
        #: Migration (FrontendConnection): the state transfer under way or
        #: last done, whether VHOST_F_LOG_ALL is on, and the dirty log (kept
        #: by the binding, not the library: `_set_log_base`).
        self.state_transfer = None
        self.logging = False
        self.dirty_log: DirtyLog | None = None
        device.attach(self)

    # ================================================================ running

    def _start_reading(self) -> None:
        self._loop.add_reader(self._sock_fd, self._readable)

    def _teardown(self) -> None:
        if self._backend_retry is not None:
            self._backend_retry.cancel()
            self._backend_retry = None
        self._loop.remove_reader(self._sock_fd)
        if self.started:
            self.started = False
            self._safe_device_call(self.device.stopped)
        # The device flushes its discards while the library's mappings exist.
        self._safe_device_call(self.device.disconnected)
        self._cancel_state_transfer("the frontend went away")
        for ring in self.vrings.values():
            ring.free_all()
        if self.memory is not None:
            self.memory.release()
            self.memory = None
        if self._initialised:
            self._initialised = False
            self.lib.vu_deinit(self.dev_ref)  # unmaps, closes the socket and the ring fds
            self._reader.close()
        if self.dirty_log is not None:
            self.dirty_log.close()
            self.dirty_log = None
        for fd in list(self._watches):
            self._loop.remove_reader(fd)
        self._watches.clear()
        for fd, _ in self._region_fds.values():
            _close(fd)
        self._region_fds.clear()

    def _guard(self, fn: Callable[..., Any], on_error: Any) -> Callable[..., Any]:
        """A callback the library calls: an exception must not cross into C."""

        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as exc:
                self.log.exception("error in a libvhost-user callback", call=fn.__name__)
                self.broken_reason = self.broken_reason or f"internal error in {fn.__name__}: {exc}"
                return on_error

        return call

    # ================================================================ input

    def _readable(self) -> None:
        if self.close_reason is not None:
            return
        if not self._request_poller.poll(0):
            # The socket is blocking (the library reads whole messages): a
            # poll loop run by an earlier callback of the same event-loop
            # pass may have read the message this callback was for.
            return
        served = self.messages
        self._request_starts()
        try:
            ok = self.lib.vu_dispatch(self.dev_ref)
        finally:
            self._request_done()
        self.messages += 1
        if self._refused is not None:
            self.close(self._refused, error=not self._hung_up)
            return
        if not ok or self.dev.broken or self.broken_reason is not None:
            reason = self.broken_reason or "frontend closed the connection"
            self.close(reason, error=self.broken_reason is not None)
            return
        self._reconcile()
        self._poll_kicked()
        self._poll_after_requests(served)

    def _read_msg(self, dev: Any, fd: int, msg_ptr: Any) -> bool:
        """The library's read_msg: one whole message into *msg_ptr, framed
        by protocol.vhost_user.MessageReader as the pure engine frames it.
        End of file between messages is handed on as the empty message
        (request 0) that `_process_msg` takes for the hang-up. False: the
        connection is refused (`_refused` says why) and closes."""
        vmsg = msg_ptr.contents
        reader = vu.MessageReader()
        deadline: float | None = None
        while True:
            if deadline is not None and not _wait_readable(self._reader, deadline):
                return self._refuse_read(reader, [], f"protocol violation: a message not whole after {MESSAGE_WAIT} s")
            try:
                data, ancdata, msg_flags, _ = self._reader.recvmsg(
                    max(1, reader.wanted), socket.CMSG_SPACE(vu.MAX_FDS * 4))
            except InterruptedError:
                continue
            except OSError as exc:
                return self._refuse_read(reader, [], f"socket error: {exc}")
            fds = received_fds(ancdata)
            if msg_flags & socket.MSG_CTRUNC:
                return self._refuse_read(reader, fds, "frontend sent more file descriptors than a message may carry")
            if not data:
                if deadline is None:  # between messages
                    vmsg.request = NONE
                    vmsg.flags = vmsg.size = vmsg.fd_num = 0
                    return True
                self._hung_up = True
                return self._refuse_read(reader, fds, "frontend closed the connection")
            if deadline is None:
                deadline = time.monotonic() + MESSAGE_WAIT
            try:
                messages = reader.feed(data, fds)
            except FrontendError as exc:
                return self._refuse_read(reader, fds, f"protocol violation: {exc}")
            if messages:
                message = messages[0]  # one read never goes past the message (reader.wanted)
                if len(message.payload) > MAX_LIBRARY_PAYLOAD:
                    return self._refuse_read(reader, list(message.fds), f"protocol violation: payload of "
                                             f"{len(message.payload)} bytes for request {message.request}, "
                                             f"more than any message this engine takes ({MAX_LIBRARY_PAYLOAD})")
                vmsg.request, vmsg.flags, vmsg.size = message.request, message.flags, len(message.payload)
                ctypes.memmove(ctypes.addressof(vmsg.payload), message.payload, len(message.payload))
                for i, received in enumerate(message.fds):
                    vmsg.fds[i] = received
                vmsg.fd_num = len(message.fds)
                vmsg.data = None
                return True

    def _refuse_read(self, reader: vu.MessageReader, fds: list[int], reason: str) -> bool:
        for fd in fds + reader.take_pending_fds():
            _close(fd)
        self._refused = self._refused or reason
        return False

    def _panic(self, dev: Any, err: bytes | None) -> None:
        message = (err or b"").decode("utf-8", "replace").strip() or "libvhost-user error"
        if self.broken_reason is None:
            self.broken_reason = message
        self.limited.warning("libvhost-user refused the frontend's input", error=message)

    def _refuse(self, reason: str, vmsg: Any) -> int:
        """Handle the message by refusing it: its fds are closed and the
        connection closes once vu_dispatch returns."""
        for i in range(min(max(vmsg.fd_num, 0), abi.MAX_FDS)):
            _close(vmsg.fds[i])
        vmsg.fd_num = 0
        self._refused = self._refused or reason
        return 1

    def _hang_up(self, vmsg: Any) -> int:
        self._refuse("frontend closed the connection", vmsg)
        self._hung_up = True
        return 1

    def _validate(self, vmsg: Any, do_reply: Any) -> int | vu.DecodedRequest | None:
        """The framing and payload checks the pure engine makes
        (protocol.vhost_user, shared, not rewritten): a malformed message
        closes the connection, an unknown or unsupported request is refused
        with a NACK and the connection kept, as with the pure engine (an
        int: the message is handled). Else the request, decoded (None: the
        library's end of file)."""
        request, flags = vmsg.request & 0xFFFFFFFF, vmsg.flags
        if request == NONE and vmsg.size == 0 and flags == 0:
            return None  # end of file (see _process_msg)
        if flags & vu.FLAG_VERSION_MASK != vu.VERSION:
            return self._refuse(f"protocol violation: unsupported vhost-user version in flags {flags:#x}", vmsg)
        fd_num = min(max(vmsg.fd_num, 0), abi.MAX_FDS)
        payload = ctypes.string_at(ctypes.addressof(vmsg.payload), min(vmsg.size, ctypes.sizeof(vmsg.payload)))
        message = vu.Message(request, flags, payload, tuple(vmsg.fds[i] for i in range(fd_num)))
        if message.need_reply:
            self.acks_requested += 1
        try:
            decoded = vu.decode_request(message)
        except vu.UnsupportedRequest as exc:
            for i in range(fd_num):
                _close(vmsg.fds[i])
            vmsg.fd_num = 0
            self.limited.warning("refused request", request=message.request_name, reason=str(exc))
            if message.need_reply:
                _reply_u64(vmsg, do_reply, 1)
            return 1
        except FrontendError as exc:
            return self._refuse(f"protocol violation: {exc}", vmsg)
        return decoded

    def _process_msg(self, dev: Any, msg_ptr: Any, do_reply: Any) -> int:
        """Called by the library for each message before it handles it;
        non-zero: handled here (do_reply says whether a reply is to go)."""
        vmsg = msg_ptr.contents
        request = vmsg.request
        decoded = self._validate(vmsg, do_reply)
        if isinstance(decoded, int):
            return decoded
        # The library decided whether to acknowledge before calling us; its
        # own replies (GET_VRING_BASE, ...) would keep the request's
        # NEED_REPLY bit, the pure engine's are exactly VERSION|REPLY.
        vmsg.flags &= ~vu.FLAG_NEED_REPLY
        if request in _RING_INDEXED and vmsg.payload.state.index >= MAX_QUEUES:
            return self._refuse(f"request {request} for queue {vmsg.payload.state.index}, beyond {MAX_QUEUES}", vmsg)
        if request == NONE:
            # The library's reader returns an empty message (request 0) at
            # end of file, and would exit() the process for it.
            return self._hang_up(vmsg)
        if request == GET_FEATURES:
            return _reply_u64(vmsg, do_reply, self._offered_features())
        if request == GET_PROTOCOL_FEATURES:
            return _reply_u64(vmsg, do_reply, OFFERED_PROTOCOL_FEATURES)
        if request == GET_CONFIG:
            return self._reply_config(vmsg, do_reply)
        # What the pure engine refuses beyond the payload checks, and the
        # library would take: queue sizes it cannot serve, ENABLE with
        # anything but 0 or 1, and polling mode (a kick without an fd).
        if request == SET_VRING_NUM:
            num = vmsg.payload.state.num
            if not 0 < num <= MAX_QUEUE_NUM or num & (num - 1):
                return self._refuse(f"protocol violation in SET_VRING_NUM: queue {vmsg.payload.state.index}: "
                                    f"size {num} is not a power of two up to {MAX_QUEUE_NUM}", vmsg)
        if request == SET_VRING_ENABLE and vmsg.payload.state.num not in (0, 1):
            return self._refuse(f"protocol violation in SET_VRING_ENABLE: SET_VRING_ENABLE with {vmsg.payload.state.num}",
                                vmsg)
        if request == SET_VRING_CALL:
            return self._set_vring_call(vmsg)
        if request == SET_VRING_KICK and vmsg.payload.u64 & VRING_NOFD:
            return self._refuse("protocol violation in SET_VRING_KICK: polling mode (kick without an fd) is not "
                                "supported", vmsg)
        if request == SET_PROTOCOL_FEATURES and vmsg.payload.u64 & ~OFFERED_PROTOCOL_FEATURES:
            return self._refuse(f"protocol violation: SET_PROTOCOL_FEATURES acks features never offered: "
                                f"{vmsg.payload.u64 & ~OFFERED_PROTOCOL_FEATURES:#x}", vmsg)
        if request == SET_BACKEND_REQ_FD and vmsg.fd_num == 1:
            problem = _not_a_unix_stream(vmsg.fds[0])
            if problem is not None:
                return self._refuse(f"protocol violation: backend channel {problem}", vmsg)
        if request == SET_FEATURES:
            value = vmsg.payload.u64
            if value & ~self._offered_features():
                return self._refuse(f"SET_FEATURES acks features never offered: {value & ~self._offered_features():#x}",
                                    vmsg)
            return 0
        if request in (GET_INFLIGHT_FD, SET_INFLIGHT_FD):
            return self._refuse("inflight tracking is not offered", vmsg)
        if request == SET_LOG_BASE:
            assert decoded is not None
            return self._set_log_base(vmsg, do_reply, decoded.payload)  # type: ignore[arg-type]
        if request == SET_VRING_ADDR:
            addr: vu.VringAddr = decoded.payload  # type: ignore[union-attr,assignment]
            return self._before_ring_addresses(addr)
        if request == SET_DEVICE_STATE_FD:
            assert decoded is not None
            vmsg.fd_num = 0  # the pipe end is ours now (closed there if refused)
            value = self._start_state_transfer(decoded.payload,  # type: ignore[arg-type]
                                               self._has_protocol(ProtocolFeature.DEVICE_STATE))
            return _reply_u64(vmsg, do_reply, value)
        if request == CHECK_DEVICE_STATE:
            return _reply_u64(vmsg, do_reply, self._check_state_transfer())
        if request == SET_MEM_TABLE:
            return self._before_mem_table(vmsg)
        if request == ADD_MEM_REG:
            return self._before_add_region(vmsg)
        if request == REM_MEM_REG:
            self._before_memory_change()
            return 0
        if request == GET_VRING_BASE:
            self._before_ring_stop(vmsg.payload.state.index)
            return 0
        if request == RESET_DEVICE:
            # Not in the library's table (it would drop the connection): what
            # it does for RESET_OWNER, done here.
            self._stop_all()
            for ring in self.vrings.values():
                ring.vq.enable = 0
            return 1
        if request == RESET_OWNER or (request == SET_VRING_ENABLE and not vmsg.payload.state.num):
            self._stop_all()  # the library disables the rings
        return 0

    def _set_vring_call(self, vmsg: Any) -> int:
        """SET_VRING_CALL, as the library does it but for its write of 1 to
        the new fd (an interrupt "in case of I/O hang after reconnecting"):
        the frontend shares that fd and may hand it over full with
        O_NONBLOCK cleared, and the write would block the worker. The pure
        engine sends no such interrupt either; signals go through
        LibRing.notify, which never blocks."""
        index = vmsg.payload.u64 & 0xFF
        if index >= MAX_QUEUES:
            return self._refuse(f"request {SET_VRING_CALL} for queue {index}, beyond {MAX_QUEUES}", vmsg)
        vq = self.vrings[index].vq
        if vq.call_fd >= 0:
            _close(vq.call_fd)
        # The fd count was checked with the payload (_validate): one fd, or
        # none with the no-fd flag.
        vq.call_fd = -1 if vmsg.payload.u64 & VRING_NOFD else vmsg.fds[0]
        vmsg.fd_num = 0  # ours now (the library closes it at the end)
        return 1

    # =========================================================== migration

    def _set_log_base(self, vmsg: Any, do_reply: Any, base: vu.LogBase) -> int:
        """SET_LOG_BASE, handled here: the log is the pure engine's
        `DirtyLog` (checked, its file sealed against shrinking, mapped), and
        the binding marks every used-ring write in it (`log_used_ring`), as
        the pure engine does. The library is never given the log: it would
        not mark its avail_event writes, and it asserts that every mark
        lies within the log, which would end the worker where the pure
        engine counts and drops such a mark. Its own handler would also have
        put a failed mapping in place and answered with the log's size
        where the pure engine answers 0."""
        vmsg.fd_num = 0  # the fd is ours now (DirtyLog closes it)
        if not self._has_protocol(ProtocolFeature.LOG_SHMFD):
            _close(base.fd)
            return self._refuse("protocol violation: SET_LOG_BASE without LOG_SHMFD negotiated", vmsg)
        try:
            log = DirtyLog(base.fd, base.size, base.offset)
        except FrontendError as exc:
            return self._refuse(f"protocol violation in SET_LOG_BASE: {exc}", vmsg)
        # The new log is in place before the old one goes (QEMU releases the
        # old one after our reply).
        old, self.dirty_log = self.dirty_log, log
        if old is not None:
            old.close()
        self.log.info("dirty log mapped", log_bytes=base.size)
        return _reply_u64(vmsg, do_reply, 0)

    def log_used_ring(self, ring: LibRing) -> None:
        """While logging, mark ring's whole used ring, as the pure engine
        does after every used-ring write (elements, index, avail_event)."""
        log, vring = self.dirty_log, ring.vq.vring
        if self.logging and log is not None and vring.num:
            log.mark(vring.log_guest_addr, used_ring_size(vring.num, True))

    def _logging_changed(self, on: bool) -> None:
        self.log.info("dirty logging " + ("on" if on else "off"),
                      log_bytes=self.dirty_log.size if self.dirty_log is not None else 0)
        if on:
            for ring in self.vrings.values():
                self.log_used_ring(ring)

    # ============================================================ features

    def _offered_features(self) -> int:
        return self.device.features | F_PROTOCOL_FEATURES | F_LOG_ALL

    def _get_features(self, dev: Any) -> int:
        return self.device.features

    def _set_features(self, dev: Any, features: int) -> None:
        self.acked_features = features & ~F_PROTOCOL_FEATURES & ~F_LOG_ALL
        self.log.info("features negotiated", features=self.acked_features)
        self.device.set_features(self.acked_features)
        self._set_logging(bool(features & F_LOG_ALL))

    @property
    def event_idx(self) -> bool:
        """VIRTIO_RING_F_EVENT_IDX negotiated (how the rings ask for interrupts)."""
        return bool((self.acked_features or 0) & (1 << Feature.RING_EVENT_IDX))

    def _has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self.dev.protocol_features & (1 << feature))

    # ======================================================== config space

    def _reply_config(self, vmsg: Any, do_reply: Any) -> int:
        """GET_CONFIG, answered here: the library's callback gets no offset
        and would answer every window from offset 0. The window was checked
        (_validate); the reply is the request's header with the data."""
        window = vmsg.payload.config
        data = self.device.read_config(window.offset, window.size)
        ctypes.memmove(window.region, data, min(len(data), window.size))
        vmsg.fd_num = 0
        vmsg.flags = 0
        do_reply[0] = 1
        return 1

    def _set_config(self, dev: Any, data: Any, offset: int, size: int, flags: int) -> int:
        if size > 256:
            return -1
        self.device.write_config(offset, ctypes.string_at(data, size))
        return 0

    # ============================================================== memory

    def _before_memory_change(self) -> None:
        """The library is about to unmap: discards pending on the old
        mappings are done now (as the pure engine does). Stopped rings
        forget their addresses: the library would map them again under the
        new table, and fail (breaking the connection) where the old frontend
        addresses no longer translate; a ring gets SET_VRING_ADDR again before
        it starts anyway, and the pure engine maps rings only at start."""
        for ring in self.vrings.values():
            vq = ring.vq
            if not vq.started:
                vq.vring.desc = vq.vring.avail = vq.vring.used = None
        self._safe_device_call(self.device.memory_unmapping)
        if self.memory is not None:
            self.memory.release()
            self.memory = None
        self._memory_dirty = True

    def _check_region(self, region: Any, fd: int) -> str | None:
        """Why the region must not be mapped (None: it may): the library maps
        whatever it is sent, and an access beyond the file's end is SIGBUS."""
        try:
            check_region_file(fd, region.mmap_offset, region.memory_size)
        except FrontendError as exc:
            return str(exc)
        return None

    def _before_mem_table(self, vmsg: Any) -> int:
        table = vmsg.payload.memory
        count = table.nregions
        if count > abi.MAX_FDS or count > vmsg.fd_num:
            return self._refuse(f"SET_MEM_TABLE with {count} regions and {vmsg.fd_num} fds", vmsg)
        total = sum(table.regions[i].memory_size for i in range(count))
        if total > self.max_guest_ram:
            return self._refuse(
                f"memory table of {total:#x} bytes exceeds the guest RAM cap of {self.max_guest_ram:#x}", vmsg)
        for i in range(count):
            problem = self._check_region(table.regions[i], vmsg.fds[i])
            if problem is not None:
                return self._refuse(problem, vmsg)
        # A ring the new table does not cover (even a running one) is kept
        # from the library's remapping, which would give up on the connection.
        new = [(table.regions[i].userspace_addr, table.regions[i].memory_size) for i in range(count)]
        for ring in self.vrings.values():
            vq = ring.vq
            if vq.vring.desc and _untranslated((vq.vra.desc_user_addr, vq.vra.avail_user_addr,
                                                vq.vra.used_user_addr), int(vq.vring.num), new) is not None:
                self._unmap_ring(ring, (vq.vra.desc_user_addr, vq.vra.avail_user_addr, vq.vra.used_user_addr))
        self._before_memory_change()
        for fd, _ in self._region_fds.values():
            _close(fd)
        self._region_fds.clear()
        for i in range(count):
            r = table.regions[i]
            self._region_fds[(r.guest_phys_addr, r.memory_size, r.userspace_addr)] = (
                os.dup(vmsg.fds[i]), r.mmap_offset)
        return 0

    def _before_add_region(self, vmsg: Any) -> int:
        if vmsg.fd_num != 1:
            return 0  # the library refuses it
        r = vmsg.payload.memreg.region
        total = sum(size for (_, size, _) in self._region_fds) + r.memory_size
        if total > self.max_guest_ram:
            return self._refuse(
                f"guest RAM of {total:#x} bytes exceeds the cap of {self.max_guest_ram:#x} (--max-guest-ram)", vmsg)
        problem = self._check_region(r, vmsg.fds[0])
        if problem is not None:
            return self._refuse(problem, vmsg)
        self._before_memory_change()
        self._region_fds[(r.guest_phys_addr, r.memory_size, r.userspace_addr)] = (os.dup(vmsg.fds[0]), r.mmap_offset)
        return 0

    def _rebuild_memory(self) -> None:
        regions = []
        kept: dict[tuple[int, int, int], tuple[int, int]] = {}
        dev = self.dev
        for i in range(dev.nregions):
            r = dev.regions[i]
            key = (r.gpa, r.size, r.qva)
            if key not in self._region_fds:
                continue
            fd, file_offset = self._region_fds[key]
            kept[key] = (fd, file_offset)
            regions.append(LibraryMemory.region(r.gpa, r.size, fd, file_offset, r.mmap_addr + r.mmap_offset))
        for key, (fd, _) in self._region_fds.items():
            if key not in kept:
                _close(fd)  # a removed region
        self._region_fds = kept
        self.memory = LibraryMemory(regions) if regions else None
        if self.memory is not None:
            self.device.set_memory(self.memory)

    # =============================================================== rings

    def _before_ring_addresses(self, addr: vu.VringAddr) -> int:
        """SET_VRING_ADDR: addresses that do not translate in the memory
        table are kept from the library, which would give up on the
        connection; the ring is `unmapped` (it forgets its old addresses and
        cannot go live) until good ones come or a memory table in which
        these translate (`_map_unmapped_rings`), as a pure engine's ring
        maps its addresses when it starts. 0: the library takes the message."""
        ring = self.vrings[addr.index]
        areas = (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)
        regions = [(r.qva, r.size) for r in self._library_regions()]
        problem = _untranslated(areas, int(ring.vq.vring.num), regions)
        if problem is None:
            ring.unmapped = None
            return 0
        self._unmap_ring(ring, areas)
        self.limited.warning("ring addresses outside guest RAM: the ring stays stopped", queue=addr.index,
                             reason=problem)
        return 1

    def _library_regions(self) -> list[Any]:
        dev = self.dev
        return [dev.regions[i] for i in range(dev.nregions)] if dev.regions else []

    def _unmap_ring(self, ring: LibRing, areas: tuple[int, int, int]) -> None:
        ring.unmapped = areas
        vring = ring.vq.vring
        vring.desc = vring.avail = vring.used = None

    def _map_unmapped_rings(self) -> None:
        """After a memory change: rings whose addresses translate now are
        mapped as the library maps a ring (its map_ring)."""
        regions = self._library_regions()
        for ring in self.vrings.values():
            if ring.unmapped is None:
                continue
            num = int(ring.vq.vring.num)
            if _untranslated(ring.unmapped, num, [(r.qva, r.size) for r in regions]) is not None:
                continue
            host = []
            for qva in ring.unmapped:
                r = next(r for r in regions if r.qva <= qva < r.qva + r.size)
                host.append(qva - r.qva + r.mmap_addr + r.mmap_offset)
            vring = ring.vq.vring
            vring.desc, vring.avail, vring.used = host
            ring.unmapped = None

    def _before_ring_stop(self, index: int) -> None:
        """GET_VRING_BASE: stop the device and the ring before the library
        reads the base, and give back the chains the device holds."""
        self._stop_all()
        ring = self.vrings[index]
        if ring.reported_live:
            self._safe_device_call(self.device.queue_stopped, ring)
            ring.drop_held()
            ring.reported_live = False

    def _reconcile(self) -> None:
        """Tell the device what the message just handled changed."""
        if self._memory_dirty:
            self._memory_dirty = False
            self._rebuild_memory()
            self._map_unmapped_rings()
        for ring in self.vrings.values():
            if ring.reported_live and not ring.live:
                ring.reported_live = False  # the library dropped it (e.g. a new kick fd)
            if ring.live and ring.enabled and not ring.reported_live:
                ring.mark_started()
                self.log.debug("ring live", queue=ring.index, base=ring.base)
                self._safe_device_call(self.device.queue_started, ring)
        configured = [r for r in self.vrings.values() if r.configured]
        if not self.started and configured and all(r.reported_live and r.enabled for r in configured):
            self.started = True
            self.log.info("device started", queues=sorted(r.index for r in configured))
            self._safe_device_call(self.device.started)
            # Rings re-enabled after ENABLE(0) kept their state: what was
            # added meanwhile (its kicks went unserved) is looked at now.
            for ring in configured:
                self._service(ring)
                self._sleep(ring)

    def _queue_handler(self, dev: Any, index: int) -> None:
        """The library's kick callback: the ring is polled once the callback
        has returned to the binding (`_watch_fired`), not from inside the
        library, since a poll also serves the frontend's requests."""
        self.vrings[index].counters.kicks += 1
        self._kicked.append(index)

    def _service(self, ring: LibRing) -> None:
        if not (ring.reported_live and ring.enabled) or self.close_reason is not None or self._broken:
            return
        self._safe_device_call(self.device.queue_kicked, ring)
        self.log_used_ring(ring)  # a pass's pops write avail_event
        if self._broken:
            # The library gave up on the connection (bad chains are vetted
            # before it pops them, LibRing._vet; what it still refuses).
            self._loop.call_soon(self._close_broken)

    @property
    def _broken(self) -> bool:
        return bool(self.dev.broken) or self.broken_reason is not None

    # ==================================================== polling's hooks

    def _ring_live(self, ring: LibRing) -> bool:
        return ring.reported_live and ring.live and not self._broken

    def _ring_pending(self, ring: LibRing) -> bool:
        return not self._broken and ring.pending()

    def _set_kicks(self, ring: LibRing, on: bool) -> None:
        if ring.live and not self._broken:
            ring.set_kicks(on)
            self.log_used_ring(ring)

    def _request_fd(self) -> int:
        return self._sock_fd

    def _requests_wanted(self) -> bool:
        return True

    def _close_broken(self) -> None:
        self.close(self.broken_reason or "libvhost-user broke the connection", error=True)

    # ============================================================= watches

    def _set_watch(self, dev: Any, fd: int, condition: int, cb: Any, data: Any) -> None:
        self._watches[fd] = (cb, condition, data or 0)
        try:
            self._loop.add_reader(fd, self._watch_fired, fd)
        except (OSError, ValueError) as exc:
            self._watches.pop(fd, None)
            self.broken_reason = self.broken_reason or f"fd {fd} cannot be polled ({exc})"

    def _remove_watch(self, dev: Any, fd: int) -> None:
        if self._watches.pop(fd, None) is not None:
            self._loop.remove_reader(fd)

    def _watch_fired(self, fd: int) -> None:
        watch = self._watches.get(fd)
        if watch is None or self.close_reason is not None:
            return
        cb, condition, data = watch
        cb(self.dev_ref, condition, data)
        if self._broken:
            self._close_broken()
            return
        self._poll_kicked()

    def _poll_kicked(self) -> None:
        """Poll the rings the library's kick callback named (`_queue_handler`)."""
        kicked, self._kicked = self._kicked, []
        for index in kicked:
            ring = self.vrings[index]
            if self.open and ring.reported_live and ring.enabled:
                self._poll(ring)

    # ====================================================== backend channel

    def config_changed(self) -> bool:
        """DeviceHost: CONFIG_CHANGE_MSG on the backend channel, if the device
        runs. The library writes it with a blocking call: it is made only
        when the channel has room (poll), else retried like the pure engine."""
        if not (self.open and self.started and self.dev.backend_fd >= 0):
            return False
        if not self._has_protocol(ProtocolFeature.BACKEND_REQ):
            return False
        poller = select.poll()
        poller.register(self.dev.backend_fd, select.POLLOUT)
        if not any(ev & select.POLLOUT for _, ev in poller.poll(0)):
            self._backend_channel_full()
            return False
        self.lib.vu_config_change_msg(self.dev_ref)
        if self.dev.broken:
            self._loop.call_soon(self._close_broken)
            return False
        return True

def _untranslated(areas: tuple[int, int, int], num: int, regions: list[tuple[int, int]]) -> str | None:
    """Which of a ring's areas (frontend addresses of the descriptor table,
    avail ring and used ring of a queue of `num`) lies outside every region
    (frontend address, size), or None if each lies within one."""
    sizes = (desc_table_size(num), avail_ring_size(num, True), used_ring_size(num, True))
    for start, size, what in zip(areas, sizes, ("descriptor table", "avail ring", "used ring")):
        if not any(qva <= start and start + size <= qva + length for qva, length in regions):
            return f"{what} at {start:#x} lies outside guest RAM"
    return None


def _reply_u64(vmsg: Any, do_reply: Any, value: int) -> int:
    """Answer the message here with a u64; flags are set to exactly
    VERSION|REPLY (the library's own replies keep the request's NEED_REPLY)."""
    vmsg.payload.u64 = value
    vmsg.size = 8
    vmsg.fd_num = 0
    vmsg.flags = 0
    do_reply[0] = 1
    return 1


def _not_a_unix_stream(fd: int) -> str | None:
    copy = os.dup(fd)
    try:
        probe = socket.socket(fileno=copy)
    except OSError as exc:
        _close(copy)
        return f"fd is not a socket: {exc}"
    try:
        if probe.family != socket.AF_UNIX or probe.type != socket.SOCK_STREAM:
            return "is not a Unix stream socket"
        return None
    finally:
        probe.close()


def _wait_readable(sock: socket.socket, deadline: float) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            return bool(poller.poll(max(1, int(left * 1000))))
        except InterruptedError:
            continue


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
