"""BalloonDevice.set_discard_inhibit with real memfd-backed guest RAM: while
discards are refused the balloon still works but no host memory is freed;
once they are allowed again all of the balloon is.

The device runs in-process: tests.frontend's GuestRam and DriverQueue are the
guest, a GuestMemory over the same memfd and real Vrings are the daemon's
side, and `device.queue_kicked` is what the engine calls on a kick.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from balloond.device.balloon import BalloonDevice, DeviceSettings
from balloond.engine.memory import GuestMemory
from balloond.engine.vring import Vring
from protocol import balloon as vb
from protocol.balloon import Feature, QueueRole
from protocol.vhost_user import MemoryRegion, VringAddr
from tests.frontend import DriverQueue, GuestRam

PAGE = 4096
RAM_SIZE = 4 << 20
UADDR_BASE = 0x7F3A_5000_0000
QSIZE = 16
RINGS_GPA = 0x10000  # one page per queue
BUFFER_GPA = 0x30000  # PFN arrays
BALLOONED = range(256, 512)  # 1 MiB of guest pages
REPORTED = range(600, 664)  # 256 KiB
FEATURES = (1 << Feature.VERSION_1) | (1 << Feature.MUST_TELL_HOST) | (1 << Feature.REPORTING)


class Rig:
    """One device over one memfd, with the driver's queues in that memory."""

    def __init__(self, settings: DeviceSettings) -> None:
        self.ram = GuestRam(RAM_SIZE, "single")
        self.device = BalloonDevice(settings)
        self.device.set_features(FEATURES)
        self.memory = GuestMemory()
        self.memory.add(MemoryRegion(0, RAM_SIZE, UADDR_BASE, 0), os.dup(self.ram.fd))
        self.device.set_memory(self.memory)
        self.driver: dict[QueueRole, DriverQueue] = {}
        self.vrings: dict[QueueRole, Vring] = {}
        for index, role in enumerate(vb.queue_roles(FEATURES)):
            q = DriverQueue(self.ram, index, QSIZE, RINGS_GPA + index * PAGE, event_idx=False)
            vring = Vring(index)
            vring.num = QSIZE
            vring.addr = VringAddr(index, 0, UADDR_BASE + q.desc_gpa, UADDR_BASE + q.used_gpa,
                                   UADDR_BASE + q.avail_gpa, 0)
            vring.enabled = True
            vring.start(self.memory, event_idx=False, indirect=False)
            self.device.queue_started(vring)
            self.driver[role], self.vrings[role] = q, vring
        self.device.started()

    def _send(self, role: QueueRole, pfns: range) -> None:
        data = vb.encode_pfns(list(pfns))
        self.ram.write(BUFFER_GPA, data)
        q = self.driver[role]
        q.put_avail(q.add([(BUFFER_GPA, len(data), False)], role.value))
        self.device.queue_kicked(self.vrings[role])
        assert [u.token for u in q.get_used()] == [role.value]  # acknowledged

    def inflate(self, pfns: range) -> None:
        self._send(QueueRole.INFLATE, pfns)

    def deflate(self, pfns: range) -> None:
        self._send(QueueRole.DEFLATE, pfns)

    def report(self, pfns: range) -> None:
        q = self.driver[QueueRole.REPORTING]
        q.put_avail(q.add([(pfns[0] * PAGE, len(pfns) * PAGE, True)], "report"))
        self.device.queue_kicked(self.vrings[QueueRole.REPORTING])
        assert [u.token for u in q.get_used()] == ["report"]

    def allocated(self) -> int:
        return self.ram.allocated_bytes()

    def close(self) -> None:
        self.device.disconnected()
        for vring in self.vrings.values():
            vring.stop()
        self.memory.close()
        self.ram.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(DeviceSettings(stats_interval=0, discard_max_delay=0))
    yield r
    r.close()


def touched(r: Rig, *ranges: range) -> int:
    """Dirty the pages (and the PFN buffer page), return the allocation after."""
    for pages in ranges:
        r.ram.touch(pages)
    r.ram.touch(range(BUFFER_GPA // PAGE, BUFFER_GPA // PAGE + 2))
    return r.allocated()


def test_the_rig_frees_ballooned_memory_when_discards_are_allowed(rig):
    before = touched(rig, BALLOONED)
    rig.inflate(BALLOONED)
    assert before - rig.allocated() == len(BALLOONED) * PAGE
    assert rig.device.counters.balloon_freed_bytes == len(BALLOONED) * PAGE
    assert rig.ram.is_zero(BALLOONED[0]) and rig.ram.is_zero(BALLOONED[-1])


def test_inflate_while_inhibited_is_tracked_not_freed_and_allowing_frees_all(rig):
    before = touched(rig, BALLOONED)
    rig.device.set_discard_inhibit("assigned device(s) (VFIO): /machine/peripheral-anon/device[0]")
    rig.inflate(BALLOONED)
    assert rig.allocated() == before  # nothing freed: st_blocks unchanged
    assert len(rig.device.tracker) == len(BALLOONED) and set(rig.device.tracker) == set(BALLOONED)
    assert rig.ram.nonzero(BALLOONED) == list(BALLOONED)  # the data is still there
    snap = rig.device.snapshot()
    assert snap["ballooned_bytes"] == len(BALLOONED) * PAGE and snap["pending_discard_bytes"] == 0
    assert snap["discard_inhibited"].startswith("assigned device(s)")
    assert snap["counters"]["discard_inhibits"] == 1 and snap["host_freed_bytes"] == 0
    # Deflates still work while refused.
    rig.deflate(range(256, 264))
    assert len(rig.device.tracker) == len(BALLOONED) - 8
    rig.device.set_discard_inhibit(None)
    assert before - rig.allocated() == (len(BALLOONED) - 8) * PAGE  # every frame still ballooned, freed
    assert rig.ram.nonzero(range(256, 264)) == list(range(256, 264))  # the deflated ones kept
    assert rig.device.snapshot()["discard_inhibited"] is None
    assert rig.device.counters.balloon_freed_bytes == (len(BALLOONED) - 8) * PAGE


def test_allowing_again_also_covers_frames_freed_before_the_inhibit(rig):
    first, second = range(256, 384), range(384, 512)
    before = touched(rig, first, second)
    rig.inflate(first)  # freed at once
    assert before - rig.allocated() == len(first) * PAGE
    rig.device.set_discard_inhibit("migration in progress (active)")
    rig.inflate(second)
    assert before - rig.allocated() == len(first) * PAGE
    rig.device.set_discard_inhibit(None)
    assert before - rig.allocated() == (len(first) + len(second)) * PAGE


def test_a_changed_reason_is_not_another_closing_and_reopening_without_balloon_is_a_no_op(rig):
    d = rig.device
    d.set_discard_inhibit("QMP not connected")
    d.set_discard_inhibit("migration in progress (active)")
    assert d.counters.discard_inhibits == 1 and d.discard_inhibit == "migration in progress (active)"
    d.set_discard_inhibit(None)
    d.set_discard_inhibit(None)
    assert d.counters.discard_inhibits == 1 and d.counters.discard_calls == 0
    d.set_discard_inhibit("again")
    assert d.counters.discard_inhibits == 2


def test_a_device_without_memory_yet_accepts_the_verdict():
    d = BalloonDevice(DeviceSettings())
    d.set_discard_inhibit("QMP not connected: cannot tell whether discards are safe")
    assert d.snapshot()["discard_inhibited"].startswith("QMP not connected")
    d.set_discard_inhibit(None)  # nothing mapped, nothing ballooned: nothing to do
    assert d.discard_inhibit is None and d.counters.discard_calls == 0


def test_pending_deferred_discards_are_dropped_when_inhibited():
    async def main() -> None:
        # Deferred discards: they wait for the timer (or flush_discards).
        r = Rig(DeviceSettings(stats_interval=0, discard_max_delay=10.0, discard_idle=10.0))
        try:
            d = r.device
            before = touched(r, BALLOONED)
            r.inflate(range(256, 320))
            assert d.snapshot()["pending_discard_bytes"] == 64 * PAGE
            d.flush_discards()  # control: deferred discards do free when due
            assert before - r.allocated() == 64 * PAGE
            r.inflate(range(320, 512))
            assert d.snapshot()["pending_discard_bytes"] == 192 * PAGE and d._flush_timer is not None
            d.set_discard_inhibit("assigned device(s) (VFIO): /machine/peripheral/gpu0")
            assert d.snapshot()["pending_discard_bytes"] == 0 and d._flush_timer is None
            d.flush_discards()  # what the timer would have done: nothing left to do
            assert before - r.allocated() == 64 * PAGE
            assert r.ram.nonzero(range(320, 512)) == list(range(320, 512))
            assert len(d.tracker) == len(BALLOONED)
            # Allowed again: every frame of the balloon goes (through the deferral).
            d.set_discard_inhibit(None)
            d.flush_discards()
            assert before - r.allocated() == len(BALLOONED) * PAGE
        finally:
            r.close()

    asyncio.run(main())


def test_free_page_reports_are_skipped_while_inhibited(rig):
    before = touched(rig, REPORTED)
    rig.device.set_discard_inhibit("postcopy migration in progress (postcopy-active)")
    rig.report(REPORTED)
    c = rig.device.counters
    assert c.reports_skipped_inhibit == 1 and c.reported_bytes == len(REPORTED) * PAGE
    assert c.reported_freed_bytes == 0 and rig.allocated() == before
    rig.device.set_discard_inhibit(None)
    assert rig.allocated() == before  # reported pages are not the balloon: not freed on reopening
    rig.report(REPORTED)  # the guest reports them again
    assert c.reports_skipped_inhibit == 1
    assert c.reported_freed_bytes == len(REPORTED) * PAGE
    assert before - rig.allocated() == len(REPORTED) * PAGE
