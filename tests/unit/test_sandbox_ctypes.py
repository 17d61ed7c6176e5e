"""ctypes callbacks under the unit's MemoryDenyWriteExecute=yes.

The libvhost-user engine hands C Python callables (ctypes CFUNCTYPE
closures). Each closure needs a few bytes of executable code that libffi
writes at run time, which is what MemoryDenyWriteExecute= is about. These
tests run children under the unit's restrictions that matter for that:

  MemoryDenyWriteExecute=  either as systemd 252 (Debian 12) applies it, a
                           seccomp filter refusing mmap(PROT_WRITE|PROT_EXEC),
                           mprotect/pkey_mprotect adding PROT_EXEC and
                           shmat(SHM_EXEC) with EPERM; or as newer systemd
                           (254 does) applies it where the kernel has it
                           (6.3+): prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)
  SystemCallFilter=        the unit's lines, expanded by systemd-analyze
                           (test_systemd_units.allowed_syscalls), with the
                           unit's SystemCallErrorNumber=
  RestrictAddressFamilies= socket() of other families fails

and show, for each MemoryDenyWriteExecute= mechanism, that W+X memory and
gaining PROT_EXEC are refused in the child (so nothing passes with the
restriction off), and that callbacks still work: C calls them (qsort, a
pthread), thousands of them, and libvhost-user itself calls them.

What was found (Debian 12's libffi8 3.4.4, built without static
trampolines): unrestricted, libffi puts closures in an anonymous
read-write-execute page. Under either mechanism that mmap fails, and libffi
falls back to a memfd mapped twice, read-write and read-execute (shared);
never writable and executable at once. The catch is the shared mapping: a
process that made a closure and then forks shares its closure memory with
the child, and sibling workers corrupt each other's callbacks. Workers come
from a forkserver, so the forkserver must not make a closure: the modules it
preloads may define callback types but must not create callbacks at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.paths import cache_dir
from tests.unit.test_systemd_units import LAUNCHER, REPO, allowed_syscalls, unit_values

#: What the restricted children apply for MemoryDenyWriteExecute=yes.
MECHANISMS = ["seccomp", "prctl"]

#: System calls the ctypes callbacks (libffi's fallback) and a
#: libvhost-user backend make, so the unit's filter must let them through.
LIBFFI_SYSCALLS = {"mmap", "munmap", "memfd_create", "write"}
LIBVHOST_USER_SYSCALLS = {
    "recvmsg", "sendmsg", "read", "write", "close",  # messages, fds in SCM_RIGHTS, eventfd_read/write
    "mmap", "munmap", "madvise",  # guest memory, the dirty log, the inflight area
    "memfd_create", "ftruncate", "fcntl",  # the inflight area (GET_INFLIGHT_FD, sealed memfd)
}


PROBE = r'''
"""Runs in the restricted child: one JSON object on the last line."""
import ctypes, errno, json, mmap, os, random, socket, sys
from ctypes import CFUNCTYPE, POINTER, byref, c_double, c_int, c_int64, c_size_t, c_uint64, c_ulong, c_void_p

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = c_void_p
libc.mmap.argtypes = [c_void_p, c_size_t, c_int, c_int, c_int, ctypes.c_long]
libc.mprotect.argtypes = [c_void_p, c_size_t, c_int]
out = {}


def maps():
    rows = []
    for line in open("/proc/self/maps"):
        parts = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        rows.append({"lo": lo, "hi": hi, "perms": parts[1], "inode": int(parts[4]),
                     "path": parts[5].strip() if len(parts) > 5 else ""})
    return rows


def where(fn):
    """The mapping holding the code C jumps to for this callback."""
    addr = ctypes.cast(fn, c_void_p).value
    for m in maps():
        if m["lo"] <= addr < m["hi"]:
            return {"perms": m["perms"], "path": m["path"], "inode": m["inode"]}
    return None


def wx_maps():
    return [m["perms"] + " " + m["path"] for m in maps() if "w" in m["perms"] and "x" in m["perms"]]


def libffi_maps():
    return sorted(m["perms"] + " " + m["path"] for m in maps() if m["path"].startswith("/memfd:libffi"))


def controls():
    """The restrictions are in force (or not): seen from inside."""
    out["mdwe"] = libc.prctl(66, 0, 0, 0, 0)  # PR_GET_MDWE
    out["seccomp"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("Seccomp:")][0]
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        out["wx_mmap"] = "allowed"
    except OSError as exc:
        out["wx_mmap"] = errno.errorcode[exc.errno]
    page = libc.mmap(None, 4096, 3, 0x22, -1, 0)  # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS
    assert page not in (None, 2 ** 64 - 1)
    if libc.mprotect(page, 4096, 5) == 0:  # PROT_READ|PROT_EXEC
        out["exec_gain"] = "allowed"
    else:
        out["exec_gain"] = errno.errorcode[ctypes.get_errno()]
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        out["inet"] = "allowed"
    except OSError as exc:
        out["inet"] = errno.errorcode[exc.errno]
    out["closure_maps_at_start"] = libffi_maps()


def callbacks():
    """C calls Python: qsort's comparator, a thread's start routine, and
    thousands of closures (many pages of trampolines)."""
    CMP = CFUNCTYPE(c_int, POINTER(c_int), POINTER(c_int))
    values = list(range(5000))
    random.Random(1).shuffle(values)
    arr = (c_int * len(values))(*values)
    calls = []

    def compare(a, b):
        calls.append(1)
        return (a[0] > b[0]) - (a[0] < b[0])

    cmp = CMP(compare)
    libc.qsort.argtypes = [c_void_p, c_size_t, c_size_t, CMP]
    libc.qsort(arr, len(values), ctypes.sizeof(c_int), cmp)
    out["qsort_sorted"] = list(arr) == sorted(values)
    out["qsort_calls"] = len(calls)
    out["tramp"] = where(cmp)

    START = CFUNCTYPE(c_void_p, c_void_p)
    seen = []
    start = START(lambda arg: seen.append(arg) or 0)
    tid = c_ulong()
    libc.pthread_create.argtypes = [POINTER(c_ulong), c_void_p, START, c_void_p]
    rc = libc.pthread_create(byref(tid), None, start, 4242)
    out["thread"] = (rc, libc.pthread_join(tid, None) if rc == 0 else None, seen)

    F = CFUNCTYPE(c_int64, c_int64, c_double)
    many = [F(lambda x, y, i=i: i * x + int(y)) for i in range(3000)]
    out["many_ok"] = all(fn(3, 2.5) == 3 * i + 2 for i, fn in enumerate(many))
    out["many_pages"] = len({ctypes.cast(fn, c_void_p).value >> 12 for fn in many})
    del many
    again = [F(lambda x, y, i=i: i - x) for i in range(3000)]  # freed closures reused
    out["again_ok"] = all(fn(1, 0.0) == i - 1 for i, fn in enumerate(again))
    out["wx_maps"] = wx_maps()
    out["closure_maps"] = libffi_maps()


def forked():
    """A forkserver making workers: it has made no closure; two workers with
    different heaps make closures at the same time and call them."""
    import signal
    F = CFUNCTYPE(c_int)
    kids = []
    go_r, go_w = os.pipe()
    for k in range(2):
        ready_r, ready_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a worker whose closure memory is corrupted may spin: end it, do not hang
            for _, other_ready, other_res in kids:
                os.close(other_ready)
                os.close(other_res)
            os.close(ready_r)
            os.close(res_r)
            os.close(go_w)
            junk = [bytearray(64 + 40 * k) for _ in range(300 * k)]  # the workers' heaps differ
            fns = [F(lambda i=i, k=k: 1000 * k + i) for i in range(200)]
            os.write(ready_w, b"r")
            os.read(go_r, 1)  # both have made theirs: now call them
            ok = all(fn() == 1000 * k + i for i, fn in enumerate(fns))
            more = [F(lambda i=i: -i) for i in range(200)]
            ok = ok and all(fn() == -i for i, fn in enumerate(more))
            os.write(res_w, json.dumps({"ok": ok, "tramp": where(fns[0]), "junk": len(junk)}).encode())
            os._exit(0)
        os.close(ready_w)
        os.close(res_w)
        kids.append((pid, ready_r, res_r))
    for _, ready_r, _ in kids:
        os.read(ready_r, 1)
    os.write(go_w, b"gg")
    results = []
    for pid, _, res_r in kids:
        data = os.read(res_r, 65536)
        _, status = os.waitpid(pid, 0)
        results.append({"status": status, "result": json.loads(data) if data else None})
    out["workers"] = results


def preload():
    """What the forkserver imports before forking workers."""
    import importlib
    from balloond.worker.forkserver import PRELOAD
    for name in PRELOAD:
        importlib.import_module(name)
    out["preload"] = PRELOAD
    out["closure_maps"] = libffi_maps()
    out["wx_maps"] = wx_maps()


def vhost_user(path):
    """libvhost-user calls back into Python: GET_FEATURES asks the device's
    get_features callback; a message too big for the header makes it call
    the panic callback. No frontend: the other end of a socketpair."""
    import struct
    lib = ctypes.CDLL(path)
    DEV = c_void_p
    GET_FEATURES = CFUNCTYPE(c_uint64, DEV)
    PANIC = CFUNCTYPE(None, DEV, ctypes.c_char_p)
    WATCH = CFUNCTYPE(None, DEV, c_int, c_void_p)
    SET_WATCH = CFUNCTYPE(None, DEV, c_int, c_int, WATCH, c_void_p)
    REMOVE_WATCH = CFUNCTYPE(None, DEV, c_int)

    class Iface(ctypes.Structure):  # VuDevIface: its first member, then room for the rest
        _fields_ = [("get_features", GET_FEATURES), ("rest", c_void_p * 31)]

    panics = []
    get_features = GET_FEATURES(lambda dev: 1 << 1)  # VIRTIO_BALLOON_F_STATS_VQ
    panic = PANIC(lambda dev, msg: panics.append(msg.decode()))
    set_watch = SET_WATCH(lambda *a: None)
    remove_watch = REMOVE_WATCH(lambda *a: None)
    iface = Iface(get_features)
    dev = ctypes.create_string_buffer(1 << 16)  # bigger than VuDev; only libvhost-user reads it
    lib.vu_init.restype = ctypes.c_bool
    lib.vu_init.argtypes = [DEV, ctypes.c_uint16, c_int, PANIC, c_void_p, SET_WATCH, REMOVE_WATCH,
                            POINTER(Iface)]
    lib.vu_dispatch.restype = ctypes.c_bool
    lib.vu_dispatch.argtypes = [DEV]
    lib.vu_deinit.argtypes = [DEV]
    frontend, backend = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    assert lib.vu_init(dev, 1, backend.detach(), panic, None, set_watch, remove_watch, byref(iface))
    frontend.sendall(struct.pack("<III", 1, 1, 0))  # GET_FEATURES, version 1, no payload
    out["dispatch"] = lib.vu_dispatch(dev)
    request, flags, size = struct.unpack("<III", frontend.recv(12))
    (features,) = struct.unpack("<Q", frontend.recv(size))
    out["reply"] = [request, flags, size]
    out["features"] = features
    frontend.sendall(struct.pack("<III", 1, 1, 1 << 20))  # a payload bigger than any message
    out["dispatch_too_big"] = lib.vu_dispatch(dev)
    out["panics"] = panics
    lib.vu_deinit(dev)
    frontend.close()
    out["tramp"] = where(get_features)
    out["wx_maps"] = wx_maps()


{"controls": controls, "callbacks": callbacks, "forked": forked, "preload": preload}.get(sys.argv[1], lambda: None)()
if sys.argv[1] == "vhost-user":
    vhost_user(sys.argv[2])
print(json.dumps(out))
'''


def _unit_setting(key: str) -> str:
    values = unit_values(key)
    assert values, f"balloond.service has no {key}="
    return values[-1]


@pytest.fixture(scope="module")
def stage(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mdwe")
    (path / "launcher.py").write_text(LAUNCHER)
    (path / "probe.py").write_text(PROBE)
    (path / "allow.txt").write_text("\n".join(sorted(allowed_syscalls())))
    return path


def run_restricted(stage: Path, mechanism: str, *probe_args: str) -> dict:
    """The probe in a child under the unit's restrictions, with
    MemoryDenyWriteExecute= applied by `mechanism` ("none": left out)."""
    if mechanism != "none":
        assert _unit_setting("MemoryDenyWriteExecute") == "yes", "the unit no longer sets MemoryDenyWriteExecute=yes"
    families = " ".join(v for v in unit_values("RestrictAddressFamilies"))
    errname = _unit_setting("SystemCallErrorNumber")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, str(stage / "launcher.py"), mechanism, families, errname, str(stage / "allow.txt"), "--",
         sys.executable, str(stage / "probe.py"), *probe_args],
        capture_output=True, text=True, env=env, cwd="/", timeout=120, check=False)
    if result.returncode == 77:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_unit_lets_libffi_and_libvhost_user_through():
    """The unit keeps MemoryDenyWriteExecute=yes, and its filter allows what
    libffi's closures and a libvhost-user backend call. Not needed: socket()
    (libvhost-user uses the connection it is given, so AF_UNIX is enough)
    and userfaultfd (postcopy only)."""
    assert _unit_setting("MemoryDenyWriteExecute") == "yes"
    assert (LIBFFI_SYSCALLS | LIBVHOST_USER_SYSCALLS) - allowed_syscalls() == set()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_restriction_is_in_force(stage, mechanism):
    """The control: in the child, W+X memory and gaining PROT_EXEC fail."""
    probe = run_restricted(stage, mechanism, "controls")
    refused = "EPERM" if mechanism == "seccomp" else "EACCES"
    assert probe["wx_mmap"] == refused and probe["exec_gain"] == refused, probe
    assert probe["mdwe"] == (1 if mechanism == "prctl" else 0), probe
    assert probe["seccomp"] == "2", probe  # the system-call filter is loaded too
    assert probe["inet"] == "EAFNOSUPPORT", probe
    assert probe["closure_maps_at_start"] == [], probe


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_callbacks_work_under_mdwe(stage, mechanism):
    probe = run_restricted(stage, mechanism, "callbacks")
    assert probe["qsort_sorted"] and probe["qsort_calls"] > 5000, probe
    assert probe["thread"] == [0, 0, [4242]], probe
    assert probe["many_ok"] and probe["again_ok"], probe
    assert probe["many_pages"] > 20, probe  # thousands of closures: many pages of trampolines
    # never writable and executable: the trampolines run from a read-execute
    # mapping of a memfd whose read-write mapping libffi writes them through
    assert probe["wx_maps"] == [], probe
    assert probe["tramp"]["path"].startswith("/memfd:libffi") and probe["tramp"]["perms"] == "r-xs", probe
    assert {m.split()[0] for m in probe["closure_maps"]} == {"r-xs", "rw-s"}, probe


def test_without_mdwe_libffi_uses_wx_memory(stage):
    """The control for the probe: with MemoryDenyWriteExecute= left out, this
    libffi (no static trampolines) puts closures in an anonymous W+X page, and
    the probe sees it; so the restricted runs above are not vacuous."""
    probe = run_restricted(stage, "none", "controls")
    assert probe["wx_mmap"] == "allowed" and probe["exec_gain"] == "allowed", probe
    probe = run_restricted(stage, "none", "callbacks")
    assert probe["qsort_sorted"] and probe["many_ok"], probe
    assert probe["tramp"]["perms"] == "rwxp" and probe["tramp"]["path"] == "", probe
    assert probe["wx_maps"] and probe["closure_maps"] == [], probe


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_forked_workers_get_their_own_closure_memory(stage, mechanism):
    """Under MemoryDenyWriteExecute= the closure memory is a shared mapping,
    which fork does not copy: workers forked from a process that made no
    closure each get their own memfd, and their callbacks stay right."""
    probe = run_restricted(stage, mechanism, "forked")
    workers = probe["workers"]
    assert [w["status"] for w in workers] == [0, 0], workers
    assert all(w["result"]["ok"] for w in workers), workers
    inodes = {w["result"]["tramp"]["inode"] for w in workers}
    assert len(inodes) == 2, workers  # one memfd per worker


def test_forkserver_preload_makes_no_closure(stage):
    """The forkserver imports PRELOAD before forking every worker: a callback
    made at import (a module-level @CFUNCTYPE function, say) would put the
    closure memory in place before the fork, shared by all workers."""
    probe = run_restricted(stage, "seccomp", "preload")
    assert probe["preload"], probe
    assert probe["closure_maps"] == [] and probe["wx_maps"] == [], probe


def _libvhost_user() -> Path:
    """Where the setup scripts put the library (the engine's own rule)."""
    explicit = os.environ.get("BALLOOND_LIBVHOST_USER")
    return Path(explicit or cache_dir() / "libvhost-user-current") / "libvhost-user.so"


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_libvhost_user_calls_back_under_mdwe(stage, mechanism):
    so = _libvhost_user()
    if not so.is_file():  # under CI a skip fails the run: scripts/setup.sh builds it there
        pytest.skip(f"no {so}: scripts/setup.sh builds it")
    probe = run_restricted(stage, mechanism, "vhost-user", str(so))
    assert probe["dispatch"] is True, probe
    assert probe["reply"][0] == 1 and probe["reply"][1] & 0x4 and probe["reply"][2] == 8, probe  # a reply
    assert probe["features"] & (1 << 1), probe  # from our get_features callback
    assert probe["features"] & (1 << 32), probe  # VIRTIO_F_VERSION_1, libvhost-user's own
    assert probe["dispatch_too_big"] is False, probe
    assert len(probe["panics"]) == 1 and "too big message" in probe["panics"][0], probe
    assert probe["tramp"]["perms"] == "r-xs" and probe["wx_maps"] == [], probe

