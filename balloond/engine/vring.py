"""Vring: one virtqueue as the engine sees it — setup state, eventfds, and
the live `SplitQueue` once the ring has everything it needs.

vhost-user sets a ring up piece by piece (NUM, BASE, ADDR, KICK, CALL) and
enables it separately; a ring the guest never configured still gets ENABLE.
A ring goes live only once it has a size, addresses and a kick fd, is
enabled, and guest memory is mapped.
"""

from __future__ import annotations

import fcntl
import os
import select
from dataclasses import dataclass

from collections.abc import Callable

from protocol.errors import GuestError
from protocol.virtqueue import (
    BudgetExhausted,
    Chain,
    GuestMemoryAccess,
    SplitQueue,
    avail_ring_size,
    desc_table_size,
    descriptor_budget,
    used_ring_size,
    walk_chain,
)
from protocol.vhost_user import VRING_ADDR_F_LOG, VringAddr

from .dirty_log import DirtyLog
from .memory import GuestMemory


# Eventfds come from the frontend, which keeps its own reference to the same
# open file description: it can clear O_NONBLOCK on it at any time, fill the
# counter (a write then blocks) or empty it (a read then blocks). A private
# description would fix the flag, but an eventfd is an anonymous inode and
# re-opening /proc/self/fd/N fails (ENXIO); pwritev2(RWF_NOWAIT) is refused
# (EOPNOTSUPP). So every access first asks poll() with a zero timeout and
# re-asserts O_NONBLOCK: what remains is a window of two syscalls in which
# the frontend would have to change both the counter and the flag.


def _ensure_nonblocking(fd: int) -> None:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)


def _ready(fd: int, event: int) -> bool:
    poller = select.poll()
    poller.register(fd, event)
    return any(ev & event for _, ev in poller.poll(0))


def eventfd_signal(fd: int) -> bool:
    """Add 1 to an eventfd without ever blocking; False (nothing written) if
    its counter is at the maximum or it is not writable."""
    try:
        if not _ready(fd, select.POLLOUT):
            return False
        _ensure_nonblocking(fd)
        os.eventfd_write(fd, 1)
    except (OSError, ValueError):  # EAGAIN included: the frontend raced us
        return False
    return True


def eventfd_drain(fd: int) -> bool:
    """Read (reset) an eventfd without ever blocking; False if there was
    nothing to read (the frontend may have read it first)."""
    if not _ready(fd, select.POLLIN):
        return False
    _ensure_nonblocking(fd)
    try:
        os.eventfd_read(fd)
    except (BlockingIOError, InterruptedError):
        return False
    return True


@dataclass
class VringCounters:
    kicks: int = 0
    chains: int = 0
    notifications: int = 0
    guest_errors: int = 0
    #: Interrupts not sent because the call eventfd could not take a write
    #: (its counter at the maximum: only a hostile frontend does that).
    calls_skipped: int = 0


class Vring:
    def __init__(self, index: int) -> None:
        self.index = index
        self.num: int | None = None
        self.base = 0
        self.addr: VringAddr | None = None
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.queue: SplitQueue | None = None
        self.counters = VringCounters()
        #: The dirty log while the frontend migrates (see set_log).
        self.log: DirtyLog | None = None

    @property
    def configured(self) -> bool:
        return self.num is not None and self.addr is not None and self.kick_fd is not None

    @property
    def live(self) -> bool:
        return self.queue is not None

    def start(self, memory: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        """Map the ring areas and create the queue (raises GuestError on bad addresses)."""
        assert self.num is not None and self.addr is not None
        num, addr = self.num, self.addr
        desc = memory.view_uaddr(addr.desc_user_addr, desc_table_size(num))
        avail = memory.view_uaddr(addr.avail_user_addr, avail_ring_size(num, event_idx))
        used = memory.view_uaddr(addr.used_user_addr, used_ring_size(num, event_idx))
        self.queue = SplitQueue(num, desc, avail, used, event_idx=event_idx, indirect=indirect, last_avail=self.base)
        self._attach_log()

    def set_log(self, log: DirtyLog | None) -> None:
        """Log this ring's used-ring writes in `log` (None: stop logging),
        if the frontend asked for it in SET_VRING_ADDR (VRING_ADDR_F_LOG)."""
        self.log = log
        self._attach_log()

    def _attach_log(self) -> None:
        if self.queue is None:
            return
        log, addr = self.log, self.addr
        if log is None or addr is None or not addr.flags & VRING_ADDR_F_LOG:
            self.queue.on_used_write = None
            return
        gpa, size = addr.log_guest_addr, used_ring_size(self.queue.num, self.queue.event_idx)

        def logged() -> None:
            log.mark(gpa, size)

        self.queue.on_used_write = logged

    def stop(self) -> int:
        """Drop the live queue; return its next avail index (the ring base)."""
        if self.queue is not None:
            self.base = self.queue.last_avail
            for view in (self.queue.desc, self.queue.avail, self.queue.used):
                view.release()
            self.queue = None
        return self.base

    # ------------------------------------------------ the device's Ring seam

    @property
    def last_avail(self) -> int:
        """The next avail slot the device will consume (the journal's ring position)."""
        assert self.queue is not None
        return self.queue.last_avail

    def pop_chains(self, memory: GuestMemoryAccess, on_error: Callable[[GuestError], None]) -> list[Chain]:
        """The chains available now, within one pass's budget: at most a
        queue's worth of chains and `descriptor_budget` descriptors, so one
        kick costs the event loop (every VM) a bounded time whatever the
        guest wrote. What is left stays pending; the engine sees it and comes
        back after the other callbacks (its `_continue_later`). A bad chain
        is reported to `on_error` and returned empty; a nonsensical avail
        index ends the pass."""
        q = self.queue
        assert q is not None
        chains = []
        budget = descriptor_budget(q.num)
        # At most one queue's worth per pass: a guest whose used ring overlaps
        # its avail index makes every returned chain look like a new one, and
        # an unbounded loop here would hang the daemon (found by fuzzing).
        for _ in range(q.num):
            try:
                head = q.pop_head()
            except GuestError as exc:
                # The avail index itself is nonsense: nothing on this ring can
                # be trusted until the driver resets it.
                on_error(exc)
                break
            if head is None:
                break
            if head in q.in_flight:
                # Not returned either: the device still owns that chain.
                on_error(GuestError(f"chain head {head} made available again while the device still holds it"))
                continue
            try:
                chain = walk_chain(q.desc, q.num, head, memory, q.indirect, budget=budget)
            except BudgetExhausted:
                q.unpop()  # walked whole by the next pass
                break
            except GuestError as exc:
                on_error(exc)
                if head < q.num:
                    q.push(head, 0)  # returned empty, so the driver does not leak it
                continue
            budget -= chain.descriptors
            q.in_flight.add(head)
            chains.append(chain)
            self.counters.chains += 1
        return chains

    def push(self, head: int, written: int) -> None:
        """Hand a chain back on the used ring (`notify` interrupts the guest)."""
        assert self.queue is not None
        self.queue.push(head, written)

    def notify(self) -> None:
        """Interrupt the guest if it wants one for what was just used."""
        if self.queue is None or self.call_fd is None:
            return
        if self.queue.should_notify():
            self.counters.notifications += 1
            # Never blocks (see eventfd_signal); a stale call fd after a
            # restart fails the same way, and the next SET_VRING_CALL fixes it.
            if not eventfd_signal(self.call_fd):
                self.counters.calls_skipped += 1

    def replace_fd(self, attr: str, fd: int | None) -> None:
        old = getattr(self, attr)
        if old is not None and old != fd:
            try:
                os.close(old)
            except OSError:
                pass
        setattr(self, attr, fd)

    def close(self) -> None:
        self.stop()
        for attr in ("kick_fd", "call_fd", "err_fd"):
            self.replace_fd(attr, None)
