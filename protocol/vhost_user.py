"""vhost-user: framing, requests and payloads, as QEMU 10.x speaks them.

A vhost-user message is a 12-byte little-endian header (request, flags, size)
followed by `size` bytes of payload; file descriptors travel as SCM_RIGHTS
ancillary data with the header. This module turns a byte stream plus fds into
`Message` values (`MessageReader`), decodes each request's payload into a
typed value after validating it (`decode_request`), and encodes replies and
backend-initiated messages.

`MessageReader` tells its caller how many bytes it wants next, so an I/O layer
can read exactly one header, then exactly one payload. That matters for fds:
the kernel hands the fds of a message to the read that returns its first byte,
so reading message by message attributes every fd to the right message.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Union

from .errors import FrontendError

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size

#: The largest payload accepted. QEMU's largest message for a generic device
#: is a SET_CONFIG/GET_CONFIG with a 256-byte config space (268 bytes), and the
#: memory table (8 + 8 * 32 bytes); 4 KiB leaves room without letting a peer
#: make the daemon buffer megabytes.
MAX_PAYLOAD = 4096

#: The most fds one message may carry (one per memory region, as QEMU does).
MAX_FDS = 8

#: Memory regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_TABLE_REGIONS = 8

#: Memory slots advertised with CONFIGURE_MEM_SLOTS (GET_MAX_MEM_SLOTS reply).
MAX_MEM_SLOTS = 32

#: The vhost-user bit in the virtio feature word that announces protocol features.
F_PROTOCOL_FEATURES = 30

#: Device feature bit (vhost's own, never the guest's): the frontend turns it
#: on in SET_FEATURES while migrating, and the backend then logs every write
#: it makes to guest memory in the shared log (SET_LOG_BASE).
F_LOG_ALL = 26

VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

#: Bits 0-7 of a vring-file payload are the queue index; bit 8 says "no fd".
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100


class Request(enum.IntEnum):
    """Frontend-to-backend request codes."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Backend-to-frontend request codes (sent on the backend channel)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the vhost-user protocol feature word."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def feature_mask(*bits: int) -> int:
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


def feature_names(word: int, names: type[enum.IntEnum]) -> list[str]:
    """Names of the bits set in `word`, unknown bits as `bit<N>`."""
    out = []
    for bit in range(64):
        if word & (1 << bit):
            try:
                out.append(names(bit).name)
            except ValueError:
                out.append(f"bit{bit}")
    return out


# ---------------------------------------------------------------- framing


@dataclass(frozen=True)
class Message:
    """One framed vhost-user message, payload still raw."""

    request: int
    flags: int
    payload: bytes = b""
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def request_name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"UNKNOWN({self.request})"


class MessageReader:
    """Incremental vhost-user framer: feed bytes and fds, collect `Message`s.

    `wanted` is the number of bytes that completes the current header or
    payload; an I/O layer that reads exactly that much never mixes two
    messages in one read. Any read size works, though: surplus bytes are kept.
    Fds are attached to the message whose header the chunk they came with
    starts; fds arriving mid-payload are a protocol violation.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._header: tuple[int, int, int] | None = None
        self._fds: list[int] = []
        self._messages: list[Message] = []

    @property
    def wanted(self) -> int:
        if self._header is None:
            return HEADER_SIZE - len(self._buffer)
        return self._header[2] - len(self._buffer)

    @property
    def idle(self) -> bool:
        """True between messages (nothing partial buffered)."""
        return self._header is None and not self._buffer

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Message]:
        """Add bytes (and the fds received with them); return completed messages.

        Raises FrontendError on a malformed header. The caller owns any fds
        it passed in and must close them if this raises; fds of completed
        messages belong to those messages.
        """
        if fds:
            if not self.idle and self._header is not None:
                raise FrontendError("file descriptors arrived in the middle of a payload")
            self._fds.extend(fds)
            if len(self._fds) > MAX_FDS:
                raise FrontendError(f"more than {MAX_FDS} fds for one message")
        self._buffer += data
        completed = []
        while True:
            if self._header is None:
                if len(self._buffer) < HEADER_SIZE:
                    break
                request, flags, size = HEADER.unpack_from(self._buffer)
                del self._buffer[:HEADER_SIZE]
                if flags & FLAG_VERSION_MASK != VERSION:
                    raise FrontendError(f"unsupported vhost-user version in flags {flags:#x}")
                if size > MAX_PAYLOAD:
                    raise FrontendError(f"payload of {size} bytes exceeds the {MAX_PAYLOAD}-byte limit")
                self._header = (request, flags, size)
            request, flags, size = self._header
            if len(self._buffer) < size:
                break
            payload = bytes(self._buffer[:size])
            del self._buffer[:size]
            completed.append(Message(request, flags, payload, tuple(self._fds)))
            self._fds = []
            self._header = None
        return completed

    def take_pending_fds(self) -> list[int]:
        """Fds not yet attached to a completed message (to close on teardown)."""
        fds, self._fds = self._fds, []
        return fds


def encode_message(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(message: Message, payload: bytes) -> bytes:
    """A reply to `message`: same request code, flags exactly VERSION|REPLY."""
    return encode_message(message.request, payload, VERSION | FLAG_REPLY)


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


# ---------------------------------------------------------------- payloads

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")
MEM_TABLE_HEAD = struct.Struct("<II")
CONFIG_HEAD = struct.Struct("<III")
#: The largest config space QEMU's vhost-user code moves (VHOST_USER_MAX_CONFIG_SIZE).
MAX_CONFIG_SIZE = 256
VRING_ADDR_F_LOG = 0x1
LOG_BASE = struct.Struct("<QQ")  # mmap_size, mmap_offset
DEVICE_STATE = struct.Struct("<II")  # direction, phase

#: SET_DEVICE_STATE_FD directions and the only phase defined so far.
STATE_DIRECTION_SAVE = 0
STATE_DIRECTION_LOAD = 1
STATE_PHASE_STOPPED = 0


@dataclass(frozen=True)
class MemoryRegion:
    """One guest RAM region as the frontend describes it."""

    guest_phys_addr: int
    size: int
    userspace_addr: int
    mmap_offset: int

    def validate(self) -> None:
        if self.size == 0:
            raise FrontendError("memory region of size 0")
        for name in ("guest_phys_addr", "userspace_addr", "mmap_offset"):
            if getattr(self, name) + self.size > 1 << 64:
                raise FrontendError(f"memory region {name} + size overflows 64 bits")

    def encode(self) -> bytes:
        return MEM_REGION.pack(self.guest_phys_addr, self.size, self.userspace_addr, self.mmap_offset)


@dataclass(frozen=True)
class U64Payload:
    value: int


@dataclass(frozen=True)
class VringState:
    index: int
    num: int

    def encode(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    def encode(self) -> bytes:
        return VRING_ADDR.pack(
            self.index, self.flags, self.desc_user_addr, self.used_user_addr, self.avail_user_addr, self.log_guest_addr
        )


@dataclass(frozen=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR: a queue index and an eventfd (or none)."""

    index: int
    fd: int | None


@dataclass(frozen=True)
class MemTable:
    regions: tuple[MemoryRegion, ...]
    fds: tuple[int, ...]


@dataclass(frozen=True)
class SingleRegion:
    """ADD_MEM_REG / REM_MEM_REG."""

    region: MemoryRegion
    fd: int | None


@dataclass(frozen=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG: a window into the device config space."""

    offset: int
    size: int
    flags: int
    data: bytes

    def encode(self) -> bytes:
        return CONFIG_HEAD.pack(self.offset, self.size, self.flags) + self.data


@dataclass(frozen=True)
class BackendChannel:
    fd: int


@dataclass(frozen=True)
class LogBase:
    """SET_LOG_BASE with LOG_SHMFD: the dirty log is `size` bytes of `fd` from `offset`."""

    size: int
    offset: int
    fd: int


@dataclass(frozen=True)
class DeviceStateFd:
    """SET_DEVICE_STATE_FD: one end of a pipe to write (save) or read (load) the state through."""

    direction: int
    phase: int
    fd: int


@dataclass(frozen=True)
class NoPayload:
    pass


Payload = Union[U64Payload, VringState, VringAddr, VringFile, MemTable, SingleRegion, ConfigSpace, BackendChannel,
                LogBase, DeviceStateFd, NoPayload]


@dataclass(frozen=True)
class DecodedRequest:
    message: Message
    request: Request
    payload: Payload = field(default_factory=NoPayload)


def _expect_size(message: Message, size: int) -> None:
    if len(message.payload) != size:
        raise FrontendError(f"{message.request_name}: payload is {len(message.payload)} bytes, expected {size}")


def _expect_fds(message: Message, count: int) -> None:
    if len(message.fds) != count:
        raise FrontendError(f"{message.request_name}: carries {len(message.fds)} fds, expected {count}")


_U64_REQUESTS = {
    Request.SET_FEATURES,
    Request.SET_PROTOCOL_FEATURES,
    Request.SET_STATUS,
}
_NO_PAYLOAD_REQUESTS = {
    Request.GET_FEATURES,
    Request.GET_PROTOCOL_FEATURES,
    Request.SET_OWNER,
    Request.RESET_OWNER,
    Request.GET_QUEUE_NUM,
    Request.GET_MAX_MEM_SLOTS,
    Request.GET_STATUS,
    Request.RESET_DEVICE,
    Request.CHECK_DEVICE_STATE,
}
_VRING_STATE_REQUESTS = {
    Request.SET_VRING_NUM,
    Request.SET_VRING_BASE,
    Request.GET_VRING_BASE,
    Request.SET_VRING_ENABLE,
}
_VRING_FILE_REQUESTS = {Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR}

#: Requests this backend implements; anything else is refused (see `decode_request`).
SUPPORTED_REQUESTS = frozenset(
    _U64_REQUESTS
    | _NO_PAYLOAD_REQUESTS
    | _VRING_STATE_REQUESTS
    | _VRING_FILE_REQUESTS
    | {
        Request.SET_VRING_ADDR,
        Request.SET_MEM_TABLE,
        Request.ADD_MEM_REG,
        Request.REM_MEM_REG,
        Request.GET_CONFIG,
        Request.SET_CONFIG,
        Request.SET_BACKEND_REQ_FD,
        Request.SET_LOG_BASE,
        Request.SET_DEVICE_STATE_FD,
    }
)


class UnsupportedRequest(FrontendError):
    """A well-framed request this backend does not implement."""


def decode_request(message: Message) -> DecodedRequest:
    """Validate a message's payload and fds and decode it.

    Raises UnsupportedRequest for requests outside SUPPORTED_REQUESTS (the
    caller refuses them without dropping the connection when it can), and
    FrontendError for malformed payloads. The fds stay owned by `message`.
    """
    try:
        request = Request(message.request)
    except ValueError:
        raise UnsupportedRequest(f"unknown request {message.request}") from None
    if request not in SUPPORTED_REQUESTS:
        raise UnsupportedRequest(f"{request.name} is not supported by this backend")
    if message.flags & FLAG_REPLY:
        raise FrontendError(f"{request.name}: reply flag set on a request")

    if request in _NO_PAYLOAD_REQUESTS:
        # QEMU sends these with an empty payload; tolerate a u64 slot some
        # frontends include, but nothing larger.
        if len(message.payload) not in (0, 8):
            raise FrontendError(f"{request.name}: unexpected {len(message.payload)}-byte payload")
        _expect_fds(message, 0)
        return DecodedRequest(message, request, NoPayload())
    if request in _U64_REQUESTS:
        _expect_size(message, U64.size)
        _expect_fds(message, 0)
        return DecodedRequest(message, request, U64Payload(U64.unpack(message.payload)[0]))
    if request in _VRING_STATE_REQUESTS:
        _expect_size(message, VRING_STATE.size)
        _expect_fds(message, 0)
        return DecodedRequest(message, request, VringState(*VRING_STATE.unpack(message.payload)))
    if request in _VRING_FILE_REQUESTS:
        _expect_size(message, U64.size)
        (value,) = U64.unpack(message.payload)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise FrontendError(f"{request.name}: reserved bits set in {value:#x}")
        nofd = bool(value & VRING_NOFD_MASK)
        _expect_fds(message, 0 if nofd else 1)
        return DecodedRequest(message, request, VringFile(value & VRING_INDEX_MASK, None if nofd else message.fds[0]))
    if request is Request.SET_VRING_ADDR:
        _expect_size(message, VRING_ADDR.size)
        _expect_fds(message, 0)
        return DecodedRequest(message, request, VringAddr(*VRING_ADDR.unpack(message.payload)))
    if request is Request.SET_MEM_TABLE:
        if len(message.payload) < MEM_TABLE_HEAD.size:
            raise FrontendError("SET_MEM_TABLE: payload shorter than its header")
        nregions, padding = MEM_TABLE_HEAD.unpack_from(message.payload)
        if not 1 <= nregions <= MAX_MEM_TABLE_REGIONS:
            raise FrontendError(f"SET_MEM_TABLE: {nregions} regions (1 to {MAX_MEM_TABLE_REGIONS} allowed)")
        if padding:
            raise FrontendError("SET_MEM_TABLE: non-zero padding")
        # QEMU sizes the payload to the regions it sends; accept the full
        # 8-region array some frontends send, too.
        used = MEM_TABLE_HEAD.size + nregions * MEM_REGION.size
        full = MEM_TABLE_HEAD.size + MAX_MEM_TABLE_REGIONS * MEM_REGION.size
        if len(message.payload) not in (used, full):
            raise FrontendError(f"SET_MEM_TABLE: payload of {len(message.payload)} bytes for {nregions} regions")
        _expect_fds(message, nregions)
        regions = tuple(
            MemoryRegion(*MEM_REGION.unpack_from(message.payload, MEM_TABLE_HEAD.size + i * MEM_REGION.size))
            for i in range(nregions)
        )
        for region in regions:
            region.validate()
        _check_no_overlap(regions)
        return DecodedRequest(message, request, MemTable(regions, message.fds))
    if request in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        _expect_size(message, U64.size + MEM_REGION.size)
        (padding,) = U64.unpack_from(message.payload)
        if padding:
            raise FrontendError(f"{request.name}: non-zero padding")
        region = MemoryRegion(*MEM_REGION.unpack_from(message.payload, U64.size))
        region.validate()
        if request is Request.ADD_MEM_REG:
            _expect_fds(message, 1)
            return DecodedRequest(message, request, SingleRegion(region, message.fds[0]))
        # QEMU passes the region's fd with REM_MEM_REG too; it is not needed.
        if len(message.fds) > 1:
            raise FrontendError("REM_MEM_REG: more than one fd")
        return DecodedRequest(message, request, SingleRegion(region, message.fds[0] if message.fds else None))
    if request in (Request.GET_CONFIG, Request.SET_CONFIG):
        if len(message.payload) < CONFIG_HEAD.size:
            raise FrontendError(f"{request.name}: payload shorter than its header")
        offset, size, flags = CONFIG_HEAD.unpack_from(message.payload)
        if size > MAX_CONFIG_SIZE or offset > MAX_CONFIG_SIZE or offset + size > MAX_CONFIG_SIZE:
            raise FrontendError(f"{request.name}: window {offset}+{size} outside the config space")
        if len(message.payload) != CONFIG_HEAD.size + size:
            raise FrontendError(f"{request.name}: payload of {len(message.payload)} bytes for a {size}-byte window")
        _expect_fds(message, 0)
        data = message.payload[CONFIG_HEAD.size :]
        return DecodedRequest(message, request, ConfigSpace(offset, size, flags, data))
    if request is Request.SET_BACKEND_REQ_FD:
        if len(message.payload) not in (0, 8):
            raise FrontendError("SET_BACKEND_REQ_FD: unexpected payload")
        _expect_fds(message, 1)
        return DecodedRequest(message, request, BackendChannel(message.fds[0]))
    if request is Request.SET_LOG_BASE:
        # Only the shared-memory form (LOG_SHMFD): a log given as an address
        # in the frontend's own process is of no use to another process.
        _expect_size(message, LOG_BASE.size)
        _expect_fds(message, 1)
        size, offset = LOG_BASE.unpack(message.payload)
        if offset + size > 1 << 64:
            raise FrontendError("SET_LOG_BASE: offset + size overflows 64 bits")
        return DecodedRequest(message, request, LogBase(size, offset, message.fds[0]))
    if request is Request.SET_DEVICE_STATE_FD:
        _expect_size(message, DEVICE_STATE.size)
        _expect_fds(message, 1)
        direction, phase = DEVICE_STATE.unpack(message.payload)
        return DecodedRequest(message, request, DeviceStateFd(direction, phase, message.fds[0]))
    raise UnsupportedRequest(f"{request.name} is not supported by this backend")  # pragma: no cover


def _check_no_overlap(regions: tuple[MemoryRegion, ...]) -> None:
    spans = sorted((r.guest_phys_addr, r.guest_phys_addr + r.size) for r in regions)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        if start < end:
            raise FrontendError("memory regions overlap in guest-physical space")


# ------------------------------------------------------------ encoding helpers
# Used by the test frontend and fuzzers to produce requests; the daemon only
# decodes requests and encodes replies.


def encode_mem_table(regions: list[MemoryRegion]) -> bytes:
    return MEM_TABLE_HEAD.pack(len(regions), 0) + b"".join(r.encode() for r in regions)


def encode_single_region(region: MemoryRegion) -> bytes:
    return U64.pack(0) + region.encode()


def encode_log_base(size: int, offset: int = 0) -> bytes:
    return LOG_BASE.pack(size, offset)


def encode_device_state_fd(direction: int, phase: int = STATE_PHASE_STOPPED) -> bytes:
    return DEVICE_STATE.pack(direction, phase)


def encode_vring_file(index: int, has_fd: bool) -> bytes:
    return U64.pack(index | (0 if has_fd else VRING_NOFD_MASK))
