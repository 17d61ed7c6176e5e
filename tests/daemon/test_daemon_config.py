"""The config space and CONFIG_CHANGE_MSG: targets set through the API reach
the driver only while the device runs, and a driver's write (QEMU forwards
its whole, possibly stale, cached copy) changes only what the driver owns."""

from __future__ import annotations

import struct

from protocol import vhost_user as vu
from protocol.balloon import BalloonConfig
from tests.daemon.harness import ApiError
from tests.frontend import PAGE_SIZE

import pytest
from tests.daemon.conftest import ENGINES

#: Device behaviour: the same tests on both vhost-user engines.
DAEMON_ENGINES = ENGINES


def test_target_change_notifies_a_running_device(daemon, connect):
    fe = connect()
    assert fe.num_pages() == 0
    daemon.api.set_target("vm0", 8 << 20)
    assert fe.wait_config_change(3), "no CONFIG_CHANGE_MSG on the backend channel"
    message = fe.backend_messages[-1]
    assert message.request == vu.BackendRequest.CONFIG_CHANGE_MSG
    assert message.flags & vu.FLAG_VERSION_MASK == vu.VERSION
    assert message.payload == b""
    assert fe.num_pages() == (8 << 20) // PAGE_SIZE
    state = daemon.api.vm("vm0")
    assert state["target_bytes"] == 8 << 20
    assert state["counters"]["config_changes_sent"] == 1
    # The same target again is no change.
    daemon.api.set_target("vm0", 8 << 20)
    assert not fe.wait_config_change(0.3)


def test_no_config_change_while_stopped(daemon, connect):
    fe = connect()
    fe.stop()
    daemon.api.set_target("vm0", 4 << 20)
    assert not fe.wait_config_change(0.5), "CONFIG_CHANGE_MSG sent to a stopped device"
    assert fe.num_pages() == 1024  # readable all the same
    fe.start()
    assert fe.wait_config_change(3), "the change was not delivered once the device ran again"
    assert fe.num_pages() == 1024


def test_no_config_change_before_the_first_start(daemon, connect):
    fe = connect(start=False)
    daemon.api.set_target("vm0", 2 << 20)
    assert not fe.wait_config_change(0.5)
    assert fe.num_pages() == 512  # the driver reads it at probe
    fe.start()
    fe.poll_backend(0.3)  # a late notification is harmless, none is needed


def test_stale_num_pages_in_set_config_only_changes_actual(daemon, connect):
    fe = connect()
    assert fe.get_config().num_pages == 0  # QEMU's cache: num_pages 0
    daemon.api.set_target("vm0", 16 << 20)
    fe.set_actual(1000)  # SET_CONFIG of the whole cached config: num_pages 0, stale
    config = fe.get_config()
    assert config.num_pages == 4096
    assert config.actual == 1000
    state = daemon.api.vm("vm0")
    assert state["actual_bytes"] == 1000 * PAGE_SIZE
    assert state["target_bytes"] == 16 << 20
    # A narrow write of only `actual`, as another frontend might send.
    fe.request(vu.Request.SET_CONFIG, vu.ConfigSpace(BalloonConfig.OFFSET_ACTUAL, 4, 0, struct.pack("<I", 5)).encode())
    assert fe.get_config().actual == 5
    # A write that tries to set num_pages alone is ignored.
    fe.request(vu.Request.SET_CONFIG, vu.ConfigSpace(0, 4, 0, struct.pack("<I", 1)).encode())
    assert fe.get_config().num_pages == 4096


def test_target_outlives_the_connection(daemon, connect):
    fe = connect()
    daemon.api.set_target("vm0", 12 << 20)
    fe.close()
    daemon.wait_disconnected("vm0")
    fe2 = connect()
    assert fe2.num_pages() == 3072


def test_target_validation(daemon, connect):
    fe = connect()
    for bad in (-1, "1G", 1.5, None, True, fe.ram.size + PAGE_SIZE):
        with pytest.raises(ApiError) as err:
            daemon.api.set_target("vm0", bad)
        assert err.value.status == 400
    with pytest.raises(ApiError) as err:
        daemon.api.set_target("nosuchvm", 0)
    assert err.value.status == 404
    assert daemon.api.vm("vm0")["target_bytes"] == 0


def test_config_windows(daemon, connect):
    """GET_CONFIG of a window, including past the 16-byte balloon config."""
    fe = connect()
    daemon.api.set_target("vm0", 1 << 20)
    payload = fe.request(vu.Request.GET_CONFIG, vu.ConfigSpace(0, 4, 0, bytes(4)).encode())
    assert payload[vu.CONFIG_HEAD.size :] == struct.pack("<I", 256)
    payload = fe.request(vu.Request.GET_CONFIG, vu.ConfigSpace(8, 24, 0, bytes(24)).encode())
    assert len(payload) == vu.CONFIG_HEAD.size + 24
    assert payload[vu.CONFIG_HEAD.size + 8 :] == bytes(16)


def test_acknowledgements_the_frontend_asked_for_are_counted(daemon, connect):
    """`acks_requested` counts requests sent with NEED_REPLY and only those:
    the real-VM config-cache test reads it to show QEMU's config writes no
    longer ask (qemu-patches/0005)."""
    fe = connect()
    before = daemon.api.vm("vm0")["counters"]["acks_requested"]
    fe.get_config()
    data = bytearray(fe.config_cache)
    data[BalloonConfig.OFFSET_ACTUAL:BalloonConfig.OFFSET_ACTUAL + 4] = struct.pack("<I", 5)
    window = vu.ConfigSpace(0, fe.config_size, 0, bytes(data)).encode()
    for _ in range(3):
        fe.request(vu.Request.SET_CONFIG, window, ack=True)
    for _ in range(4):
        fe.request(vu.Request.SET_CONFIG, window, ack=False)
    fe.get_config()  # in order after the writes: all of them were handled
    assert daemon.api.vm("vm0")["counters"]["acks_requested"] - before == 3
    assert fe.cached_config().actual == 5


def test_a_config_window_is_read_where_it_is_asked_for(daemon, connect):
    """GET_CONFIG of part of the space answers that part (the library's own
    callback has no offset), and a request that also asked for an
    acknowledgement gets one reply, flagged exactly VERSION|REPLY (the test
    frontend refuses anything else), and no acknowledgement besides."""
    fe = connect()
    daemon.api.set_target("vm0", 8 << 20)
    assert fe.wait_config_change(3)
    fe.write_config(BalloonConfig.OFFSET_ACTUAL, struct.pack("<I", 77))
    actual = vu.ConfigSpace(BalloonConfig.OFFSET_ACTUAL, 4, 0, bytes(4))
    for ack in (False, True):
        fe.send(vu.Request.GET_CONFIG, actual.encode(), need_reply=ack)
        reply = fe.recv_reply(vu.Request.GET_CONFIG)
        assert reply == vu.ConfigSpace(BalloonConfig.OFFSET_ACTUAL, 4, 0, struct.pack("<I", 77)).encode()
    # The next reply answers the next request (no stray acknowledgement first).
    window = fe.request(vu.Request.GET_CONFIG, vu.ConfigSpace(0, 4, 0, bytes(4)).encode())
    assert window == vu.ConfigSpace(0, 4, 0, struct.pack("<I", 2048)).encode()  # num_pages: 8 MiB
    # The same for replies the engine leaves to libvhost-user.
    fe.send(vu.Request.GET_MAX_MEM_SLOTS, need_reply=True)
    assert len(fe.recv_reply(vu.Request.GET_MAX_MEM_SLOTS, 8)) == 8
    fe.send(vu.Request.GET_VRING_BASE, vu.VringState(0, 0).encode(), need_reply=True)  # stops queue 0
    assert len(fe.recv_reply(vu.Request.GET_VRING_BASE, 8)) == 8
    assert fe.request(vu.Request.GET_CONFIG, actual.encode())[vu.CONFIG_HEAD.size:] == struct.pack("<I", 77)
