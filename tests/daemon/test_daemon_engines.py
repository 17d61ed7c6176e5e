"""Behaviours found while running the same tests on both vhost-user
engines (balloond --engine): each holds on both."""

from __future__ import annotations

import array
import select
import time

from protocol.balloon import QueueRole
from protocol.vhost_user import Request
from tests import wire
from tests.daemon.conftest import ENGINES

PAGE = 4096
DAEMON_ENGINES = ENGINES


def _enable_all(fe, on: int) -> None:
    for index in sorted(fe.queues):
        fe.request(Request.SET_VRING_ENABLE, wire.pack_vring_state(index, on))


def _drained(fd: int, timeout: float = 5.0) -> None:
    """Wait until the daemon has read the kick eventfd (its counter is 0)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while poller.poll(0):
        assert time.monotonic() < deadline, "the daemon never read the kick"
        time.sleep(0.01)


def test_a_buffer_added_while_the_rings_were_disabled_is_served_once_enabled(daemon, connect, engine):
    """ENABLE(0), a buffer and its kick, ENABLE(1): the ring kept its state
    and the buffer is taken when the ring is enabled again. The pure engine
    does not read a disabled ring's kicks; libvhost-user's library does (and
    the kick is gone): its engine first lost the buffer."""
    fe = connect()
    _enable_all(fe, 0)
    q = fe.queue(QueueRole.INFLATE)
    slot = fe._pfn_slot_gpas(QueueRole.INFLATE)[0]
    pfns = list(range(fe.first_free_pfn, fe.first_free_pfn + 256))
    fe.ram.touch(pfns)
    data = array.array("I", pfns).tobytes()
    fe.ram.write(slot, data)
    q.put_avail(q.add([(slot, len(data), False)], slot))
    q.kick(force=True)
    if engine == "libvhost-user":
        _drained(q.kick_fd)  # the kick consumed while the ring is disabled
    _enable_all(fe, 1)
    assert len(q.wait(1, timeout=5)) == 1
    daemon.wait_vm("vm0", lambda s: s["ballooned_bytes"] == 256 * PAGE)
    fe.deflate(pfns)
