"""MemoryReleaser on real memfds: punching frees exactly what it should."""

import mmap
import os

import pytest

from balloond.device.releaser import MemoryReleaser, ReleasableRegion, coalesce

PAGE = 4096


def test_coalesce():
    assert coalesce([5, 3, 4, 9, 10, 3]) == [(3, 3), (9, 2)]
    assert coalesce([]) == []


@pytest.fixture
def guest():
    """16 MiB memfd, fully dirtied, as two regions like q35's low RAM split."""
    size = 16 << 20
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    for off in range(0, size, PAGE):
        m[off] = 0xAB
    low = ReleasableRegion(0, 0xA0000, fd, 0, m, 0)
    high = ReleasableRegion(0xC0000, size - 0xC0000, fd, 0xC0000, m, 0xC0000)
    yield fd, m, MemoryReleaser([low, high])
    m.close()
    os.close(fd)


def allocated(fd):
    return os.fstat(fd).st_blocks * 512


def test_release_frees_exactly_the_frames_and_measures_it(guest):
    fd, m, rel = guest
    before = allocated(fd)
    pfns = list(range(0x100, 0x200)) + [0x300, 0x302, 0x10]  # 256 contiguous + 3 scattered
    result = rel.release_frames(pfns)
    assert result.freed_bytes == before - allocated(fd) == len(pfns) * PAGE
    assert result.calls == 4  # one run and three single frames
    for pfn in pfns:
        assert m[pfn * PAGE] == 0
    assert m[0x301 * PAGE] == 0xAB and m[0x200 * PAGE] == 0xAB and m[0x11 * PAGE] == 0xAB


def test_frames_in_the_hole_are_ignored(guest):
    fd, m, rel = guest
    result = rel.release_frames([0xA0, 0xB0])  # 640..768 KiB: not RAM
    assert result.calls == 0 and result.freed_bytes == 0


def test_free_range_is_page_aligned_inward(guest):
    fd, m, rel = guest
    before = allocated(fd)
    result = rel.release_free_range(0x200000 + 100, 4 * PAGE)
    assert result.freed_bytes == before - allocated(fd) == 3 * PAGE


def test_madvise_remove_fallback(guest):
    fd, m, rel = guest
    for r in rel.regions:
        r.punch_supported = False
    before = allocated(fd)
    rel.release_frames([0x400, 0x401])
    assert before - allocated(fd) == 2 * PAGE
    assert m[0x400 * PAGE] == 0


class _FakeHugeRegion(ReleasableRegion):
    """A 4 KiB memfd region told it has 64 KiB pages, to test the counting."""

    def __init__(self, *args):
        super().__init__(*args)
        self.page_size = 16 * PAGE
        self.frames_per_page = 16
        self.huge_fill = [0] * (self.size // self.page_size)


def test_huge_pages_are_punched_only_when_full(guest):
    fd, m, _ = guest
    region = _FakeHugeRegion(0, 1 << 20, fd, 0, m, 0)
    rel = MemoryReleaser([region])
    assert rel.release_frames(range(0, 15)).calls == 0  # 15 of 16
    assert m[0] == 0xAB
    r = rel.release_frames([15])
    assert r.calls == 1 and r.requested_bytes == 16 * PAGE
    assert m[0] == 0 and m[15 * PAGE] == 0
    rel.frames_returned([3])
    assert region.huge_fill[0] == 15
    assert rel.release_frames([3]).calls == 1  # full again
    # a reported free range covers only whole huge pages
    r = rel.release_free_range(16 * PAGE + PAGE, 40 * PAGE)
    assert r.requested_bytes == 16 * PAGE  # [32, 48) pages is the only whole one


def _hugetlb_memfd(pages):
    try:
        fd = os.memfd_create("huge", os.MFD_HUGETLB | (21 << os.MFD_HUGE_SHIFT))
        os.ftruncate(fd, pages << 21)
        return fd
    except OSError:
        return None


def test_real_hugetlbfs_punches_whole_huge_pages():
    wanted = 4
    path = "/proc/sys/vm/nr_hugepages"
    old = int(open(path).read())
    if old < wanted and os.geteuid() == 0:
        with open(path, "w") as f:
            f.write(str(old + wanted))
    fd = _hugetlb_memfd(wanted)
    if fd is None:
        pytest.skip("no 2 MiB huge pages available (run as root)")  # a failure under CI (tests/conftest.py)
    try:
        size = wanted << 21
        m = mmap.mmap(fd, size)
        for off in range(0, size, 1 << 21):
            m[off] = 1
        region = ReleasableRegion(0, size, fd, 0, m, 0)
        assert region.hugetlb and region.frames_per_page == 512
        rel = MemoryReleaser([region])
        before = allocated(fd)
        r = rel.release_frames(range(0, 511))
        assert r.calls == 0 and allocated(fd) == before
        r = rel.release_frames([511])
        assert r.freed_bytes == 1 << 21
        m.close()
    finally:
        os.close(fd)
        if old < wanted and os.geteuid() == 0:
            with open(path, "w") as f:
                f.write(str(old))
