"""Guest RAM on hugetlbfs (2 MiB pages): memory comes back only when every
4 KiB frame of a huge page is ballooned, or a report covers it whole.

Needs free 2 MiB huge pages (e.g. `echo 64 > /proc/sys/vm/nr_hugepages`);
skipped otherwise. The layouts are huge-page aligned, as QEMU makes them for
hugepage-backed RAM (vhost_region_add_section rounds sections out to the
page size, which merges the x86 low regions into one region at 0).
"""

from __future__ import annotations


import pytest

from tests.frontend import GuestRam, RamRegion
from tests.daemon.conftest import ENGINES

#: Device behaviour: the same tests on both vhost-user engines.
DAEMON_ENGINES = ENGINES

HUGE = 2 << 20
FRAMES = HUGE >> 12


def free_huge_pages() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("HugePages_Free:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


NEEDED = 24


@pytest.fixture(scope="module", autouse=True)
def huge_pages():
    """Reserve the huge pages these tests need (as root), and give them back.

    Without them the tests are skipped on a developer's machine, but fail
    under CI, where a skip would hide that they never ran."""
    path = "/proc/sys/vm/nr_hugepages"
    with open(path) as f:
        before = int(f.read())
    added = 0
    if free_huge_pages() < NEEDED:
        try:
            with open(path, "w") as f:
                f.write(str(before + NEEDED - free_huge_pages()))
            added = 1
        except OSError:
            pass
    if free_huge_pages() < NEEDED:
        reason = f"needs {NEEDED} free 2 MiB huge pages (run as root, or echo 64 > {path})"
        pytest.skip(reason)  # a failure under CI (tests/conftest.py)
    yield
    if added:
        with open(path, "w") as f:
            f.write(str(before))

LAYOUTS = {
    "single": "single",
    "two-aligned": [RamRegion(0, 16 << 20, 0), RamRegion(1 << 32, 16 << 20, 16 << 20)],
}


@pytest.fixture(params=list(LAYOUTS))
def huge_ram(request):
    ram = GuestRam(32 << 20, LAYOUTS[request.param], hugetlb=True)
    yield ram
    ram.close()


def test_huge_page_freed_only_when_full(daemon, connect, settled, huge_ram):
    ram = huge_ram
    fe = connect(ram=ram)
    first = ram.regions[-1].gpa >> 12  # the last region: above 4 GiB in one layout
    base = first + 2 * FRAMES  # its third huge page
    ram.fill(range(base, base + 2 * FRAMES), seed=1)
    before = ram.allocated_bytes()
    fe.inflate(range(base, base + FRAMES - 1))
    settled()
    assert ram.allocated_bytes() == before  # a partly ballooned huge page stays
    assert ram.damaged(range(base + FRAMES - 1, base + 2 * FRAMES), seed=1) == []
    fe.inflate([base + FRAMES - 1])
    state = settled()
    assert before - ram.allocated_bytes() == HUGE
    assert state["ballooned_bytes"] == HUGE and state["host_freed_bytes"] == HUGE
    assert ram.damaged(range(base + FRAMES, base + 2 * FRAMES), seed=1) == []
    # The guest takes one frame back and uses it (a new huge page), then
    # returns it: the page is full again and freed again.
    fe.deflate([base])
    ram.fill([base], seed=2)
    assert ram.damaged([base], seed=2) == []
    fe.inflate([base])
    assert settled()["host_freed_bytes"] == 2 * HUGE
    assert before - ram.allocated_bytes() == HUGE


def test_reports_free_whole_huge_pages_only(daemon, connect, huge_ram):
    ram = huge_ram
    fe = connect(ram=ram)
    base = (ram.regions[-1].gpa >> 12) + 4 * FRAMES
    ram.fill(range(base, base + 3 * FRAMES), seed=3)
    before = ram.allocated_bytes()
    fe.report_free([((base << 12) + HUGE // 2, HUGE)])  # two halves: nothing whole
    assert ram.allocated_bytes() == before
    assert ram.damaged(range(base, base + 3 * FRAMES), seed=3) == []
    fe.report_free([((base << 12) + HUGE // 2, 2 * HUGE)])  # covers the second page whole
    assert before - ram.allocated_bytes() == HUGE
    assert ram.damaged(range(base, base + FRAMES), seed=3) == []
    assert ram.damaged(range(base + 2 * FRAMES, base + 3 * FRAMES), seed=3) == []


def test_balloon_survives_restart_on_huge_pages(daemon, connect, settled, huge_ram):
    ram = huge_ram
    fe = connect(ram=ram)
    base = (ram.regions[-1].gpa >> 12) + 6 * FRAMES
    ram.touch(range(base, base + FRAMES))
    fe.inflate(range(base, base + FRAMES // 2))
    fe.restart()  # the fill counts must be rebuilt from the tracker
    before = ram.allocated_bytes()
    fe.inflate(range(base + FRAMES // 2, base + FRAMES))
    settled()
    assert before - ram.allocated_bytes() == HUGE
