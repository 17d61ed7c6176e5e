"""The engine's migration pieces: the dirty log (balloond/engine/dirty_log.py),
used-ring write logging (Vring/SplitQueue) and the state pipe
(balloond/engine/device_state.py)."""

from __future__ import annotations

import asyncio
import mmap
import os
import tempfile

import pytest

from balloond.engine.device_state import StateTransfer
from balloond.engine.dirty_log import MAX_LOG_BYTES, DirtyLog
from balloond.engine.memory import GuestMemory
from balloond.engine.vring import Vring
from protocol.errors import FrontendError
from protocol.vhost_user import VRING_ADDR_F_LOG, MemoryRegion, VringAddr
from protocol.virtqueue import used_ring_size


def log_memfd(size: int, seals: int = 0) -> tuple[int, mmap.mmap]:
    """A log as QEMU makes it, and the frontend's own view of it."""
    fd = os.memfd_create("vhost-log", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    view = mmap.mmap(fd, size)
    if seals:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd, view


def test_marks_set_one_bit_per_page_and_keep_the_others():
    fd, view = log_memfd(4096)
    view[0] = 0b0000_0010  # another device's bit
    log = DirtyLog(os.dup(fd), 4096, 0)
    log.mark(0x5000, 0x2001)  # pages 5, 6, 7
    log.mark(0x21000, 1)  # page 33: byte 4, bit 1
    assert view[0] == 0b1110_0010
    assert view[4] == 0b0000_0010
    assert log.pages_marked == 4
    log.mark(0x5000, 1)  # already set: no second OR
    assert log.pages_marked == 4
    log.mark(0x5000, 0)
    assert log.pages_marked == 4
    log.close()
    log.close()
    os.close(fd)


def test_marks_beyond_the_log_are_counted_and_dropped():
    fd, view = log_memfd(4096)
    log = DirtyLog(os.dup(fd), 4096, 0)
    log.mark(4096 * 8 * 4096, 4096)  # the first page past the log
    assert log.beyond == 1 and view[:] == bytes(4096)
    log.close()
    os.close(fd)


def test_the_log_is_sealed_against_shrinking():
    fd, _ = log_memfd(8192)
    log = DirtyLog(os.dup(fd), 8192, 0)
    with pytest.raises(PermissionError):
        os.ftruncate(fd, 0)  # would turn our next mark into SIGBUS
    log.mark(0, 1)
    log.close()
    os.close(fd)


@pytest.mark.parametrize(
    "size,offset,match",
    [(0, 0, "bytes"), (MAX_LOG_BYTES + 8, 0, "bytes"), (8192, 4096, "beyond"), (4096, 100, "aligned")],
)
def test_hostile_logs_are_refused_and_their_fd_closed(size, offset, match):
    fd, _ = log_memfd(8192)
    dup = os.dup(fd)
    with pytest.raises(FrontendError, match=match):
        DirtyLog(dup, size, offset)
    with pytest.raises(OSError):
        os.fstat(dup)  # closed by DirtyLog
    os.close(fd)


def test_a_log_that_cannot_be_sealed_is_refused():
    with tempfile.TemporaryFile() as f:
        f.truncate(8192)
        with pytest.raises(FrontendError, match="sealed"):
            DirtyLog(os.dup(f.fileno()), 8192, 0)
    fd = os.memfd_create("no-sealing")  # made without MFD_ALLOW_SEALING
    os.ftruncate(fd, 8192)
    with pytest.raises(FrontendError, match="sealed"):
        DirtyLog(os.dup(fd), 8192, 0)
    os.close(fd)


# ------------------------------------------------------------ used-ring logging


def live_ring(flags: int, log_addr: int, num: int = 64) -> tuple[Vring, GuestMemory, int]:
    ram = os.memfd_create("ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(ram, 1 << 20)
    memory = GuestMemory()
    memory.add(MemoryRegion(0, 1 << 20, 0x10000000, 0), ram)
    vring = Vring(0)
    vring.num = num
    vring.addr = VringAddr(0, flags, 0x10000000, 0x10000000 + 0x3000, 0x10000000 + 0x2000, log_addr)
    vring.kick_fd = os.eventfd(0)
    vring.start(memory, event_idx=True, indirect=False)
    return vring, memory, 0x3000


def test_every_used_ring_write_is_logged_at_the_address_the_frontend_gave():
    fd, view = log_memfd(4096)
    log = DirtyLog(os.dup(fd), 4096, 0)
    vring, memory, used_gpa = live_ring(VRING_ADDR_F_LOG, 0x3000)
    vring.set_log(log)
    assert vring.queue is not None
    for write in (lambda q: q.push(0, 0), lambda q: q.set_avail_event(), lambda q: q.disable_kicks(),
                  lambda q: q.enable_kicks()):
        view[:] = bytes(4096)
        write(vring.queue)
        assert view[0] == 0b0000_1000, "page 3 (the used ring) is marked"
    # A ring the frontend did not ask to log, or logging off: nothing marked.
    view[:] = bytes(4096)
    vring.set_log(None)
    vring.queue.push(1, 0)
    assert view[0] == 0
    unlogged, _, _ = live_ring(0, 0x3000)
    unlogged.set_log(log)
    assert unlogged.queue is not None
    unlogged.queue.push(0, 0)
    assert view[0] == 0
    # The log follows a restart of the ring (new addresses, same log).
    vring.set_log(log)
    vring.stop()
    vring.start(memory, event_idx=True, indirect=False)
    vring.queue.push(2, 0)
    assert view[0] == 0b0000_1000
    assert used_ring_size(64, True) < 4096
    for ring in (vring, unlogged):
        ring.close()
    memory.close()
    log.close()
    os.close(fd)


# ------------------------------------------------------------------ state pipe


def run(coro):
    return asyncio.run(coro)


async def drain(fd: int) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while True:
        chunk = await loop.run_in_executor(None, os.read, fd, 1 << 16)
        if not chunk:
            return bytes(out)
        out += chunk


def test_a_save_larger_than_a_pipe_is_written_while_the_loop_runs():
    data = os.urandom(1 << 20)

    async def main() -> None:
        r, w = os.pipe()
        transfer = StateTransfer(asyncio.get_running_loop(), w, data=data)
        got = await drain(r)
        os.close(r)
        assert got == data
        assert transfer.check() == "" and transfer.transferred == len(data)

    run(main())


def test_a_load_is_read_to_its_end_and_handed_over():
    data = os.urandom(300_000)
    loaded = []

    async def main() -> None:
        r, w = os.pipe()
        transfer = StateTransfer(asyncio.get_running_loop(), r, on_loaded=loaded.append)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, os.write, w, data)  # blocks until we read
        os.close(w)
        assert transfer.check() == ""

    run(main())
    assert loaded == [data]


def test_a_load_whose_writer_stays_open_fails_at_check_instead_of_waiting():
    async def main() -> None:
        r, w = os.pipe()
        transfer = StateTransfer(asyncio.get_running_loop(), r, on_loaded=lambda d: None)
        os.write(w, b"partial")
        await asyncio.sleep(0)
        assert "did not close" in transfer.check()
        os.close(w)

    run(main())


def test_a_load_past_the_limit_fails_and_stops_reading():
    async def main() -> None:
        r, w = os.pipe()
        transfer = StateTransfer(asyncio.get_running_loop(), r, on_loaded=lambda d: None, max_bytes=1000)
        os.write(w, bytes(5000))
        for _ in range(5):
            await asyncio.sleep(0)
        assert "larger than 1000" in (transfer.result or "")
        with pytest.raises(BrokenPipeError):
            os.write(w, b"x")  # our end is closed
        os.close(w)
        assert "larger" in transfer.check()

    run(main())


def test_a_refused_state_and_a_device_error_are_reported_at_check():
    def refuse(data: bytes) -> None:
        raise ValueError("not mine")

    def crash(data: bytes) -> None:
        raise KeyError("bug")

    async def main() -> None:
        for handler, words in ((refuse, "state refused: not mine"), (crash, "device error")):
            r, w = os.pipe()
            transfer = StateTransfer(asyncio.get_running_loop(), r, on_loaded=handler)
            os.write(w, b"state")
            os.close(w)
            assert words in transfer.check()

    run(main())


def test_a_save_whose_reader_went_away_fails():
    async def main() -> None:
        r, w = os.pipe()
        os.close(r)
        transfer = StateTransfer(asyncio.get_running_loop(), w, data=b"x" * 10)
        await asyncio.sleep(0.05)
        assert "writing the state failed" in transfer.check()

    run(main())
