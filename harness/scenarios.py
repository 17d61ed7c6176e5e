"""Guest-side scenarios shared by the real-VM tests and the benchmarks.

Why one place: a figure a benchmark prints and the bound a test asserts are
only comparable when both ran the very same commands in the guest.  The
commands are plain shell for the guest's busybox, so any driver (Linux's
stock ``virtio_balloon`` or ours) and any balloon device can be put through
them; the caller says how to set the balloon and how to count migrations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .vm import Vm

MIB = 1 << 20

#: The balloon the compaction scenario inflates on an idle guest, in MiB.
COMPACTION_BALLOON_MIB = 128

#: Fragment the guest's movable memory after the balloon is full: 300 files
#: of 128 KiB in a tmpfs, then every other one deleted.  Compaction only
#: moves pages into free holes of pageblocks that are partly in use (a free
#: pageblock is not a migration target), so without these holes it has
#: nowhere to put what it scans.
FRAGMENT = (
    "mkdir -p /mnt/frag && mount -t tmpfs tmpfs /mnt/frag && "
    "i=0; while [ $i -lt 300 ]; do dd if=/dev/zero of=/mnt/frag/f$i bs=128k count=1 2>/dev/null; "
    "i=$((i+1)); done; "
    "i=0; while [ $i -lt 300 ]; do rm /mnt/frag/f$i; i=$((i+2)); done; sync"
)

#: Full compaction of every zone (order -1: runs until the scanners meet).
COMPACT = "echo 1 > /proc/sys/vm/compact_memory"
COMPACT_ROUNDS = 4


@dataclass(frozen=True)
class CompactionRun:
    """What one run of the scenario measured."""

    migrated: int  # balloon pages migrated during the compactions
    compact_seconds: float  # wall time of the COMPACT_ROUNDS compactions
    percpu_after_fragment: int  # free pages on per-CPU lists right after FRAGMENT
    percpu_at_compaction: int  # ... when the compactions started
    migrate_failed: int  # /proc/vmstat pgmigrate_fail across the compactions: pages
    #                      the kernel gave up moving, balloon pages or not

    @property
    def per_second(self) -> float:
        return self.migrated / self.compact_seconds if self.compact_seconds else 0.0


def vmstat(vm: Vm, key: str) -> int:
    """One counter of the guest's /proc/vmstat (0 when the kernel lacks it)."""
    for line in vm.sh("cat /proc/vmstat").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def balloon_migrate(vm: Vm) -> int:
    """``balloon_migrate``: counted by the stock driver's hook and by ours."""
    return vmstat(vm, "balloon_migrate")


def percpu_lists(vm: Vm) -> tuple[int, int]:
    """The guest's per-CPU free lists, all zones: the pages on them and the
    sum of their limits (``count:`` and ``high:`` of the pagesets in
    /proc/zoneinfo)."""
    count = high = 0
    for line in vm.sh("grep -E '^ +(count|high): ' /proc/zoneinfo").splitlines():
        name, value = line.split()
        if name == "count:":
            count += int(value)
        else:
            high += int(value)
    return count, high


def settle_percpu_lists(vm: Vm, rounds: int = 200) -> int:
    """Let the per-CPU free lists give their pages back; return what is left.

    Pages a task frees go to a per-CPU list first, and compaction's free
    scanner takes only pages in the buddy allocator, so holes still sitting
    on those lists are no place to migrate to.  6.12 raises a list's limit
    while a task frees fast and lowers it again by about an eighth at each
    vmstat refresh, freeing what is above it: right after FRAGMENT a
    512 MiB 6.12 guest held about 5300 free pages there, and a compaction
    started at once moved anything between 0 and 4879 balloon pages,
    whichever the driver, by the timing alone.  The refresh normally runs
    about once a second, when the idle guest gets to it;
    /proc/sys/vm/stat_refresh runs it on every CPU at once, so this refreshes
    until neither the pages nor the limits fall any more (three times in a
    row; the limit may have to come down a few times before the first page
    is freed).  6.12 went from about 5300 pages to about 760 that way; 6.1
    keeps no such backlog (72 pages right after FRAGMENT)."""
    last = percpu_lists(vm)
    steady = 0
    for _ in range(rounds):
        if steady >= 3:
            break
        vm.sh("echo 1 > /proc/sys/vm/stat_refresh 2>/dev/null; true")
        now = percpu_lists(vm)
        steady = steady + 1 if now[0] >= last[0] and now[1] >= last[1] else 0
        last = now
    return last[0]


def compaction_after_idle_inflate(
    vm: Vm,
    set_balloon: Callable[[int], None],
    reached: Callable[[int], bool],
    migrated: Callable[[], int] | None = None,
    timeout: float = 600.0,
    settle: bool = True,
) -> CompactionRun:
    """The scenario where compaction has to move balloon pages it finds:
    inflate COMPACTION_BALLOON_MIB on an idle guest, wait until ``reached``,
    FRAGMENT, let the per-CPU free lists settle (``settle``; see
    settle_percpu_lists), then COMPACT_ROUNDS full compactions.  ``migrated`` counts
    balloon pages moved so far (default: /proc/vmstat ``balloon_migrate``);
    the difference across the compactions is returned."""
    count = migrated or (lambda: balloon_migrate(vm))
    target = COMPACTION_BALLOON_MIB * MIB
    set_balloon(target)
    t0 = time.monotonic()
    while not reached(target):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"the balloon did not reach {COMPACTION_BALLOON_MIB} MiB in {timeout:.0f} s")
        time.sleep(0.05)
    vm.sh(FRAGMENT, timeout=timeout)
    percpu_after_fragment = percpu_lists(vm)[0]
    percpu_at_compaction = settle_percpu_lists(vm) if settle else percpu_after_fragment
    before = count()
    failed_before = vmstat(vm, "pgmigrate_fail")
    t0 = time.monotonic()
    for _ in range(COMPACT_ROUNDS):
        vm.sh(COMPACT, timeout=timeout)
    seconds = time.monotonic() - t0
    return CompactionRun(migrated=count() - before, compact_seconds=seconds,
                         percpu_after_fragment=percpu_after_fragment, percpu_at_compaction=percpu_at_compaction,
                         migrate_failed=vmstat(vm, "pgmigrate_fail") - failed_before)
