"""The engine's defences against a frontend that abuses the fds it shares:
eventfds that would block, a listener starved of fds."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading

import pytest

from balloond.engine import listener as listener_mod
from balloond.engine.listener import VhostUserListener
from balloond.engine.vring import eventfd_drain, eventfd_signal

EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE


def _returns_within(fn, seconds=1.0):
    """Run fn in a thread; the result, or fail if it blocked."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the call blocked"
    return out[0]


def test_a_call_eventfd_at_its_maximum_is_skipped_not_waited_on():
    fd = os.eventfd(0)  # blocking, as a hostile frontend would leave it
    try:
        os.eventfd_write(fd, EVENTFD_MAX)
        assert _returns_within(lambda: eventfd_signal(fd)) is False
        os.eventfd_read(fd)
        assert eventfd_signal(fd) is True
        assert os.eventfd_read(fd) == 1
    finally:
        os.close(fd)


def test_a_call_eventfd_made_blocking_again_is_made_non_blocking_before_the_write():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        os.set_blocking(fd, False)
        os.set_blocking(fd, True)  # the frontend clears O_NONBLOCK on the shared description
        assert eventfd_signal(fd) is True
        assert os.get_blocking(fd) is False
    finally:
        os.close(fd)


def test_an_emptied_kick_eventfd_is_not_read():
    fd = os.eventfd(0)  # blocking and empty: the frontend read it before us
    try:
        assert _returns_within(lambda: eventfd_drain(fd)) is False
        os.eventfd_write(fd, 3)
        assert eventfd_drain(fd) is True
        assert eventfd_drain(fd) is False
    finally:
        os.close(fd)


def test_the_listener_keeps_accepting_after_emfile(monkeypatch):
    """accept() failing for want of fds sleeps and retries, and the next
    frontend is served; it does not end the VM's listener."""
    monkeypatch.setattr(listener_mod, "ACCEPT_RETRY_SECONDS", 0.01)

    async def main() -> int:
        a, b = socket.socketpair()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener = VhostUserListener(server, path=None)
        loop = asyncio.get_running_loop()
        failures = [errno.EMFILE, errno.ENFILE, errno.ECONNABORTED, errno.ENOBUFS, errno.ENOMEM]
        served = asyncio.Event()

        async def fake_accept(sock):
            await asyncio.sleep(0)
            if failures:
                code = failures.pop(0)
                raise OSError(code, os.strerror(code))
            return a, None

        monkeypatch.setattr(loop, "sock_accept", fake_accept)

        async def serve(conn):
            served.set()
            await asyncio.sleep(3600)

        task = asyncio.create_task(listener.serve(serve))
        await asyncio.wait_for(served.wait(), 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for s in (a, b, server):
            s.close()
        return listener.accept_errors

    assert asyncio.run(main()) == 5


def _region(size, gpa=0):
    from protocol.vhost_user import MemoryRegion

    return MemoryRegion(guest_phys_addr=gpa, size=size, userspace_addr=0x7F0000000000 + gpa, mmap_offset=0)


def test_a_mapped_memfd_is_sealed_so_the_frontend_cannot_shrink_it():
    from balloond.engine.memory import GuestMemory

    fd = os.memfd_create("ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 20)
    frontend_copy = os.dup(fd)  # the frontend keeps its own fd to the file
    memory = GuestMemory()
    try:
        memory.add(_region(1 << 20), fd)
        assert memory.unsealed == 0
        with pytest.raises(PermissionError):
            os.ftruncate(frontend_copy, 0)
        memory.view(0xFF000, 4096)[0] = 1  # still mapped, no SIGBUS
    finally:
        memory.close()
        os.close(frontend_copy)


def test_a_file_that_refuses_sealing_is_mapped_and_counted():
    from balloond.engine.memory import GuestMemory

    fd = os.memfd_create("ram", os.MFD_CLOEXEC)  # no MFD_ALLOW_SEALING
    os.ftruncate(fd, 1 << 20)
    memory = GuestMemory()
    try:
        memory.add(_region(1 << 20), fd)
        assert memory.unsealed == 1 and memory.total_bytes == 1 << 20
    finally:
        memory.close()


def test_guest_ram_beyond_the_cap_is_refused_and_its_fd_closed():
    from balloond.engine.memory import GuestMemory
    from protocol.errors import FrontendError

    memory = GuestMemory(max_bytes=2 << 20)
    fds = []
    for _ in range(2):
        fd = os.memfd_create("ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, 2 << 20)
        fds.append(fd)
    try:
        memory.add(_region(2 << 20), fds[0])
        with pytest.raises(FrontendError, match="exceeds the cap"):
            memory.add(_region(2 << 20, gpa=4 << 20), fds[1])
        with pytest.raises(OSError):
            os.fstat(fds[1])  # taken over and closed
        assert memory.total_bytes == 2 << 20
    finally:
        memory.close()
