"""Frontends coming and going: reconnects get a fresh device, a second
frontend on a busy socket is turned away without harm, VMs are independent,
and nothing (fds, mappings) leaks across connections."""

from __future__ import annotations

import os
import socket
import time

import pytest

from protocol import vhost_user as vu
from protocol.vhost_user import Request
from tests.daemon.harness import DaemonProcess
from tests.frontend import PAGE_SIZE, DaemonHungUp, TestFrontend


def test_reconnect_gets_a_fresh_device(daemon, connect, settled):
    fe = connect()
    first = fe.first_free_pfn
    fe.ram.touch(range(first, first + 100))
    fe.inflate(range(first, first + 100))
    assert daemon.api.vm("vm0")["ballooned_bytes"] == 100 * PAGE_SIZE
    connections = daemon.api.vm("vm0")["connections"]
    fe.close()
    state = daemon.wait_vm("vm0", lambda s: not s["connected"])
    assert state["last_disconnect"]["reason"]

    fe2 = connect()
    state = daemon.api.vm("vm0")
    assert state["connected"] and state["running"]
    assert state["connections"] == connections + 1
    assert state["ballooned_bytes"] == 0 and state["host_freed_bytes"] == 0
    assert daemon.api.pfns("vm0")["count"] == 0
    fe2.ram.touch(range(first, first + 50))
    before = fe2.ram.allocated_bytes()
    fe2.inflate(range(first, first + 50))
    assert settled()["ballooned_bytes"] == 50 * PAGE_SIZE
    assert before - fe2.ram.allocated_bytes() == 50 * PAGE_SIZE


def test_second_concurrent_frontend_is_refused(daemon, connect):
    fe = connect()
    first = fe.first_free_pfn
    fe.ram.touch(range(first, first + 20))
    fe.inflate(range(first, first + 10))
    intruder = TestFrontend(daemon.sockets["vm0"], connect=False, timeout=3)
    try:
        with pytest.raises(DaemonHungUp):
            intruder.connect()
            intruder.start()
    finally:
        intruder.close()
    # The first frontend is untouched.
    fe.inflate(range(first + 10, first + 20))
    fe.restart()
    fe.deflate(range(first, first + 5))
    state = daemon.api.vm("vm0")
    assert state["connected"] and state["running"]
    assert state["ballooned_bytes"] == 15 * PAGE_SIZE


def test_two_vms_are_independent(daemon, connect):
    a = connect("vm0")
    b = connect("vm1")
    first = a.first_free_pfn
    a.ram.touch(range(first, first + 300))
    b.ram.touch(range(first, first + 300))
    a.inflate(range(first, first + 100))
    b.inflate(range(first + 100, first + 300))
    assert daemon.api.pfns("vm0")["ranges"] == [[first, 100]]
    assert daemon.api.pfns("vm1")["ranges"] == [[first + 100, 200]]
    daemon.api.set_target("vm1", 1 << 20)
    assert b.wait_config_change(3)
    assert not a.wait_config_change(0.3)
    # vm0's frontend breaks the protocol and is dropped; vm1 carries on.
    a.send(Request.GET_FEATURES, size=vu.MAX_PAYLOAD + 1)
    assert a.hung_up(3)
    b.deflate(range(first + 100, first + 200))
    assert daemon.api.vm("vm1")["ballooned_bytes"] == 100 * PAGE_SIZE
    assert daemon.api.vm("vm0")["connected"] is False
    summary = {vm["name"]: vm for vm in daemon.api.vms()}
    assert set(summary) == {"vm0", "vm1"}
    assert summary["vm1"]["connected"] and not summary["vm0"]["connected"]


def test_hangups_at_every_stage_leak_nothing(daemon, connect):
    """Connect/close cycles stopping at each stage: the daemon ends up with the
    fds and mappings it had before."""
    daemon.wait_disconnected("vm0")
    # The API request just answered may still hold its socket for a moment:
    # the baseline is the fewest fds seen over a short while, not one look.
    samples = []
    for _ in range(10):
        samples.append(daemon.fd_count())
        time.sleep(0.03)
    baseline_fds = min(samples)
    stages = ["connected", "handshake", "started", "inflated", "stopped", "half-message", "fds-then-hangup"]
    for stage in stages * 2:
        fe = TestFrontend(daemon.sockets["vm0"], connect=False, timeout=3)
        try:
            if stage == "connected":
                fe.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                fe.sock.connect(fe.socket_path)
            else:
                fe.connect()
            if stage in ("started", "inflated", "stopped"):
                fe.probe()
                fe.prime_stats()
                fe.start()
            if stage in ("inflated", "stopped"):
                fe.ram.touch(range(fe.first_free_pfn, fe.first_free_pfn + 64))
                fe.inflate(range(fe.first_free_pfn, fe.first_free_pfn + 64))
            if stage == "stopped":
                fe.stop()
            if stage == "half-message":
                fe.send_raw(vu.HEADER.pack(Request.SET_MEM_TABLE, vu.VERSION, 40) + b"\0" * 10)
            if stage == "fds-then-hangup":
                r, w = os.pipe()
                fe.send_raw(vu.HEADER.pack(Request.SET_VRING_KICK, vu.VERSION, 8)[:6], [r, w])
                os.close(r)
                os.close(w)
        finally:
            fe.close()
        daemon.wait_disconnected("vm0")
    daemon.wait_for(lambda: daemon.fd_count() == baseline_fds, 3, f"fd count back to {baseline_fds}")
    maps = open(f"/proc/{daemon.pid}/maps").read()
    assert "balloond-test-ram" not in maps


def test_many_connections_in_a_row(daemon, connect):
    baseline_rss = daemon.rss_bytes()
    for i in range(15):
        fe = TestFrontend(daemon.sockets["vm1"], timeout=3)
        try:
            fe.start()
            fe.ram.touch(range(fe.first_free_pfn, fe.first_free_pfn + 256))
            fe.inflate(range(fe.first_free_pfn, fe.first_free_pfn + 256))
        finally:
            fe.close()
        daemon.wait_disconnected("vm1")
    assert daemon.api.vm("vm1")["connections"] >= 15
    assert daemon.rss_bytes() < baseline_rss + (32 << 20)


def test_shutdown_with_a_running_frontend(tmp_path):
    proc = DaemonProcess(tmp_path, ["solo"], stats_interval=0.2)
    proc.start()
    try:
        fe = TestFrontend(proc.sockets["solo"], timeout=3)
        fe.probe()
        fe.prime_stats()
        fe.start()
        fe.ram.touch(range(fe.first_free_pfn, fe.first_free_pfn + 16))
        fe.inflate(range(fe.first_free_pfn, fe.first_free_pfn + 16))
        t0 = time.monotonic()
        code = proc.stop(timeout=10)
        assert code == 0, proc.log_tail()
        assert time.monotonic() - t0 < 5
        assert fe.hung_up(2)
        assert not os.path.exists(proc.sockets["solo"])
        assert not os.path.exists(proc.api_path)
        fe.close()
    finally:
        proc.stop()


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path):
    proc = DaemonProcess(tmp_path, ["vmx"])
    # A leftover socket file nobody listens on.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(proc.sockets["vmx"])
    stale.close()
    proc.start()
    try:
        fe = TestFrontend(proc.sockets["vmx"], timeout=3)
        fe.start()
        fe.close()
        # A second daemon on the same path must refuse to start.
        other = DaemonProcess(tmp_path / "other", ["vmx"])
        other.sockets["vmx"] = proc.sockets["vmx"]
        with pytest.raises(RuntimeError, match="exited"):
            other.start(timeout=10)
        other.stop()
        # ...and the first still serves.
        fe = TestFrontend(proc.sockets["vmx"], timeout=3)
        fe.start()
        fe.close()
    finally:
        assert proc.stop() == 0
