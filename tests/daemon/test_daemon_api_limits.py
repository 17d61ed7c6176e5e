"""The control API cannot be used to starve the daemon: any local process
that reaches the socket may open connections and send nothing, half a
request head, or (as another user) nothing it is allowed to send at all.

While hundreds of such connections are held the daemon's fd count stays
bounded (at most api.MAX_CONNECTIONS admitted, refused peers closed at
once), the API answers an allowed client within a second, and the VMs'
vhost-user sockets keep accepting and inflating. A connection that sends no
complete request head is closed after api.IDLE_TIMEOUT. And with the
daemon's fd limit exhausted by API connections, a VM's listener that failed
to accept retries and serves once they are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest

from balloond.services import api
from tests.daemon.harness import DaemonProcess
from tests import wire
from tests.frontend import DaemonHungUp, Request, TestFrontend

#: What the daemon promises (README, api.py), fixed here rather than read
#: from the module, so that a daemon that stops bounding them fails.
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 10.0
NOBODY = 65534
HELD = 300
API_DEADLINE = 1.0
#: fds a daemon may have besides the API's admitted connections (listeners, eventfds, memfds, logs).
SLACK = 40

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users and fd limits need root")


def test_the_limits_are_the_promised_ones():
    assert 0 < api.MAX_CONNECTIONS <= MAX_CONNECTIONS
    assert 0 < api.IDLE_TIMEOUT <= IDLE_TIMEOUT and 0 < api.REQUEST_TIMEOUT <= IDLE_TIMEOUT


def hold(path: str, count: int) -> list[socket.socket]:
    out = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        out.append(s)
    return out


def timed_api(d: DaemonProcess) -> float:
    start = time.monotonic()
    assert [vm["name"] for vm in d.api.vms()]
    return time.monotonic() - start


def inflate_once(fe: TestFrontend, offset: int = 0) -> None:
    pfn = fe.first_free_pfn + offset
    fe.ram.touch([pfn])
    start = time.monotonic()
    fe.inflate([pfn])
    fe.deflate([pfn])
    assert time.monotonic() - start < 0.5


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True once the daemon closed `sock` (EOF or reset) within `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
    return False


@pytest.mark.only_discard_mode("immediate", reason="the API's limits do not depend on how discards are done")
def test_300_idle_connections_leave_the_api_and_the_vms_served(daemon, connect):
    vm1 = connect("vm1")
    base = daemon.fd_count()
    held = hold(daemon.api_path, HELD)
    try:
        time.sleep(0.3)  # let the daemon accept them all
        assert daemon.fd_count() <= base + MAX_CONNECTIONS + SLACK, "API connections grow the daemon's fds"
        assert timed_api(daemon) < API_DEADLINE
        inflate_once(vm1)
        vm0 = connect("vm0")  # a VM's socket still accepts, while the connections are held
        inflate_once(vm0)
        open_ = [s for s in held if not closed_by_peer(s, 0)]
        assert len(open_) <= MAX_CONNECTIONS, f"{len(open_)} idle API connections kept"
        since = daemon.test_log_start
        limit_lines = [r for r in daemon.log_records(since) if "connection limit" in str(r.get("event", ""))]
        assert 1 <= len(limit_lines) <= 2, limit_lines  # rate-limited
    finally:
        for s in held:
            s.close()
    assert timed_api(daemon) < API_DEADLINE


@pytest.mark.only_discard_mode("immediate", reason="the API's limits do not depend on how discards are done")
def test_silent_and_half_sent_connections_are_closed_after_the_idle_timeout(daemon):
    silent, = hold(daemon.api_path, 1)
    partial, = hold(daemon.api_path, 1)
    partial.sendall(b"GET /v1/vms HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
    try:
        start = time.monotonic()
        assert not closed_by_peer(partial, IDLE_TIMEOUT - 2), "closed before the timeout"
        assert closed_by_peer(partial, 5.0), "a half-sent request head kept its connection"
        assert closed_by_peer(silent, 1.0), "a silent connection was kept"
        assert time.monotonic() - start < IDLE_TIMEOUT + 5
    finally:
        silent.close()
        partial.close()
    assert timed_api(daemon) < API_DEADLINE


# ============================================ own daemons: other users, fd limits


@contextlib.contextmanager
def world_daemon(extra_args: list[str] = (), vms: tuple[str, ...] = ("vm0", "vm1")) -> Iterator[DaemonProcess]:
    """A daemon in a directory every user may search, its API socket open to all
    (so that what refuses another user is the credential check)."""
    workdir = tempfile.mkdtemp(prefix="balloond-limits-")
    os.chmod(workdir, 0o711)
    proc = DaemonProcess(workdir, vms=vms, extra_args=["--discard-delay-ms", "0", *extra_args])
    try:
        proc.start()
        os.chmod(proc.api_path, 0o666)
        yield proc
        assert proc.alive, proc.log_tail()
    finally:
        code = proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    assert code == 0, f"balloond exited with {code}"


def hold_as(uid: int, path: str, count: int) -> tuple[int, int, int]:
    """A forked child running as `uid` connects `count` times and holds them;
    returns (pid, read end of its report pipe, write end of its go-away pipe)."""
    report_r, report_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(report_r)
            os.close(done_w)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            held, failed = [], 0
            for _ in range(count):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                    held.append(s)
                except OSError:
                    failed += 1
                    s.close()
            time.sleep(0.5)
            answered = sum(1 for s in held if s.recv(4096, socket.MSG_DONTWAIT | socket.MSG_PEEK).startswith(b"HTTP/1.1 403")
                           if select.select([s], [], [], 0)[0])
            os.write(report_w, json.dumps({"held": len(held), "failed": failed, "answered": answered}).encode())
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(report_w)
    os.close(done_r)
    return pid, report_r, done_w


@needs_root
def test_300_connections_from_a_refused_user_leave_the_daemon_bounded_and_serving():
    with world_daemon() as d:
        vm1 = TestFrontend(d.sockets["vm1"])
        try:
            vm1.start()
            base = d.fd_count()
            since = d.log_size()
            pid, report, done = hold_as(NOBODY, d.api_path, HELD)
            try:
                result = json.loads(os.read(report, 4096))
                assert result["held"] + result["failed"] == HELD
                assert result["answered"] >= 1, result  # refused peers read a 403, not silence
                assert d.fd_count() <= base + MAX_CONNECTIONS + SLACK
                assert timed_api(d) < API_DEADLINE
                inflate_once(vm1)
                refused = [r for r in d.log_records(since) if r.get("event") == "API request refused"]
                assert 1 <= len(refused) <= 6 and refused[0]["uid"] == NOBODY, refused[:2]
            finally:
                os.write(done, b"x")
                os.waitpid(pid, 0)
                os.close(report)
                os.close(done)
            # the lingering refused connections are gone within REFUSED_LINGER
            d.wait_for(lambda: d.fd_count() <= base + 4, 5.0, "the refused connections to be closed")
        finally:
            vm1.close()


@needs_root
def test_vm_listener_retries_accept_after_api_connections_exhaust_the_fd_limit():
    """--vm-isolation none: the VMs' listeners share the daemon's fd limit
    with the API, which a flood of API connections uses up."""
    with world_daemon(["--vm-isolation", "none"], vms=("vm0",)) as d:
        base = d.fd_count()
        limit = base + 24  # fewer than MAX_CONNECTIONS: the fds run out before the cap
        resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (limit, limit))
        since = d.log_size()
        held = hold(d.api_path, MAX_CONNECTIONS)
        try:
            d.wait_for(lambda: d.fd_count() >= limit - 1, 3.0, "the daemon's fds to run out")
            waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiting.connect(d.sockets["vm0"])  # queued in the backlog; accept() fails with EMFILE
            d.wait_for(lambda: any(r.get("event") == "accept failed; trying again" and r.get("vm") == "vm0"
                                   for r in d.log_records(since)), 3.0, "vm0's listener to fail an accept")
            assert d.alive
        finally:
            for s in held:
                s.close()
        # The frontend that waited in the backlog is accepted and answered now.
        waiting.settimeout(3.0)
        waiting.sendall(wire.pack_header(Request.GET_FEATURES, wire.VERSION, 0))
        assert len(waiting.recv(64)) >= wire.HEADER_SIZE, "the waiting frontend was never served"
        waiting.close()
        assert timed_api(d) < API_DEADLINE
        d.wait_disconnected("vm0")
        deadline = time.monotonic() + 3.0
        while True:  # the daemon notices the waiting one's close a moment later
            fe = TestFrontend(d.sockets["vm0"], connect=False)
            try:
                fe.connect()
                fe.start()
                break
            except DaemonHungUp:
                fe.close()
                assert time.monotonic() < deadline, "vm0's socket no longer serves"
                time.sleep(0.1)
        try:
            inflate_once(fe)
        finally:
            fe.close()
        lines = [r for r in d.log_records(since) if r.get("event") == "accept failed; trying again"]
        assert len(lines) <= 6, "accept failures are logged rate-limited"
