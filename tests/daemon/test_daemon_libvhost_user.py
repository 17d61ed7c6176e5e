"""The libvhost-user engine in a real daemon, where it differs from the pure
one: an assertion inside the library aborts the process serving the VM, and
with one worker per VM that ends only that VM's worker, which the
supervisor restarts; its neighbour is not disturbed. Also what the binding
checks before the library sees a message (requests the library would
answer with exit() or an out-of-bounds write)."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys

import pytest

from harness.daemon import DaemonProcess
from protocol.balloon import QueueRole
from tests.daemon.harness import restarted, worker
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


def short_payload(path: str) -> socket.socket:
    """A message whose header promises 40 bytes of payload, and only 8 come:
    libvhost-user's reader asserts that one read() returned them all, and
    aborts the process when it did not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(struct.pack("<III", 9, 1, 40) + bytes(8))  # SET_VRING_ADDR, cut short
    return sock


def test_an_abort_in_the_library_ends_only_that_vms_worker(daemon2):
    d = daemon2
    with TestFrontend(d.sockets["vm1"]) as other:
        other.start()
        first = list(range(other.first_free_pfn, other.first_free_pfn + 512))
        other.ram.touch(first)
        other.inflate(first)
        d.wait_vm("vm1", lambda s: s["ballooned_bytes"] == 512 * PAGE)
        neighbour = worker(d, "vm1")["pid"]
        victim = worker(d, "vm0")["pid"]
        hostile = short_payload(d.sockets["vm0"])
        try:
            w = restarted(d, "vm0")
        finally:
            hostile.close()
        assert w["last_exit"] == "killed by SIGABRT" and w["pid"] != victim
        assert any(r.get("event") == "worker ended; starting another" and r.get("vm") == "vm0"
                   and r.get("reason") == "killed by SIGABRT" for r in d.log_records())
        # The neighbour's worker and connection never noticed.
        state = d.api.vm("vm1")
        assert state["worker"]["pid"] == neighbour and state["worker"]["restarts"] == 0
        assert state["connected"] and state["connections"] == 1
        other.deflate(first[:256])
        more = list(range(first[-1] + 1, first[-1] + 1 + 256))
        other.inflate(more)
        d.wait_vm("vm1", lambda s: s["ballooned_bytes"] == 512 * PAGE)
        assert other.ram.is_zero(more[0]) and other.ram.is_zero(first[300])
    # The restarted worker serves vm0 again.
    with TestFrontend(d.sockets["vm0"]) as again:
        again.start()
        pfns = list(range(again.first_free_pfn, again.first_free_pfn + 256))
        again.inflate(pfns)
        d.wait_vm("vm0", lambda s: s["ballooned_bytes"] == 256 * PAGE)


def test_a_missing_payload_holds_the_worker_until_the_supervisor_restarts_it(daemon2):
    """The library reads a message with blocking calls: a frontend that
    sends a header and not the payload it announces holds the worker in
    that read. Its heartbeats stop, and after --worker-timeout the
    supervisor kills and restarts it."""
    d = daemon2
    victim = worker(d, "vm0")["pid"]
    neighbour = worker(d, "vm1")["pid"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(d.sockets["vm0"])
        sock.sendall(struct.pack("<III", 2, 1, 8))  # SET_FEATURES, its 8 bytes never sent
        w = restarted(d, "vm0")
    finally:
        sock.close()
    assert w["pid"] != victim and w["last_exit"] == f"no heartbeat for {TIMEOUT} s"
    assert worker(d, "vm1")["pid"] == neighbour and worker(d, "vm1")["restarts"] == 0
    with TestFrontend(d.sockets["vm0"]) as again:
        again.start()
        again.inflate([again.first_free_pfn])


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


def test_a_bad_chain_closes_the_connection_where_the_pure_engine_returns_it_empty(daemon2):
    """The engines' one designed difference: a descriptor outside guest RAM
    makes libvhost-user give up on the connection (the pure engine returns
    the chain empty, counts a guest error and carries on:
    test_daemon_hostile.py). The worker stays, the VM is served again on
    the next connection (QEMU reconnects), and the other VM never notices."""
    d = daemon2
    victim = worker(d, "vm0")["pid"]
    with TestFrontend(d.sockets["vm1"]) as other:
        other.start()
        with TestFrontend(d.sockets["vm0"]) as fe:
            fe.start()
            q = fe.queue(QueueRole.INFLATE)
            [head] = q.alloc_desc(1, "bad")
            q.write_desc(head, fe.ram.regions[-1].end + PAGE, 1024, 0, 0)
            q.put_avail(head)
            q.kick(force=True)
            d.wait_vm("vm0", lambda s: not s["connected"], 10, "the connection closed")
        state = d.api.vm("vm0")
        assert state["worker"]["pid"] == victim and state["worker"]["restarts"] == 0
        assert state["last_disconnect"]["reason"] == "virtio: invalid address for buffers"
        pfns = list(range(other.first_free_pfn, other.first_free_pfn + 256))
        other.inflate(pfns)
        d.wait_vm("vm1", lambda s: s["ballooned_bytes"] == 256 * PAGE)
    with TestFrontend(d.sockets["vm0"]) as again:
        again.start()
        again.inflate([again.first_free_pfn])
        d.wait_vm("vm0", lambda s: s["ballooned_bytes"] == PAGE)


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
