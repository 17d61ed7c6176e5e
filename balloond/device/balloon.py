"""BalloonDevice: the virtio-balloon device model behind one connection.

Fed by the engine through the `VirtioDevice` seam: it maps queue indices to
roles from the negotiated features, turns buffers into tracker updates and
discards, keeps the config space, and answers stats requests on a timer.

Per-queue handling (each pass takes every chain the guest has made available,
does the work once for the whole batch, then returns the buffers):
  inflate    PFNs enter the tracker; those newly ballooned are discarded
  deflate    PFNs leave the tracker (nothing to do on the host: the memory
             comes back on the guest's next touch)
  stats      the buffer is read and held; returning it is how the device
             asks for the next sample, every `stats_interval` seconds
  reporting  free ranges are discarded, unless the guest poisons free pages
             with a non-zero value (it expects that pattern back)
  migrate    balloond's extension: membership moves old → new in one step,
             or (split migrations) a departure leaves like a deflate and an
             arrival or a return enters like an inflate

Ordering of discards and deflates: with MUST_TELL_HOST the driver may not
touch a ballooned page before a deflate hands it back, so discards of
inflated frames may wait (up to `discard_max_delay`) to be coalesced across
buffers, and a deflate cancels the pending discards of its frames before it
is acknowledged. Without MUST_TELL_HOST the driver may reuse a page as soon
as its inflate is acknowledged, without a deflate: then each buffer's
discards complete before the buffer is returned (see `_release`).

Driver reset: QEMU does not tell a vhost-user backend that the guest reset
its device, but a reset driver starts its inflate queue from avail index 0,
while a paused-and-resumed one resumes where it was. An inflate queue that
starts at 0 therefore means a new driver, whose balloon is empty.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from protocol import balloon as vb
from protocol import extension as ext
from protocol.balloon import BalloonConfig, Feature, QueueRole
from protocol.errors import GuestError, ProtocolError
from protocol.virtqueue import Chain

from ..engine.device_api import DeviceHost, GuestRam, Ring
from ..logs import RateLimited
from ..status import DeviceStatus
from .journal import BalloonJournal, GuestIdentity, PeerProcess
from .migration_state import MigrationState
from .releaser import MemoryReleaser, releasable_region
from .tracker import PfnTracker

#: Largest inflate/deflate/stats/migrate buffer accepted; a larger one is a
#: guest error. Linux's own driver sends 1 KiB of PFNs; the extension lets a
#: driver send 4 KiB of them (`ext.PFNS_PER_BUFFER`), and a full migrate
#: buffer is 4 KiB too. It bounds the work one kick can ask of the VM's
#: worker: at 64 KiB a 128-entry queue of maximal buffers took 5 s of Python
#: per kick (found by fuzzing).
MAX_BUFFER_BYTES = max(ext.PFNS_PER_BUFFER * 4, ext.MIGRATIONS_PER_BUFFER * ext.MIGRATION_SIZE)

#: Queues whose buffers move frames into or out of the balloon: the ones the
#: journal follows, and the ones a driver uses one buffer after the other,
#: each waited for (so they are polled together).
_BALLOON_ROLES = frozenset({QueueRole.INFLATE, QueueRole.DEFLATE, QueueRole.MIGRATE})

BASE_FEATURES = (
    (1 << Feature.VERSION_1)
    | (1 << Feature.RING_INDIRECT_DESC)
    | (1 << Feature.RING_EVENT_IDX)
    | (1 << Feature.MUST_TELL_HOST)
    | (1 << Feature.STATS_VQ)
    | (1 << Feature.DEFLATE_ON_OOM)
    | (1 << Feature.PAGE_POISON)
    | (1 << Feature.REPORTING)
)


@dataclass
class DeviceSettings:
    stats_interval: float = 5.0
    deflate_on_oom: bool = True
    free_page_reporting: bool = True
    migrate_extension: bool = True
    #: Discards of inflated frames wait at most this long (seconds), so those
    #: of many buffers are coalesced into few calls; 0 discards before each
    #: buffer is returned. Only when the driver negotiated MUST_TELL_HOST: it
    #: then touches a ballooned frame only after a deflate, which cancels the
    #: frame's pending discard before it is acknowledged. A driver without it
    #: may reuse a frame right after the inflate, so its discards are never
    #: deferred, whatever this says.
    discard_max_delay: float = 0.25
    #: ... and are done as soon as the inflate queue has been quiet this long.
    discard_idle: float = 0.005
    #: ... or as soon as this many frames are pending.
    discard_max_frames: int = 1 << 18

    def features(self) -> int:
        features = BASE_FEATURES
        if not self.deflate_on_oom:
            features &= ~(1 << Feature.DEFLATE_ON_OOM)
        if not self.free_page_reporting:
            features &= ~(1 << Feature.REPORTING)
        if self.migrate_extension:
            features |= 1 << Feature.BALLOOND_MIGRATE_VQ
            features |= 1 << Feature.BALLOOND_MIGRATE_SPLIT
        return features


@dataclass
class DeviceCounters:
    inflate_buffers: int = 0
    deflate_buffers: int = 0
    stats_buffers: int = 0
    report_buffers: int = 0
    migrate_buffers: int = 0
    guest_errors: int = 0
    balloon_freed_bytes: int = 0  # measured drop of allocated size from balloon discards
    reported_freed_bytes: int = 0  # same, from free page reporting
    reported_bytes: int = 0  # bytes the guest reported free
    reports_skipped_poison: int = 0
    reports_skipped_inhibit: int = 0  # reported while discards were refused
    discard_inhibits: int = 0  # times discards were refused (VFIO, migration, QMP unknown)
    discard_errors: int = 0
    discard_calls: int = 0
    #: Frames whose deferred discard a deflate (or migration) cancelled: the
    #: guest took them back before the discard was due.
    discards_cancelled: int = 0
    driver_resets: int = 0
    #: Device states handed to a migration (saved) and adopted from one (loaded).
    migrations_out: int = 0
    migrations_in: int = 0
    #: Times the whole balloon was discarded again after QEMU's migration
    #: read it back in (logging ended: a failed or cancelled migration).
    rediscards_after_migration: int = 0
    config_changes_sent: int = 0
    #: Config space reads and writes the frontend forwarded (GET_CONFIG,
    #: SET_CONFIG): a frontend that caches the config asks only after a change.
    config_reads: int = 0
    config_writes: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class StatsSample:
    values: dict[str, int] = field(default_factory=dict)
    updated_at: float | None = None  # wall-clock time of the last sample


class BalloonDevice:
    def __init__(
        self,
        settings: DeviceSettings | None = None,
        *,
        target_pages: int = 0,
        log: Any = None,
        journal: BalloonJournal | None = None,
        peer: PeerProcess | None = None,
    ) -> None:
        self.settings = settings or DeviceSettings()
        self.features = self.settings.features()
        self.log = log or structlog.get_logger()
        self.limited = RateLimited(self.log)
        self.config = BalloonConfig(num_pages=target_pages)
        self.acked = 0
        self.roles: dict[int, QueueRole] = {}
        self.memory: GuestRam | None = None
        self.tracker = PfnTracker()
        self.releaser = MemoryReleaser([])
        self.counters = DeviceCounters()
        self.stats = StatsSample()
        self.host: DeviceHost | None = None
        self.running = False
        self._config_dirty = False
        self._stats_held: tuple[Ring, int] | None = None
        self._inflate_stop_base: int | None = None  # inflate ring index reported at the last stop
        self._stats_timer: asyncio.TimerHandle | None = None
        # Frames in the balloon whose memory is not discarded yet (see _release).
        self._pending: set[int] = set()
        self._pending_since = 0.0
        self._flush_timer: asyncio.TimerHandle | None = None
        #: Why discards are refused right now (None: allowed); see set_discard_inhibit.
        self.discard_inhibit: str | None = None
        # The balloon on disk (--state-dir). Settled once, at the first start:
        # until then the rings are not looked at (see _settle_journal).
        self.journal = journal
        self.peer = peer
        self._journal_pending = journal is not None
        self._vrings: dict[int, Ring] = {}  # every ring that went live, by index
        #: Whether config.poison_val is the driver's (see _settle_journal).
        self._poison_known = True
        self._poison_written: int | None = None
        self._restored = False
        #: Discards were allowed again while stopped: the balloon is discarded at the next start.
        self._discard_at_start = False
        #: A migrated-in state whose frames wait for guest RAM to be known (set_memory).
        self._adopting: MigrationState | None = None
        #: ... and the state adopted, until the first start has journalled it.
        self._migrated_in: MigrationState | None = None
        #: Told the target, stats interval and origin a migrated-in state
        #: brought (the VM's own settings follow the VM; see VirtualMachine).
        self.on_adopted: Any = None
        #: Asked for the origin (MigrationOrigin) of a state being saved; None: the state has none.
        self.on_saving: Any = None
        #: Called when the balloon comes to rest at its target (_check_settled):
        #: a worker reports that at once rather than at its next look.
        self.on_settled: Callable[[], None] | None = None
        self.connected_at = time.time()
        # What each queue role's buffers mean; built once, looked up per kick.
        self._handlers = {
            QueueRole.INFLATE: self._inflate,
            QueueRole.DEFLATE: self._deflate,
            QueueRole.STATS: self._stats,
            QueueRole.REPORTING: self._report,
            QueueRole.MIGRATE: self._migrate,
        }

    # ================================================================ seam

    def attach(self, host: DeviceHost) -> None:
        self.host = host

    def read_config(self, offset: int, size: int) -> bytes:
        self.counters.config_reads += 1
        return self.config.read(offset, size)

    def write_config(self, offset: int, data: bytes) -> None:
        self.counters.config_writes += 1
        changed = self.config.driver_write(offset, data)
        if "actual" in changed:
            self.log.debug("guest reports balloon size", actual_pages=self.config.actual)
            self._check_settled()
        if "poison_val" in changed:
            self.log.info("guest poison value", poison_val=hex(self.config.poison_val))
        if offset <= BalloonConfig.OFFSET_POISON_VAL < offset + len(data):
            # Written by the driver once, at probe: persisted, or reported
            # free pages could be discarded after a restart. A restored device
            # trusts only a change: QEMU's writes echo its cached config.
            self._poison_written = self.config.poison_val
            if not self._journal_pending and ("poison_val" in changed or not self._restored):
                self._poison_known = True
                if self.journal is not None:
                    self.journal.poison(self.config.poison_val)

    def set_features(self, features: int) -> None:
        self.acked = features
        self.roles = dict(enumerate(vb.queue_roles(features)))
        self.log.info("balloon queues", roles={i: r.value for i, r in self.roles.items()})

    def memory_unmapping(self) -> None:
        """The mappings and fds behind guest RAM are about to go away: finish
        every pending discard while the fds still name the right files."""
        self.flush_discards()
        self.releaser = MemoryReleaser([])

    def set_memory(self, memory: GuestRam) -> None:
        self.flush_discards()
        self.memory = memory
        dropped = self.tracker.resize(memory.ram_ranges())
        if dropped:
            self.log.warning("ballooned frames left guest RAM with a memory change", frames=len(dropped))
        self.releaser = MemoryReleaser([releasable_region(r) for r in memory.regions])
        if self._adopting is not None:
            self._adopt_frames(self._adopting)
            self._adopting = None
        self._rebuild_huge_fill()

    def _rebuild_huge_fill(self) -> None:
        """Huge-page fill counts from the tracker, for the current regions."""
        for region in self.releaser.regions:
            if region.huge_fill is not None:
                for i in range(len(region.huge_fill)):
                    first = region.first_pfn + i * region.frames_per_page
                    region.huge_fill[i] = self.tracker.count_in(first, region.frames_per_page)

    def _identity(self) -> GuestIdentity | None:
        """Who the driver is now (None: the peer process is unknown)."""
        if self.peer is None or self.memory is None:
            return None
        layout = []
        for r in self.memory.regions:
            st = os.fstat(r.fd)
            layout.append((r.gpa, r.size, st.st_dev, st.st_ino, r.file_offset))
        return GuestIdentity(self.peer.pid, self.peer.start, self.peer.boot_id, self.acked, tuple(sorted(layout)))

    def _ring_positions(self) -> dict[str, int]:
        """Where the rings the journal follows are, by role."""
        out = {}
        for index, vring in self._vrings.items():
            role = self.roles.get(index)
            if role in _BALLOON_ROLES and vring.live:
                out[role.value] = vring.last_avail
        return out

    def _settle_journal(self) -> None:
        """The first start: every ring and all of guest RAM are known. Restore
        the journal's balloon only if this is the very driver instance that
        ballooned it (same QEMU process, RAM files and layout, features, and
        every ring resuming where the journal says); a reset driver or
        another QEMU may be using those frames, so then nothing is discarded
        and the journal is dropped. Until now no ring was looked at, so the
        reset check and the buffers waiting run only after this decision."""
        assert self.journal is not None
        self._journal_pending = False
        identity = self._identity()
        before = self.journal.state.identity
        same_peer = identity is not None and before is not None and (
            (before.peer_pid, before.peer_start, before.boot_id) == (identity.peer_pid, identity.peer_start, identity.boot_id))
        rings = self._ring_positions()
        adoption = self.journal.adopt(identity, rings)
        if adoption.adopted:
            self._restored = True
            self.tracker.inflate(adoption.frames)
            self.tracker.counters.inflated = 0
            # The driver wrote `actual` and poison_val to the config the
            # daemon lost; it writes them again only when they change.
            self.config.actual = len(self.tracker)
            self._poison_known = adoption.poison is not None
            self.config.poison_val = adoption.poison or 0
            # Every change the device makes on its own is announced: a
            # frontend may keep a copy of the config space and serve the
            # guest from it (config-cache=on) until told (see started()).
            self._config_dirty = True
            if "inflate" in rings:
                self._inflate_stop_base = rings["inflate"]  # a resume, not a reset
            self._rebuild_huge_fill()
            self.log.info("balloon restored from the state directory", frames=len(self.tracker),
                          poison_known=self._poison_known)
            if self.may_defer_discards and not any(r.hugetlb for r in self.releaser.regions):
                # Discards still pending at the crash were lost: do them again.
                # (Without MUST_TELL_HOST the guest may be using those frames
                # again, and its discards were never deferred: none were lost.)
                self._release(list(self.tracker))
        else:
            if adoption.dropped is not None:
                self.log.warning("state journal dropped: its frames are not restored, nothing discarded",
                                 reason=adoption.dropped)
            if self._poison_written is not None:
                self.journal.poison(self._poison_written)
            else:
                # The same QEMU whose driver probed while we were away: the
                # value it wrote then is lost.
                self._poison_known = not same_peer
        for vring in list(self._vrings.values()):
            if vring.live:
                self.queue_started(vring)

    def queue_started(self, vring: Ring) -> None:
        self._vrings[vring.index] = vring
        if self._journal_pending:
            return  # looked at once the journal is settled (started)
        role = self.roles.get(vring.index)
        if role is QueueRole.INFLATE and len(self.tracker) and self._driver_was_reset(vring.base):
            self.flush_discards()
            held = self.tracker.clear()
            if self.journal is not None:
                self.journal.cleared()
            self._reset_huge_fill()
            self.counters.driver_resets += 1
            self.log.info("driver restarted its inflate queue: balloon emptied", frames=held)
        self.queue_kicked(vring)

    def queue_kicked(self, vring: Ring) -> None:
        role = self.roles.get(vring.index)
        if role is None or not vring.live or self.memory is None or self._journal_pending:
            return
        handler = self._handlers.get(role, self._drain_unused)
        consumed_from = vring.last_avail
        chains = self._pop_all(vring)
        if chains:
            handler(vring, chains)
        if vring.last_avail != consumed_from:
            # Also when every chain was bad and returned empty: the driver
            # must be told, or it waits for ever. (Asking for the next kick
            # is the engine's part: it knows whether it will poll.)
            vring.notify()

    def poll_partners(self, index: int) -> tuple[int, ...]:
        """A stock driver moves a page with an inflate then a deflate, each
        waited for, and its inflate and deflate buffers come one at a time:
        those rings (and our migrate queue) are polled together. Stats and
        reports come on their own."""
        if self.roles.get(index) not in _BALLOON_ROLES:
            return ()
        return tuple(i for i, role in self.roles.items() if role in _BALLOON_ROLES and i != index)

    def _driver_was_reset(self, base: int) -> bool:
        """A resumed ring continues from the index the device reported at its
        stop; a reset driver starts again from 0. (An index that wrapped to
        exactly 0 resumes with the 0 that was reported, so it is no reset.)"""
        if self._inflate_stop_base is None:
            return base == 0
        return base != self._inflate_stop_base

    def queue_stopped(self, vring: Ring) -> int:
        if self.roles.get(vring.index) is QueueRole.INFLATE and vring.live:
            self._inflate_stop_base = vring.last_avail
        if self._stats_held is not None and self._stats_held[0] is vring:
            self._stats_held = None
            return 1
        return 0

    def started(self) -> None:
        self.running = True
        if self._journal_pending:
            self._settle_journal()
            if self._migrated_in is not None:
                self._journal_migrated_in(self._migrated_in)
        elif self.journal is not None:
            self.journal.started(self._identity(), self._ring_positions())
        self._migrated_in = None
        if self._discard_at_start and self.discard_inhibit is None:
            self._discard_at_start = False
            self._discard_balloon()
        self._arm_stats_timer()
        if self._config_dirty:
            self._send_config_change()

    def stopped(self) -> None:
        self.running = False
        self.flush_discards()
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None

    def disconnected(self) -> None:
        self.stopped()
        self.memory_unmapping()
        self._stats_held = None
        self.memory = None
        self.releaser = MemoryReleaser([])

    # =========================================================== migration

    def save_state(self) -> bytes:
        """The device's state for a migrating VM (the device is stopped:
        QEMU asks once the rings are down, and pending discards were done
        at the stop)."""
        self.flush_discards()
        state = MigrationState(
            features=self.acked,
            config=BalloonConfig(self.config.num_pages, self.config.actual, self.config.free_page_hint_cmd_id,
                                 self.config.poison_val),
            stats_interval=self.settings.stats_interval,
            inflate_base=self._inflate_stop_base,
            poison_known=self._poison_known,
            guest_ram_bytes=self.memory.total_bytes if self.memory is not None else 0,
            runs=tuple(self.tracker.runs()),
            origin=self.on_saving() if self.on_saving is not None else None,
        )
        self.counters.migrations_out += 1
        self.log.info("device state saved for migration", frames=state.frames, runs=len(state.runs),
                      migration_id=state.origin.id if state.origin is not None else None)
        return state.encode()

    def load_state(self, data: bytes) -> None:
        """Adopt a migrated-in state (raises ValueError to refuse it; the
        migration then fails and the source goes on). The destination's
        QEMU has not started the device: guest RAM comes with the start, and
        the frames are checked against it then (`_adopt_frames`)."""
        state = MigrationState.decode(data)
        if state.features & ~self.features:
            raise ValueError(f"the driver acknowledged features {state.features & ~self.features:#x} "
                             "this daemon does not offer")
        if self.running:
            raise ValueError("the device is running")
        self.config.num_pages = state.config.num_pages
        self.config.actual = state.config.actual
        self.config.poison_val = state.config.poison_val
        self._poison_known = state.poison_known
        self._poison_written = None
        self._inflate_stop_base = state.inflate_base
        self.settings.stats_interval = state.stats_interval
        self._config_dirty = True  # announced at the start: a frontend may cache the config
        self.tracker.clear()
        self._pending = set()
        self._adopting = state
        self._migrated_in = state
        if self.memory is not None:
            self._adopt_frames(state)
            self._adopting = None
        self.counters.migrations_in += 1
        origin = state.origin
        self.log.info("device state adopted from a migration", frames=state.frames, runs=len(state.runs),
                      target_pages=state.config.num_pages, migration_id=origin.id if origin else None,
                      source_vm=origin.vm if origin else None, source_host=origin.host if origin else None)
        if self.on_adopted is not None:
            self.on_adopted(state.config.num_pages, state.stats_interval, origin)

    def _adopt_frames(self, state: MigrationState) -> None:
        """Track the frames ballooned on the source. They reached this side
        as zero pages, which QEMU's loading allocated here like any other
        page of a shared memory file: the balloon is discarded again at the
        start (the RAM has all arrived by then; docs/migration.md)."""
        assert self.memory is not None
        ram = self.memory.ram_ranges()
        for first, count in state.runs:
            if not any(start <= first and first + count <= start + n for start, n in ram):
                self.log.error("migrated-in balloon lies outside guest RAM: not adopted, nothing discarded",
                               run=(first, count))
                return
        frames = [pfn for first, count in state.runs for pfn in range(first, first + count)]
        self.tracker.inflate(frames)
        self.tracker.counters.inflated = 0
        self._discard_at_start = True

    def _journal_migrated_in(self, state: MigrationState) -> None:
        """With --state-dir: the journal, just started afresh for this QEMU
        (a migration's destination is a new driver instance to it), gets the
        adopted balloon as one batch at the inflate ring's current index, so
        a daemon restarted from here on restores it like any other."""
        assert self.journal is not None
        self._poison_known = state.poison_known  # settling judged a driver it never saw probe
        rings = self._ring_positions()
        if "inflate" in rings and len(self.tracker):
            self.journal.inflated(list(self.tracker), rings["inflate"])
        if self._poison_known:
            self.journal.poison(self.config.poison_val)
        self.journal.target(self.config.num_pages)

    def logging_changed(self, on: bool) -> None:
        """The frontend's dirty logging ended: its migration is over. Reading
        RAM for it allocated every ballooned page again (a hole in a shared
        memory file reads as a new zero page); if the VM stays here (a failed
        or cancelled migration) the balloon is discarded again, under the
        rules of any discard (`_discard_balloon`)."""
        if on:
            return
        self.counters.rediscards_after_migration += 1
        if self.discard_inhibit is not None:
            return  # discarded when allowed again
        if not self.running:
            self._discard_at_start = True
            return
        self._discard_balloon()

    # ============================================================= control

    @property
    def target_pages(self) -> int:
        return self.config.num_pages

    def set_target(self, pages: int) -> None:
        """Ask the guest for a balloon of `pages` 4 KiB frames."""
        if pages == self.config.num_pages:
            return
        self.config.num_pages = pages
        self._send_config_change()

    def set_discard_inhibit(self, reason: str | None) -> None:
        """Refuse (reason) or allow (None) discarding guest memory.

        While refused, inflates and migrations are still acknowledged and
        tracked; nothing is freed, and reported free pages are left alone.
        Discards that were waiting are dropped, not done: the reason may be
        a device that has just pinned guest memory. When discards are allowed
        again every frame in the balloon is discarded: which of them were
        freed before is not worth remembering, punching a hole twice is
        harmless. Not for a driver without MUST_TELL_HOST, which may be using
        those frames again: its frames ballooned while refused stay allocated.
        """
        if reason == self.discard_inhibit:
            return
        was, self.discard_inhibit = self.discard_inhibit, reason
        if reason is not None:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
            if was is None:
                self.counters.discard_inhibits += 1
                self.log.warning("discards refused", reason=reason, dropped_frames=len(self._pending),
                                 ballooned_frames=len(self.tracker))
            self._pending = set()
            return
        self.log.info("discards allowed again", ballooned_frames=len(self.tracker))
        if not self.running:
            # Stopped: the driver may be resetting, and a reset driver reuses
            # its frames. The next start's reset check tells; discard then.
            self._discard_at_start = True
            return
        self._discard_balloon()

    def _discard_balloon(self) -> None:
        """Discard every frame in the balloon (the device is running, and the
        journal, if any, is settled)."""
        if not self.may_defer_discards:
            # A driver without MUST_TELL_HOST may already have reused frames
            # it ballooned while discards were refused: only the moment
            # before an inflate is acknowledged is safe, and it has passed.
            return
        if len(self.tracker) and self.memory is not None:
            self._reset_huge_fill()  # the release below counts every frame again
            self._release(list(self.tracker))

    def set_stats_interval(self, seconds: float) -> None:
        self.settings.stats_interval = seconds
        if self.running:
            self._arm_stats_timer()

    def _send_config_change(self) -> None:
        if self.host is not None and self.host.config_changed():
            self._config_dirty = False
            self.counters.config_changes_sent += 1
        else:
            # Told at the next start; before the first start the driver
            # reads num_pages at probe anyway.
            self._config_dirty = True

    # =========================================================== the queues

    def _pop_all(self, vring: Ring) -> list[Chain]:
        """The chains available now, within one pass's budget (the ring's
        `pop_chains`); a bad chain is counted and comes back empty."""
        assert self.memory is not None
        return vring.pop_chains(self.memory, lambda exc: self._guest_error(vring, exc))

    def _guest_error(self, vring: Ring, exc: ProtocolError) -> None:
        self.counters.guest_errors += 1
        vring.counters.guest_errors += 1
        role = self.roles.get(vring.index)
        self.limited.warning("bad buffer from guest", queue=role.value if role else vring.index, reason=str(exc))

    def _read(self, vring: Ring, chain: Chain) -> bytes | None:
        assert self.memory is not None
        size = sum(seg.length for seg in chain.segments if not seg.writable)
        if size > MAX_BUFFER_BYTES:
            # Refused whole: a cut-off prefix could pass as a valid buffer.
            self._guest_error(vring, GuestError(f"buffer of {size} bytes exceeds {MAX_BUFFER_BYTES}"))
            return None
        try:
            return chain.read_bytes(self.memory, MAX_BUFFER_BYTES)
        except ProtocolError as exc:
            self._guest_error(vring, exc)
            return None

    def _pfns_of(self, vring: Ring, chains: list[Chain]) -> list[int]:
        pfns: list[int] = []
        for chain in chains:
            data = self._read(vring, chain)
            if data is None:
                continue
            try:
                pfns.extend(vb.decode_pfns(data))
            except GuestError as exc:
                self._guest_error(vring, exc)
        return pfns

    def _return(self, vring: Ring, chains: list[Chain]) -> None:
        assert vring.live
        for chain in chains:
            vring.push(chain.head, 0)

    def _inflate(self, vring: Ring, chains: list[Chain]) -> None:
        self.counters.inflate_buffers += len(chains)
        pfns = self._pfns_of(vring, chains)
        before = self.tracker.counters.invalid_pfn, self.tracker.counters.double_inflate
        added = self.tracker.inflate(pfns)
        self._report_refusals(before, "inflate")
        if self.journal is not None:
            assert vring.live
            self.journal.inflated(added, vring.last_avail)
        self._release(added)
        self._return(vring, chains)

    def _deflate(self, vring: Ring, chains: list[Chain]) -> None:
        self.counters.deflate_buffers += len(chains)
        pfns = self._pfns_of(vring, chains)
        before = self.tracker.counters.invalid_pfn, self.tracker.counters.stray_deflate
        removed = self.tracker.deflate(pfns)
        self._report_refusals(before, "deflate")
        if self.journal is not None:
            assert vring.live
            self.journal.deflated(removed, vring.last_avail)
        self._forget(removed)
        self._return(vring, chains)

    def _report_refusals(self, before: tuple[int, int], op: str) -> None:
        c = self.tracker.counters
        invalid = c.invalid_pfn - before[0]
        repeated = (c.double_inflate if op == "inflate" else c.stray_deflate) - before[1]
        if invalid:
            self.limited.warning(f"{op}: frames outside guest RAM ignored", frames=invalid)
        if repeated:
            what = "already ballooned" if op == "inflate" else "not in the balloon"
            self.limited.warning(f"{op}: frames {what} ignored", frames=repeated)

    def _release(self, pfns: list[int]) -> None:
        """Frames entered the balloon: discard their memory, now or soon.

        Deferring is safe only with MUST_TELL_HOST: the driver then may not
        touch a frame it gave to the balloon until a deflate hands it back,
        and a deflate cancels the frame's pending discard (`_forget`) before
        it is acknowledged. Without it the spec lets the driver reuse the
        frame as soon as the inflate is acknowledged, with no deflate to
        cancel anything: a discard still pending then would zero the data the
        guest wrote. So the discard is done now, before the buffer is returned.
        """
        if not pfns or self.discard_inhibit is not None:
            return  # refused: all of the balloon is released when discards are allowed again
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.update(pfns)
        delay = self.settings.discard_max_delay if self.may_defer_discards else 0.0
        if delay <= 0 or len(self._pending) >= self.settings.discard_max_frames:
            self.flush_discards()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush_discards()
            return
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        now = loop.time()
        oldest = now - (time.monotonic() - self._pending_since)
        self._flush_timer = loop.call_at(min(now + self.settings.discard_idle, oldest + delay), self.flush_discards)

    @property
    def may_defer_discards(self) -> bool:
        """Whether the negotiated features let discards wait (see `_release`)."""
        return vb.has(self.acked, Feature.MUST_TELL_HOST)

    def _forget(self, pfns: list[int]) -> None:
        """Frames left the balloon: cancel pending discards, update huge-page counts."""
        if not pfns:
            return
        if self._pending:
            discarded = [p for p in pfns if p not in self._pending]
            self._pending.difference_update(pfns)
            self.counters.discards_cancelled += len(pfns) - len(discarded)
        else:
            discarded = pfns
        if self.releaser.has_hugetlb:
            self.releaser.frames_returned(discarded)

    def flush_discards(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._pending:
            return
        pfns, self._pending = self._pending, set()
        # Bridging runs over frames already in the balloon punches them again:
        # harmless only if the guest cannot be using them (MUST_TELL_HOST).
        bridge = self.tracker.covers if self.may_defer_discards else None
        result = self.releaser.release_frames(pfns, bridge)
        self.counters.balloon_freed_bytes += result.freed_bytes
        self.counters.discard_calls += result.calls
        if result.errors:
            self.counters.discard_errors += result.errors
            self.limited.warning("discard failed", error=self.releaser.last_error)
        self._check_settled()

    def _check_settled(self) -> None:
        """Tell `on_settled` when the balloon has come to rest: the guest
        says it holds the target and no discard is waiting. Checked where
        either can become true (the guest's write of `actual`, a flush)."""
        if self.on_settled is not None and self.config.actual == self.config.num_pages and not self._pending:
            self.on_settled()

    def _migrate(self, vring: Ring, chains: list[Chain]) -> None:
        """Migration records, whole or (with BALLOOND_F_MIGRATE_SPLIT) split.

        A departure takes its frame out of the balloon and, like a deflate,
        cancels the frame's pending discard before the buffer is returned:
        the driver frees the page as soon as it has the buffer back. An
        arrival or a return puts a frame in, to be discarded like an inflated
        one. The split forms are refused from a driver that did not
        negotiate them (they name no frame, so they would be refused anyway).
        """
        self.counters.migrate_buffers += len(chains)
        split = vb.has(self.acked, Feature.BALLOOND_MIGRATE_SPLIT)
        moves: list[tuple[int, int]] = []  # (left, entered); NONE for a half
        was: dict[int, bool] = {}  # in the balloon before this batch? (every frame moved)
        for chain in chains:
            data = self._read(vring, chain)
            if data is None:
                continue
            try:
                records = ext.decode_migrations(data)
            except GuestError as exc:
                self._guest_error(vring, exc)
                continue
            for record in records:
                kind = record.kind
                if kind == "move":
                    done = self.tracker.migrate(record.old_pfn, record.new_pfn)
                elif not split or kind == "invalid":
                    self.tracker.counters.bad_migration += 1
                    done = False
                elif kind == "depart":
                    done = self.tracker.depart(record.old_pfn)
                else:
                    done = self.tracker.arrive(record.new_pfn, moved=kind == "arrive")
                if not done:
                    self.limited.warning("migration refused", kind=kind, old_pfn=record.old_pfn,
                                         new_pfn=record.new_pfn)
                    continue
                left = record.old_pfn if kind in ("move", "depart") else ext.PFN_NONE
                entered = record.new_pfn if kind != "depart" else ext.PFN_NONE
                moves.append((left, entered))
                if left != ext.PFN_NONE:
                    was.setdefault(left, True)
                if entered != ext.PFN_NONE:
                    was.setdefault(entered, False)
        if self.journal is not None:
            assert vring.live
            self.journal.migrated(moves, vring.last_avail)
        # Only the batch's net effect: a frame that came in and went out again
        # (a->b, then b->c) is the guest's once more and must not be
        # discarded, nor counted as returned (found by fuzzing).
        self._forget([pfn for pfn, before in was.items() if before and pfn not in self.tracker])
        self._release([pfn for pfn, before in was.items() if not before and pfn in self.tracker])
        self._return(vring, chains)

    def _report(self, vring: Ring, chains: list[Chain]) -> None:
        self.counters.report_buffers += len(chains)
        # A poison value not known (lost with a restart) may be non-zero.
        poisoned = vb.has(self.acked, Feature.PAGE_POISON) and (self.config.poison_val != 0 or not self._poison_known)
        for chain in chains:
            for seg in chain.segments:
                self.counters.reported_bytes += seg.length
                if poisoned:
                    self.counters.reports_skipped_poison += 1
                    continue
                if self.discard_inhibit is not None:
                    self.counters.reports_skipped_inhibit += 1
                    continue
                try:
                    assert self.memory is not None
                    self.memory.view(seg.addr, seg.length)  # bounds check
                except ProtocolError as exc:
                    self._guest_error(vring, exc)
                    continue
                result = self.releaser.release_free_range(seg.addr, seg.length)
                self.counters.reported_freed_bytes += result.freed_bytes
                self.counters.discard_errors += result.errors
        self._return(vring, chains)

    def _stats(self, vring: Ring, chains: list[Chain]) -> None:
        assert vring.live
        for chain in chains:
            self.counters.stats_buffers += 1
            data = self._read(vring, chain)
            if data is not None:
                try:
                    values = vb.decode_stats(data)
                except GuestError as exc:
                    self._guest_error(vring, exc)
                else:
                    self.stats = StatsSample(values, time.time())
            if self._stats_held is not None:
                # The driver keeps one buffer in flight; hand back an older one.
                vring.push(self._stats_held[1], 0)
            self._stats_held = (vring, chain.head)

    def _request_stats(self) -> None:
        self._stats_timer = None
        held = self._stats_held
        if held is not None and self.running:
            vring, head = held
            if vring.live:
                self._stats_held = None
                vring.push(head, 0)
                vring.notify()
        self._arm_stats_timer()

    def _arm_stats_timer(self) -> None:
        if self._stats_timer is not None:
            self._stats_timer.cancel()
            self._stats_timer = None
        if not self.running or self.settings.stats_interval <= 0 or not vb.has(self.acked, Feature.STATS_VQ):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._stats_timer = loop.call_later(self.settings.stats_interval, self._request_stats)

    def _drain_unused(self, vring: Ring, chains: list[Chain]) -> None:
        """Buffers on a queue we do not implement (free page hints) go back unused."""
        self._return(vring, chains)

    def _reset_huge_fill(self) -> None:
        for region in self.releaser.regions:
            if region.huge_fill is not None:
                region.huge_fill = [0] * len(region.huge_fill)

    # ============================================================ reporting

    def snapshot(self) -> DeviceStatus:
        """The device's numbers for the VM's status (typed: see balloond/status.py)."""
        memory = self.memory
        return DeviceStatus(
            features=vb.feature_names(self.acked),
            guest_ram_bytes=memory.total_bytes if memory else 0,
            target_bytes=self.config.num_pages * vb.PAGE_SIZE,
            actual_bytes=self.config.actual * vb.PAGE_SIZE,
            ballooned_bytes=len(self.tracker) * vb.PAGE_SIZE,
            host_freed_bytes=self.counters.balloon_freed_bytes,
            reported_freed_bytes=self.counters.reported_freed_bytes,
            resident_bytes=self.releaser.allocated_bytes() if memory else 0,
            pending_discard_bytes=len(self._pending) * vb.PAGE_SIZE,
            discard_inhibited=self.discard_inhibit,
            stats=dict(self.stats.values),
            stats_updated_at=self.stats.updated_at,
            migrations=self.tracker.counters.migrations,
            running=self.running,
            counters={**self.counters.as_dict(), **self.tracker.counters.as_dict()},
        )
