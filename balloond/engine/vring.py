"""Vring: one virtqueue as the engine sees it — setup state, eventfds, and
the live `SplitQueue` once the ring has everything it needs.

vhost-user sets a ring up piece by piece (NUM, BASE, ADDR, KICK, CALL) and
enables it separately; a ring the guest never configured still gets ENABLE.
A ring goes live only once it has a size, addresses and a kick fd, is
enabled, and guest memory is mapped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from protocol.virtqueue import SplitQueue, avail_ring_size, desc_table_size, used_ring_size
from protocol.vhost_user import VringAddr

from .memory import GuestMemory


@dataclass
class VringCounters:
    kicks: int = 0
    chains: int = 0
    notifications: int = 0
    guest_errors: int = 0


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

    def stop(self) -> int:
        """Drop the live queue; return its next avail index (the ring base)."""
        if self.queue is not None:
            self.base = self.queue.last_avail
            for view in (self.queue.desc, self.queue.avail, self.queue.used):
                view.release()
            self.queue = None
        return self.base

    def notify(self) -> None:
        """Interrupt the guest if it wants one for what was just used."""
        if self.queue is None or self.call_fd is None:
            return
        if self.queue.should_notify():
            self.counters.notifications += 1
            try:
                os.eventfd_write(self.call_fd, 1)
            except OSError:
                pass  # a stale call fd after a restart; the next SET_VRING_CALL fixes it

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
