"""The test frontend's driver-side rings against the protocol layer's device side.

The driver half (tests/frontend.py DriverQueue) and the device half
(protocol.virtqueue.SplitQueue) were written independently; here they share
one guest RAM memfd and must agree on every byte. Also protocol edge cases
found while building the frontend.
"""

from __future__ import annotations

import struct

import pytest

from protocol import virtqueue as vq
from protocol.errors import GuestAddressError, GuestError
from tests import wire
from tests.frontend import DriverQueue, GuestRam

RING = 0x100000
TABLES = 0x110000
QSIZE = 16


class RamAccess:
    """GuestMemoryAccess over a GuestRam (guest-physical addresses)."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram

    def view(self, gpa: int, length: int) -> memoryview:
        if length < 0 or not self.ram.contains(gpa, max(length, 1)):
            raise GuestAddressError(f"{gpa:#x}+{length:#x} outside RAM")
        return self.ram.view(gpa, length)


@pytest.fixture
def ram():
    r = GuestRam(4 << 20)
    yield r
    r.close()


def pair(ram, *, event_idx=True, indirect=True):
    driver = DriverQueue(
        ram, 0, QSIZE, RING, event_idx=event_idx, indirect_gpa=TABLES, indirect_slots=4 if indirect else 0, indirect_max=8
    )
    device = vq.SplitQueue(
        QSIZE,
        ram.view(driver.desc_gpa, vq.desc_table_size(QSIZE)),
        ram.view(driver.avail_gpa, vq.avail_ring_size(QSIZE, event_idx)),
        ram.view(driver.used_gpa, vq.used_ring_size(QSIZE, event_idx)),
        event_idx=event_idx,
        indirect=indirect,
    )
    return driver, device


@pytest.mark.parametrize("indirect", [False, True])
def test_chains_round_trip(ram, indirect):
    driver, device = pair(ram, indirect=indirect)
    mem = RamAccess(ram)
    segs = [(0x200000, 100, False), (0x201000, 8, False), (0x202000, 4096, True)]
    head = driver.add(segs, "tok", indirect=indirect)
    driver.put_avail(head)
    assert device.pending() == 1
    chain = device.pop(mem)
    assert chain is not None and chain.head == head
    assert [(s.addr, s.length, s.writable) for s in chain.segments] == segs
    assert driver.num_free == QSIZE - (1 if indirect else 3)
    device.push(chain.head, 77)
    used = driver.get_used()
    assert [(u.head, u.length, u.token) for u in used] == [(head, 77, "tok")]
    assert driver.num_free == QSIZE
    assert driver.in_flight() == 0


def test_many_laps_around_the_ring(ram):
    driver, device = pair(ram)
    mem = RamAccess(ram)
    for i in range(5 * QSIZE + 3):
        head = driver.add([(0x200000 + 4 * i, 4, False)], i)
        driver.put_avail(head)
        chain = device.pop(mem)
        assert chain.segments[0].addr == 0x200000 + 4 * i
        device.push(chain.head, 0)
        assert [u.token for u in driver.get_used()] == [i]
    assert driver.avail_idx == device.last_avail == 5 * QSIZE + 3


def test_event_idx_kick_suppression_follows_the_device(ram):
    driver, device = pair(ram)
    mem = RamAccess(ram)
    driver.kick_fd = None  # decisions only
    driver.put_avail(driver.add([(0x200000, 4, False)]))
    assert driver.kick_needed()  # a fresh ring: avail_event 0
    driver.kick()
    device.pop(mem)
    device.set_avail_event()  # the device wants a kick for the next one
    driver.put_avail(driver.add([(0x200000, 4, False)]))
    assert driver.kick_needed()
    driver.kick()
    # The device has not caught up: no kick for a third buffer.
    driver.put_avail(driver.add([(0x200000, 4, False)]))
    assert not driver.kick_needed()


def test_used_event_written_by_the_driver_drives_device_notifications(ram):
    driver, device = pair(ram)
    mem = RamAccess(ram)
    for _ in range(3):
        driver.put_avail(driver.add([(0x200000, 4, False)]))
    chains = [device.pop(mem) for _ in range(3)]
    device.push(chains[0].head, 0)
    assert device.should_notify()  # first notification always goes
    driver.get_used()
    driver._want_interrupt()  # what wait() does before sleeping
    device.push(chains[1].head, 0)
    assert device.should_notify()
    device.push(chains[2].head, 0)
    assert not device.should_notify()  # the driver has not caught up with used_event


def test_alloc_desc_reclaimed_on_use(ram):
    driver, device = pair(ram)
    mem = RamAccess(ram)
    idx = driver.alloc_desc(2, "raw")
    driver.write_desc(idx[0], 0x200000, 4, wire.VRING_DESC_F_NEXT, idx[1])
    driver.write_desc(idx[1], 0x200004, 4, 0, 0)
    driver.put_avail(idx[0])
    chain = device.pop(mem)
    assert len(chain.segments) == 2
    device.push(chain.head, 0)
    assert driver.get_used()[0].token == "raw"
    assert driver.num_free == QSIZE


def test_indirect_table_longer_than_the_queue_is_refused(ram):
    """virtio 1.2, 2.7.5.3.1: no chain longer than the queue size; an
    unbounded table lets one buffer cost the daemon seconds."""
    driver, device = pair(ram)
    mem = RamAccess(ram)
    n = QSIZE + 1
    ram.write(TABLES, wire.pack_desc(0x200000, 4, 0, 0) * n)
    idx = driver.alloc_desc(1)
    driver.write_desc(idx[0], TABLES, n * wire.DESC_SIZE, wire.VRING_DESC_F_INDIRECT, 0)
    driver.put_avail(idx[0])
    with pytest.raises(GuestError, match="exceeds the queue size"):
        device.pop(mem)


def test_indirect_table_of_exactly_the_queue_size_is_fine(ram):
    driver, device = pair(ram)
    mem = RamAccess(ram)
    table = b"".join(
        wire.pack_desc(0x200000 + 4 * i, 4, wire.VRING_DESC_F_NEXT if i + 1 < QSIZE else 0, i + 1 if i + 1 < QSIZE else 0)
        for i in range(QSIZE)
    )
    ram.write(TABLES, table)
    idx = driver.alloc_desc(1)
    driver.write_desc(idx[0], TABLES, len(table), wire.VRING_DESC_F_INDIRECT, 0)
    driver.put_avail(idx[0])
    assert len(device.pop(mem).segments) == QSIZE


def test_read_bytes_skips_zero_length_segments(ram):
    mem = RamAccess(ram)
    ram.write(0x200000, struct.pack("<2I", 11, 12))
    ram.write(0x201000, struct.pack("<2I", 13, 14))
    chain = vq.Chain(0, (vq.Segment(0x200000, 8, False), vq.Segment(0x200100, 0, False), vq.Segment(0x201000, 8, False)))
    assert chain.read_bytes(mem, 1024) == struct.pack("<4I", 11, 12, 13, 14)


def test_used_index_glitch_is_reread(ram):
    """A momentarily impossible used index (more than the ring) is read again,
    not believed."""
    driver, device = pair(ram)
    mem = RamAccess(ram)
    driver.put_avail(driver.add([(0x200000, 4, False)]))
    chain = device.pop(mem)
    device.push(chain.head, 0)
    real = driver.read_used_idx()
    view = driver.used
    wire.write_u16(view, wire.RING_IDX, 0x8000)
    import threading

    threading.Timer(0.02, lambda: wire.write_u16(view, wire.RING_IDX, real)).start()
    used = driver.get_used()
    assert [u.head for u in used] == [chain.head]
    assert driver.glitches >= 1
