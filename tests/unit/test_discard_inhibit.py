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

    def __init__(self, settings: DeviceSettings, features: int = FEATURES) -> None:
        self.ram = GuestRam(RAM_SIZE, "single")
        self.device = BalloonDevice(settings)
        self.device.set_features(features)
        self.memory = GuestMemory()
        self.memory.add(MemoryRegion(0, RAM_SIZE, UADDR_BASE, 0), os.dup(self.ram.fd))
        self.device.set_memory(self.memory)
        self.driver: dict[QueueRole, DriverQueue] = {}
        self.vrings: dict[QueueRole, Vring] = {}
        for index, role in enumerate(vb.queue_roles(features)):
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

    def _send(self, role: QueueRole, pfns: range | list[int]) -> None:
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
    assert snap.ballooned_bytes == len(BALLOONED) * PAGE and snap.pending_discard_bytes == 0
    assert snap.discard_inhibited.startswith("assigned device(s)")
    assert snap.counters["discard_inhibits"] == 1 and snap.host_freed_bytes == 0
    # Deflates still work while refused.
    rig.deflate(range(256, 264))
    assert len(rig.device.tracker) == len(BALLOONED) - 8
    rig.device.set_discard_inhibit(None)
    assert before - rig.allocated() == (len(BALLOONED) - 8) * PAGE  # every frame still ballooned, freed
    assert rig.ram.nonzero(range(256, 264)) == list(range(256, 264))  # the deflated ones kept
    assert rig.device.snapshot().discard_inhibited is None
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
    assert d.snapshot().discard_inhibited.startswith("QMP not connected")
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
            assert d.snapshot().pending_discard_bytes == 64 * PAGE
            d.flush_discards()  # control: deferred discards do free when due
            assert before - r.allocated() == 64 * PAGE
            r.inflate(range(320, 512))
            assert d.snapshot().pending_discard_bytes == 192 * PAGE and d._flush_timer is not None
            d.set_discard_inhibit("assigned device(s) (VFIO): /machine/peripheral/gpu0")
            assert d.snapshot().pending_discard_bytes == 0 and d._flush_timer is None
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


# ------------------------------------------- deferral and MUST_TELL_HOST
#
# These run inside an event loop, as the daemon does: outside one the device
# has no timer to defer with and discards at once, which would hide deferral.

NO_TELL = FEATURES & ~(1 << Feature.MUST_TELL_HOST)
DEFAULT_DELAY = DeviceSettings().discard_max_delay
DELAYS = pytest.mark.parametrize("delay", [0.0, DEFAULT_DELAY], ids=["immediate", "deferred-default"])


def run_in_loop(settings: DeviceSettings, features: int, body) -> None:
    async def main() -> None:
        r = Rig(settings, features)
        try:
            await body(r)
        finally:
            r.close()

    asyncio.run(main())


def test_default_delay_is_a_real_deferral():
    """The other tests here rely on the default delay being long enough to
    outlive an inflate's acknowledgement (and the 0.3 s they wait past it)."""
    assert 0.1 <= DEFAULT_DELAY < 0.3


@DELAYS
def test_pages_reused_right_after_inflate_without_must_tell_host(delay):
    """Without MUST_TELL_HOST the driver may reuse a frame as soon as the
    inflate is acknowledged; the discard must be complete by then, whatever
    discard_max_delay says (else it zeroes the guest's new data later)."""

    async def body(r: Rig) -> None:
        d = r.device
        pages = range(256, 320)
        before = touched(r, pages)
        assert not d.may_defer_discards
        r.inflate(pages)
        # Freed at the moment the buffer came back, nothing left pending.
        assert d.snapshot().pending_discard_bytes == 0
        assert before - r.allocated() == len(pages) * PAGE
        assert d.counters.balloon_freed_bytes == len(pages) * PAGE
        r.ram.fill(pages, seed=3)  # reused before any deflate
        await asyncio.sleep(DEFAULT_DELAY + 0.05)  # past any deferral window
        assert r.ram.damaged(pages, seed=3) == []
        assert d.counters.discard_calls == 1

    run_in_loop(DeviceSettings(stats_interval=0, discard_max_delay=delay), NO_TELL, body)


def test_without_must_tell_host_a_later_inflate_does_not_bridge_over_reused_frames():
    """Coalescing two runs across frames already ballooned punches those frames
    again: harmless only when the guest may not be using them."""

    async def body(r: Rig) -> None:
        reused = range(300, 310)
        around = [*range(290, 300), *range(310, 320)]
        before = touched(r, reused, around)
        r.inflate(reused)
        r.ram.fill(reused, seed=4)  # the guest takes them back without telling
        r.inflate(around)  # one buffer on both sides of them
        await asyncio.sleep(DEFAULT_DELAY + 0.05)
        assert r.ram.damaged(reused, seed=4) == []
        assert before - r.allocated() == len(around) * PAGE  # the reused ones stay allocated
        assert r.device.counters.discard_calls == 3  # two runs in the second buffer, not one bridged

    run_in_loop(DeviceSettings(stats_interval=0), NO_TELL, body)


def test_with_must_tell_host_the_default_delay_defers_and_a_deflate_cancels():
    """The other side of the rule: with MUST_TELL_HOST discards do wait to be
    coalesced, and a deflate of frames still pending cancels their discard."""

    async def body(r: Rig) -> None:
        d = r.device
        kept, freed = range(256, 320), range(320, 384)
        before = touched(r, kept, freed)
        assert d.may_defer_discards
        r.inflate(kept)
        r.inflate(freed)
        assert d.snapshot().pending_discard_bytes == 128 * PAGE  # deferred, not done
        assert r.allocated() == before and d.counters.discard_calls == 0
        r.deflate(kept)  # cancels the discard of these before it is acknowledged
        assert d.snapshot().pending_discard_bytes == 64 * PAGE
        r.ram.fill(kept, seed=5)
        await asyncio.sleep(DEFAULT_DELAY + 0.05)
        assert d.snapshot().pending_discard_bytes == 0
        assert r.ram.damaged(kept, seed=5) == []
        assert r.ram.nonzero(freed) == []
        assert d.counters.discard_calls == 1 and d.counters.balloon_freed_bytes == len(freed) * PAGE
        assert d.counters.discards_cancelled == len(kept)

    run_in_loop(DeviceSettings(stats_interval=0), FEATURES, body)


def test_allowing_discards_again_leaves_a_driver_without_must_tell_host_alone():
    """Frames inflated while discards were refused may be in use again by a
    driver without MUST_TELL_HOST: allowing discards must not punch them."""

    async def body(r: Rig) -> None:
        pages = range(256, 320)
        touched(r, pages)
        r.device.set_discard_inhibit("migration in progress (active)")
        r.inflate(pages)
        r.ram.fill(pages, seed=6)
        r.device.set_discard_inhibit(None)
        await asyncio.sleep(DEFAULT_DELAY + 0.05)
        assert r.ram.damaged(pages, seed=6) == []
        assert r.device.counters.discard_calls == 0

    run_in_loop(DeviceSettings(stats_interval=0), NO_TELL, body)


# ------------------------------------ discards allowed again while stopped
#
# The VM pauses (or the guest reboots) while discards are refused, and they
# are allowed again before the device starts again. A paused driver resumes
# with its balloon: discard it then. A reset driver starts its rings at 0 and
# uses those frames as its own: discard nothing.

def stop_device(r: Rig) -> None:
    """VM stop as the engine sees it: the device stops, then GET_VRING_BASE per ring."""
    r.device.stopped()
    for vring in r.vrings.values():
        held = r.device.queue_stopped(vring)
        vring.base = (vring.stop() - held) & 0xFFFF
        vring.enabled = False


def start_device(r: Rig, *, reset_driver: bool = False) -> None:
    """The next start: each ring resumes from its base (a reset driver's from 0)."""
    for role, vring in r.vrings.items():
        if reset_driver:
            r.driver[role].reset()
            vring.base = 0
        vring.enabled = True
        vring.start(r.memory, event_idx=False, indirect=False)
        r.device.queue_started(vring)
    r.device.started()


def allowed_while_stopped(r: Rig) -> int:
    """Refused, inflate, stop, allowed again: returns the allocation before."""
    before = touched(r, BALLOONED)
    r.device.set_discard_inhibit("migration in progress (active)")
    r.inflate(BALLOONED)
    stop_device(r)
    r.device.set_discard_inhibit(None)
    assert r.device.discard_inhibit is None
    assert r.allocated() == before, "discarded while the device was stopped"
    assert r.ram.nonzero(BALLOONED) == list(BALLOONED)
    assert r.device.counters.discard_calls == 0 and r.device.snapshot().pending_discard_bytes == 0
    return before


@DELAYS
def test_discards_allowed_while_stopped_wait_for_the_same_driver_to_resume(delay):
    async def body(r: Rig) -> None:
        d = r.device
        before = allowed_while_stopped(r)
        await asyncio.sleep(DEFAULT_DELAY + 0.05)
        assert r.allocated() == before  # still nothing while stopped
        start_device(r)  # the paused driver resumes where it stopped
        assert d.counters.driver_resets == 0 and len(d.tracker) == len(BALLOONED)
        await asyncio.sleep(DEFAULT_DELAY + 0.05)
        assert before - r.allocated() == len(BALLOONED) * PAGE, "the balloon was not discarded at the start"
        assert r.ram.nonzero(BALLOONED) == []
        r.deflate(range(256, 264))  # the resumed driver carries on
        assert len(d.tracker) == len(BALLOONED) - 8

    run_in_loop(DeviceSettings(stats_interval=0, discard_max_delay=delay), FEATURES, body)


@DELAYS
def test_discards_allowed_while_stopped_spare_a_reset_drivers_pages(delay):
    async def body(r: Rig) -> None:
        d = r.device
        allowed_while_stopped(r)
        r.ram.fill(BALLOONED, seed=12)  # the rebooted guest's data in the old balloon's frames
        start_device(r, reset_driver=True)
        await asyncio.sleep(DEFAULT_DELAY + 0.05)
        assert r.ram.damaged(BALLOONED, seed=12) == [], "a reset driver's pages were discarded"
        assert d.counters.driver_resets == 1 and len(d.tracker) == 0
        assert d.counters.discard_calls == 0
        # the new driver's own balloon is discarded as usual (discards are allowed)
        r.inflate(range(256, 320))
        await asyncio.sleep(DEFAULT_DELAY + 0.05)
        assert r.ram.nonzero(range(256, 320)) == [] and r.ram.damaged(range(320, 512), seed=12) == []

    run_in_loop(DeviceSettings(stats_interval=0, discard_max_delay=delay), FEATURES, body)

