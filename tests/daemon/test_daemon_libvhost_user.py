"""The libvhost-user engine in a real daemon, where it differs from the pure
one, and what the binding does so that it does not: messages are read by
the binding (the library's reader aborted the process on a short payload or
too many fds, and held the worker waiting for a missing payload), and a few
are checked before the library sees them (requests it would answer with
exit() or an out-of-bounds write). Each closes only the offending connection
and leaves the worker, and the other VM, as they were. An abort inside the
library would still end only that VM's worker: the worker tests kill one
(tests/daemon/test_daemon_workers.py); no frontend input is known to reach
one any more."""

from __future__ import annotations

import array
import os
import socket
import struct
import time
import subprocess
import sys

import pytest

from harness.daemon import DaemonProcess
from tests.daemon.harness import worker
from tests.frontend import TestFrontend

PAGE = 4096
TIMEOUT = 1.5  # --worker-timeout


@pytest.fixture
def daemon2(tmp_path):
    d = DaemonProcess(tmp_path / "d", vms=("vm0", "vm1"),
                      extra_args=["--engine", "libvhost-user", "--worker-timeout", str(TIMEOUT),
                                  "--state-dir", str(tmp_path / "state")])
    d.start()
    yield d
    alive = d.alive
    code = d.stop()
    assert alive and code == 0, d.log_tail()


def hostile(path: str, data: bytes, fds: list[int] | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)
    return sock


#: What libvhost-user's own reader aborted the process on (an assert): a
#: payload shorter than its header says (one read() must return it all),
#: and more than 8 fds with one message; and what it waited for holding the
#: worker: a payload that never comes. The binding's reader refuses each,
#: closing only that connection.
SHORT_PAYLOAD = struct.pack("<III", 9, 1, 40) + bytes(8)  # SET_VRING_ADDR, cut short
NO_PAYLOAD = struct.pack("<III", 2, 1, 8)  # SET_FEATURES, its 8 bytes never sent
GET_FEATURES = struct.pack("<III", 1, 1, 0)


@pytest.mark.parametrize("attack", ["short-payload", "no-payload", "nine-fds"])
def test_what_aborted_or_held_the_library_closes_only_the_connection(daemon2, attack):
    d = daemon2
    with TestFrontend(d.sockets["vm1"]) as other:
        other.start()
        first = list(range(other.first_free_pfn, other.first_free_pfn + 512))
        other.ram.touch(first)
        other.inflate(first)
        d.wait_vm("vm1", lambda s: s["ballooned_bytes"] == 512 * PAGE)
        neighbour = worker(d, "vm1")["pid"]
        victim = worker(d, "vm0")["pid"]
        fds = [os.eventfd(0) for _ in range(9)] if attack == "nine-fds" else []
        data = {"short-payload": SHORT_PAYLOAD, "no-payload": NO_PAYLOAD, "nine-fds": GET_FEATURES}[attack]
        sock = hostile(d.sockets["vm0"], data, fds)
        try:
            state = d.wait_vm("vm0", lambda s: s["last_disconnect"] is not None, 10, "the connection refused")
            assert sock.recv(64) == b""  # closed by the daemon, nothing answered
        finally:
            sock.close()
            for fd in fds:
                os.close(fd)
        reason = state["last_disconnect"]["reason"]
        assert reason == {
            "short-payload": "protocol violation: a message not whole after 1.0 s",
            "no-payload": "protocol violation: a message not whole after 1.0 s",
            "nine-fds": "frontend sent more file descriptors than a message may carry",
        }[attack]
        # The worker was neither aborted nor hung: same pid, no restart.
        assert worker(d, "vm0")["pid"] == victim and worker(d, "vm0")["restarts"] == 0
        # The neighbour's worker and connection never noticed.
        state = d.api.vm("vm1")
        assert state["worker"]["pid"] == neighbour and state["worker"]["restarts"] == 0
        assert state["connected"] and state["connections"] == 1
        other.deflate(first[:256])
        more = list(range(first[-1] + 1, first[-1] + 1 + 256))
        other.inflate(more)
        d.wait_vm("vm1", lambda s: s["ballooned_bytes"] == 512 * PAGE)
        assert other.ram.is_zero(more[0]) and other.ram.is_zero(first[300])
    # The same worker serves vm0 again.
    with TestFrontend(d.sockets["vm0"]) as again:
        again.start()
        pfns = list(range(again.first_free_pfn, again.first_free_pfn + 256))
        again.inflate(pfns)
        d.wait_vm("vm0", lambda s: s["ballooned_bytes"] == 256 * PAGE)
    assert worker(d, "vm0")["pid"] == victim


def test_a_header_in_pieces_is_waited_for(daemon2):
    """The library's reader took what one recvmsg() returned as the whole
    header; the binding's waits for the rest, as the pure engine does."""
    d = daemon2
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(d.sockets["vm0"])
        for i in range(len(GET_FEATURES)):
            sock.sendall(GET_FEATURES[i:i + 1])
            time.sleep(0.02)
        sock.settimeout(5)
        reply = sock.recv(64)
        request, flags, size = struct.unpack_from("<III", reply)
        assert (request, flags, size) == (1, 5, 8) and len(reply) == 20
    finally:
        sock.close()
    assert worker(d, "vm0")["restarts"] == 0


def test_end_of_file_closes_only_the_connection(daemon2):
    """The library's reader turns end of file into request 0, which the
    library answers with exit(): the binding takes it as the hang-up it is,
    and the worker stays."""
    d = daemon2
    victim = worker(d, "vm0")["pid"]
    with TestFrontend(d.sockets["vm0"]) as fe:
        fe.start()
        fe.inflate([fe.first_free_pfn])
    d.wait_vm("vm0", lambda s: not s["connected"], 10, "the connection closed")
    state = d.api.vm("vm0")
    assert state["worker"]["pid"] == victim and state["worker"]["restarts"] == 0
    assert state["last_disconnect"]["reason"] == "frontend closed the connection"


def test_a_ring_index_the_library_would_not_check_closes_only_the_connection(daemon2):
    """GET_VRING_BASE for queue 200: the library would index its queue array with it."""
    d = daemon2
    victim = worker(d, "vm0")["pid"]
    with TestFrontend(d.sockets["vm0"]) as fe:
        fe.start()
        fe.send_raw(struct.pack("<III", 11, 1, 8) + struct.pack("<II", 200, 0))
        d.wait_vm("vm0", lambda s: not s["connected"], 10, "the connection closed")
    state = d.api.vm("vm0")
    assert state["worker"]["pid"] == victim and state["worker"]["restarts"] == 0
    assert state["last_disconnect"]["reason"] == "request 11 for queue 200, beyond 16"
    with TestFrontend(d.sockets["vm0"]) as again:
        again.start()
        again.inflate([again.first_free_pfn])


@pytest.mark.parametrize("where", ["daemon", "vm"])
def test_libvhost_user_is_refused_without_workers(tmp_path, where):
    """An assertion inside the library aborts the process serving the VM;
    without workers that process serves every VM, so the daemon refuses to
    start (one line, exit code 2) whether the daemon's engine or one VM's
    names the library."""
    sock = tmp_path / "vm0.sock"
    engine = ["--engine", "libvhost-user"] if where == "daemon" else []
    vm = f"vm0={sock}" + (",engine=libvhost-user" if where == "vm" else "")
    out = subprocess.run([sys.executable, "-m", "balloond", "--vm", vm, "--vm", f"vm1={tmp_path / 'vm1.sock'}",
                          "--vm-isolation", "none", *engine],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "vm0: engine libvhost-user needs --vm-isolation process" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not sock.exists()
