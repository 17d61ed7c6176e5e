"""The libvhost-user ABI as ctypes sees it, and loading the library.

libvhost-user's structs are not a stable ABI: they change between QEMU
releases. The shared object is built by scripts/lib/libvhost-user.sh from
the same source as QEMU, together with `layout_probe.c`, which prints the
size of every struct declared here and the offset of every field (as the
compiler laid them out). `load` compares each of them with ctypes' own
layout and refuses a library that differs anywhere, with one line naming
the first difference: a wrong offset would be a wrong read of guest-driven
state, never an error.
"""

from __future__ import annotations

import ctypes
import json
import os
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    Union,
    c_bool,
    c_char_p,
    c_int,
    c_size_t,
    c_uint,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
    c_void_p,
)
from dataclasses import dataclass
from typing import Any

#: VHOST_MEMORY_BASELINE_NREGIONS: fds one message carries.
MAX_FDS = 8
VHOST_USER_MAX_RAM_SLOTS = 509


class LibraryError(Exception):
    """libvhost-user cannot be used: missing, unloadable, or its layout differs."""


# ------------------------------------------------------------------ structs


class VuDevRegion(Structure):
    _fields_ = [
        ("gpa", c_uint64),
        ("size", c_uint64),
        ("qva", c_uint64),
        ("mmap_offset", c_uint64),
        ("mmap_addr", c_uint64),
    ]


class VuRing(Structure):
    _fields_ = [
        ("num", c_uint),
        ("desc", c_void_p),
        ("avail", c_void_p),
        ("used", c_void_p),
        ("log_guest_addr", c_uint64),
        ("flags", c_uint32),
    ]


class VhostVringAddr(Structure):  # struct vhost_vring_addr (linux/vhost_types.h)
    _fields_ = [
        ("index", c_uint),
        ("flags", c_uint),
        ("desc_user_addr", c_uint64),
        ("used_user_addr", c_uint64),
        ("avail_user_addr", c_uint64),
        ("log_guest_addr", c_uint64),
    ]


class VuVirtq(Structure):
    _fields_ = [
        ("vring", VuRing),
        ("inflight", c_void_p),
        ("resubmit_list", c_void_p),
        ("resubmit_num", c_uint16),
        ("counter", c_uint64),
        ("last_avail_idx", c_uint16),
        ("shadow_avail_idx", c_uint16),
        ("used_idx", c_uint16),
        ("signalled_used", c_uint16),
        ("signalled_used_valid", c_bool),
        ("notification", c_bool),
        ("inuse", c_uint),
        ("handler", c_void_p),
        ("call_fd", c_int),
        ("kick_fd", c_int),
        ("err_fd", c_int),
        ("enable", c_uint),
        ("started", c_bool),
        ("vra", VhostVringAddr),
    ]


class VuDevInflightInfo(Structure):
    _fields_ = [("fd", c_int), ("addr", c_void_p), ("size", c_uint64)]


class VuDev(Structure):
    pass


class VhostUserMemoryRegion(Structure):
    _fields_ = [
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
        ("mmap_offset", c_uint64),
    ]


class VhostUserMemory(Structure):
    _fields_ = [
        ("nregions", c_uint32),
        ("padding", c_uint32),
        ("regions", VhostUserMemoryRegion * MAX_FDS),
    ]


class VhostUserMemRegMsg(Structure):
    _fields_ = [("padding", c_uint64), ("region", VhostUserMemoryRegion)]


class VhostVringState(Structure):  # struct vhost_vring_state
    _fields_ = [("index", c_uint), ("num", c_uint)]


class VhostUserConfig(Structure):
    _fields_ = [("offset", c_uint32), ("size", c_uint32), ("flags", c_uint32), ("region", c_uint8 * 256)]


class VhostUserPayload(Union):
    # Only the members the binding reads; the probe checks the union's size,
    # which the largest member (the config space window) sets.
    _fields_ = [
        ("u64", c_uint64),
        ("state", VhostVringState),
        ("memory", VhostUserMemory),
        ("memreg", VhostUserMemRegMsg),
        ("config", VhostUserConfig),
    ]


class VhostUserMsg(Structure):
    _pack_ = 1
    _fields_ = [
        ("request", c_int),
        ("flags", c_uint32),
        ("size", c_uint32),
        ("payload", VhostUserPayload),
        ("fds", c_int * MAX_FDS),
        ("fd_num", c_int),
        ("data", c_void_p),
    ]


# Callback types (libvhost-user.h).
GET_FEATURES = CFUNCTYPE(c_uint64, POINTER(VuDev))
SET_FEATURES = CFUNCTYPE(None, POINTER(VuDev), c_uint64)
PROCESS_MSG = CFUNCTYPE(c_int, POINTER(VuDev), POINTER(VhostUserMsg), POINTER(c_int))
QUEUE_SET_STARTED = CFUNCTYPE(None, POINTER(VuDev), c_int, c_bool)
QUEUE_IN_ORDER = CFUNCTYPE(c_bool, POINTER(VuDev), c_int)
GET_CONFIG = CFUNCTYPE(c_int, POINTER(VuDev), POINTER(c_uint8), c_uint32)
SET_CONFIG = CFUNCTYPE(c_int, POINTER(VuDev), POINTER(c_uint8), c_uint32, c_uint32, c_uint32)
GET_SHARED_OBJECT = CFUNCTYPE(c_int, POINTER(VuDev), c_void_p)
QUEUE_HANDLER = CFUNCTYPE(None, POINTER(VuDev), c_int)
PANIC = CFUNCTYPE(None, POINTER(VuDev), c_char_p)
READ_MSG = CFUNCTYPE(c_bool, POINTER(VuDev), c_int, POINTER(VhostUserMsg))
WATCH = CFUNCTYPE(None, POINTER(VuDev), c_int, c_void_p)
SET_WATCH = CFUNCTYPE(None, POINTER(VuDev), c_int, c_int, WATCH, c_void_p)
REMOVE_WATCH = CFUNCTYPE(None, POINTER(VuDev), c_int)


class VuDevIface(Structure):
    _fields_ = [
        ("get_features", GET_FEATURES),
        ("set_features", SET_FEATURES),
        ("get_protocol_features", GET_FEATURES),
        ("set_protocol_features", SET_FEATURES),
        ("process_msg", PROCESS_MSG),
        ("queue_set_started", QUEUE_SET_STARTED),
        ("queue_is_processed_in_order", QUEUE_IN_ORDER),
        ("get_config", GET_CONFIG),
        ("set_config", SET_CONFIG),
        ("get_shared_object", GET_SHARED_OBJECT),
    ]


VuDev._fields_ = [
    ("sock", c_int),
    ("nregions", c_uint32),
    ("regions", POINTER(VuDevRegion)),
    ("vq", POINTER(VuVirtq)),
    ("inflight_info", VuDevInflightInfo),
    ("log_call_fd", c_int),
    ("backend_mutex", c_uint64 * 5),  # pthread_mutex_t: 40 bytes on x86-64 glibc (the probe checks)
    ("backend_fd", c_int),
    ("log_size", c_uint64),
    ("log_table", c_void_p),
    ("features", c_uint64),
    ("protocol_features", c_uint64),
    ("broken", c_bool),
    ("max_queues", c_uint16),
    ("read_msg", c_void_p),
    ("set_watch", SET_WATCH),
    ("remove_watch", REMOVE_WATCH),
    ("panic", PANIC),
    ("iface", POINTER(VuDevIface)),
    ("postcopy_ufd", c_int),
    ("postcopy_listening", c_bool),
]


class VuVirtqElement(Structure):
    _fields_ = [
        ("index", c_uint),
        ("out_num", c_uint),
        ("in_num", c_uint),
        ("in_sg", c_void_p),
        ("out_sg", c_void_p),
    ]


class IoVec(Structure):
    _fields_ = [("iov_base", c_void_p), ("iov_len", c_size_t)]


#: What the probe reports, by the name it prints → the ctypes struct.
STRUCTS: dict[str, Any] = {
    "VuDevRegion": VuDevRegion,
    "VuRing": VuRing,
    "VuVirtq": VuVirtq,
    "VuDevInflightInfo": VuDevInflightInfo,
    "VuDev": VuDev,
    "VuDevIface": VuDevIface,
    "VuVirtqElement": VuVirtqElement,
    "VhostUserMemoryRegion": VhostUserMemoryRegion,
    "VhostUserMemory": VhostUserMemory,
    "VhostUserMemRegMsg": VhostUserMemRegMsg,
    "VhostUserMsg": VhostUserMsg,
    "struct iovec": IoVec,
}


def own_layout() -> dict[str, int]:
    """Sizes and offsets as ctypes laid the declarations out, named as the probe names them."""
    out: dict[str, int] = {}
    for name, struct in STRUCTS.items():
        out[name] = ctypes.sizeof(struct)
        for field in struct._fields_:
            out[f"{name}.{field[0]}"] = getattr(struct, field[0]).offset
    payload = VhostUserMsg.payload.offset
    for member in ("u64", "state", "memory", "memreg"):
        out[f"VhostUserMsg.payload.{member}"] = payload + getattr(VhostUserPayload, member).offset
    out["VhostUserMsg.payload.__size__"] = ctypes.sizeof(VhostUserPayload)
    return out


def check_layout(probed: dict[str, Any]) -> None:
    """Raise LibraryError at the first size or offset the probe saw otherwise
    (and for anything one side has that the other lacks)."""
    mine = own_layout()
    for name in sorted(set(mine) | set(probed)):
        if name not in probed:
            raise LibraryError(f"libvhost-user layout probe does not report {name}; rebuild it (scripts/setup.sh)")
        if name not in mine:
            raise LibraryError(f"libvhost-user layout probe reports {name}, which the binding does not declare")
        if probed[name] != mine[name]:
            kind = "size" if "." not in name or name.endswith("__size__") else "offset"
            raise LibraryError(
                f"libvhost-user layout mismatch: {kind} of {name} is {probed[name]} in the library, "
                f"{mine[name]} in the binding"
            )


# ------------------------------------------------------------------ loading


def default_dir() -> str:
    """Where scripts/lib/libvhost-user.sh puts its current build, unless
    BALLOOND_LIBVHOST_USER names another directory."""
    explicit = os.environ.get("BALLOOND_LIBVHOST_USER")
    if explicit:
        return explicit
    cache = os.environ.get("BALLOOND_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "balloond")
    return os.path.join(cache, "libvhost-user-current")


@dataclass
class Library:
    """The loaded library, its functions typed."""

    path: str
    cdll: ctypes.CDLL

    def __post_init__(self) -> None:
        lib = self.cdll
        dev = POINTER(VuDev)
        vq = POINTER(VuVirtq)
        self.vu_init = _fn(lib.vu_init, c_bool, dev, c_uint16, c_int, PANIC, c_void_p, SET_WATCH, REMOVE_WATCH,
                           POINTER(VuDevIface))
        self.vu_deinit = _fn(lib.vu_deinit, None, dev)
        self.vu_dispatch = _fn(lib.vu_dispatch, c_bool, dev)
        self.vu_get_queue = _fn(lib.vu_get_queue, vq, dev, c_int)
        self.vu_set_queue_handler = _fn(lib.vu_set_queue_handler, None, dev, vq, QUEUE_HANDLER)
        self.vu_queue_pop = _fn(lib.vu_queue_pop, c_void_p, dev, vq, c_size_t)
        self.vu_queue_push = _fn(lib.vu_queue_push, None, dev, vq, c_void_p, c_uint)
        self.vu_queue_rewind = _fn(lib.vu_queue_rewind, c_bool, dev, vq, c_uint)
        self.vu_queue_notify = _fn(lib.vu_queue_notify, None, dev, vq)
        self.vu_queue_empty = _fn(lib.vu_queue_empty, c_bool, dev, vq)
        self.vu_queue_set_notification = _fn(lib.vu_queue_set_notification, None, dev, vq, c_int)
        self.vu_config_change_msg = _fn(lib.vu_config_change_msg, None, dev)
        self.vu_request_to_string = _fn(lib.vu_request_to_string, c_char_p, c_uint)
        libc = ctypes.CDLL(None)
        self.free = _fn(libc.free, None, c_void_p)


def _fn(f: Any, restype: Any, *argtypes: Any) -> Any:
    f.restype = restype
    f.argtypes = argtypes
    return f


_loaded: dict[str, Library] = {}


def check(directory: str | None = None) -> str:
    """The library's path, after checking it exists and its layout.json
    matches the binding (without loading it); LibraryError (one line) otherwise."""
    directory = directory or default_dir()
    so = os.path.join(directory, "libvhost-user.so")
    layout = os.path.join(directory, "layout.json")
    if not os.path.isfile(so):
        raise LibraryError(f"libvhost-user not found: no {so} (build it with scripts/setup.sh, "
                           "or set BALLOOND_LIBVHOST_USER to its directory)")
    try:
        with open(layout, encoding="utf-8") as f:
            probed = json.load(f)
    except FileNotFoundError:
        raise LibraryError(f"libvhost-user layout missing: no {layout} beside the library") from None
    except (OSError, ValueError) as exc:
        raise LibraryError(f"libvhost-user layout unreadable: {layout}: {exc}") from None
    if not isinstance(probed, dict) or not all(isinstance(v, int) for v in probed.values()):
        raise LibraryError(f"libvhost-user layout unreadable: {layout} is not an object of numbers")
    check_layout(probed)
    return so


def load(directory: str | None = None) -> Library:
    """Load libvhost-user.so from `directory` (default: `default_dir()`)
    after `check`; LibraryError (one line) otherwise."""
    directory = directory or default_dir()
    if directory in _loaded:
        return _loaded[directory]
    so = check(directory)
    try:
        cdll = ctypes.CDLL(so)
        library = Library(so, cdll)
    except (OSError, AttributeError) as exc:
        raise LibraryError(f"libvhost-user unusable: {so}: {exc}") from None
    _loaded[directory] = library
    return library
