"""LibRing: one of libvhost-user's queues, as the device's `Ring`.

The library walks the descriptors (vu_queue_pop, after the binding's own
vetting below) and hands back an element whose iovecs point into
its own mappings; they are turned back into guest-physical segments so the
device reads them as it reads the pure engine's chains. Each popped element
is kept, by head, until the device pushes that head back (vu_queue_push,
then free).

The guest is interrupted by the binding, not by vu_queue_notify: the
library writes the call eventfd as it finds it, and the frontend shares
that fd's open file description, so it can clear O_NONBLOCK and fill the
counter, and the write would then block the worker. `notify` decides as the
library does (EVENT_IDX's used_event, or NO_INTERRUPT; the library's own
signalled_used state) and signals with the pure engine's never-blocking
write, counting `notifications` and `calls_skipped` the same way.

Every chain is vetted by the pure engine's rules before the library pops
it (`_vet`: protocol.virtqueue's `available` and `walk_chain` on the
library's mapping of the ring): the library panics on a chain it finds
bad, and the connection would be broken and closed (QEMU reconnects). As
on the pure engine, a bad chain is reported to the device, counted and
returned empty, a head the device still holds or one outside the queue is
consumed without a return, and a nonsensical avail index ends the pass and
leaves the ring alone; the rest of the guest's buffers are served. Should
the library still panic, its message reaches the device as the GuestError.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from protocol.balloon import Feature
from protocol.errors import GuestError, ProtocolError
from protocol.virtqueue import (
    USED_ELEM,
    U16,
    BudgetExhausted,
    Chain,
    GuestMemoryAccess,
    Segment,
    avail_head,
    available,
    avail_ring_size,
    desc_table_size,
    descriptor_budget,
    full_barrier,
    interrupt_wanted,
    walk_chain,
)

from ..vring import VringCounters, eventfd_signal
from .abi import IoVec, Library, VuVirtqElement

if TYPE_CHECKING:
    from .connection import LibvhostUserConnection

_ELEMENT_SIZE = ctypes.sizeof(VuVirtqElement)


class LibRing:
    def __init__(self, index: int, connection: LibvhostUserConnection) -> None:
        self.index = index
        self.counters = VringCounters()
        self._conn = connection
        self._lib: Library = connection.lib
        self._vq: Any = connection.lib.vu_get_queue(connection.dev_ref, index)
        #: Popped elements the device has not pushed back, by head.
        self._elements: dict[int, int] = {}
        #: Whether the device was told this ring is live (queue_started).
        self.reported_live = False
        self._base = 0
        #: The frontend addresses of the ring's areas (descriptor table,
        #: avail and used rings) when they do not translate in the memory
        #: table: the binding keeps them from the library, which would give
        #: up on the connection. The ring is configured but cannot go live
        #: until they translate (LibvhostUserConnection._map_unmapped_rings)
        #: or good ones come, as on the pure engine.
        self.unmapped: tuple[int, int, int] | None = None

    @property
    def vq(self) -> Any:
        return self._vq.contents

    @property
    def base(self) -> int:
        return self._base

    def mark_started(self) -> None:
        self._base = self.vq.last_avail_idx
        self.reported_live = True

    @property
    def live(self) -> bool:
        vq = self.vq
        return bool(vq.started and vq.vring.avail and self._conn.memory is not None)

    @property
    def enabled(self) -> bool:
        return bool(self.vq.enable)

    @property
    def configured(self) -> bool:
        """Addresses and a kick fd given (the library started it)."""
        vq = self.vq
        return bool((vq.vring.desc or self.unmapped is not None) and vq.started)

    @property
    def last_avail(self) -> int:
        return int(self.vq.last_avail_idx)

    @property
    def held(self) -> int:
        return len(self._elements)

    def _ring_views(self) -> tuple[memoryview, memoryview] | None:
        """The descriptor table and the avail ring as the library mapped them."""
        vring = self.vq.vring
        num = int(vring.num)
        if not (num and vring.desc and vring.avail):
            return None
        desc = (ctypes.c_char * desc_table_size(num)).from_address(vring.desc)
        avail = (ctypes.c_char * avail_ring_size(num, False)).from_address(vring.avail)
        return memoryview(desc).cast("B"), memoryview(avail).cast("B")

    def _skip_slot(self) -> None:
        """Consume the next avail slot without popping it, and ask for the
        kick after it as a pop does (the library's vring_set_avail_event):
        the driver kicks only when it passes avail_event."""
        vq = self.vq
        vq.last_avail_idx = (vq.last_avail_idx + 1) & 0xFFFF
        if self._conn.event_idx and vq.notification and vq.vring.used:
            U16.pack_into((ctypes.c_char * 2).from_address(vq.vring.used + 4 + 8 * int(vq.vring.num)), 0,
                          int(vq.last_avail_idx))

    def _return_empty(self, head: int) -> None:
        """Hand `head` back on the used ring with nothing written, as the
        library's fill and flush would, without letting the library walk
        the bad chain again (its dirty-log walk would panic)."""
        vq = self.vq
        num = int(vq.vring.num)
        used = (ctypes.c_char * (4 + 8 * num)).from_address(vq.vring.used)
        old = int(vq.used_idx)
        USED_ELEM.pack_into(used, 4 + 8 * (old % num), head, 0)
        new = (old + 1) & 0xFFFF
        U16.pack_into(used, 2, new)  # after the element (x86-64 stores are ordered)
        vq.used_idx = new
        self._conn.log_used_ring(self)
        since_signalled = (new - int(vq.signalled_used)) & 0xFFFF
        if since_signalled == 0 or since_signalled >= 0x8000:  # the library's (int16_t) test
            vq.signalled_used_valid = False

    def _vet(self, views: tuple[memoryview, memoryview], memory: GuestMemoryAccess, budget: int,
             on_error: Callable[[GuestError], None]) -> int | None:
        """Look at the next chain with the pure engine's rules before the
        library pops it: its descriptor count if it is good, 0 if it was
        bad and dealt with here (the next may be good), None to end the pass
        (the ring is empty, its avail index is nonsense, or the budget ran
        out: the chain is walked whole by the next pass)."""
        desc, avail = views
        vq = self.vq
        num, last = int(vq.vring.num), int(vq.last_avail_idx)
        try:
            if not available(avail, last, num):
                return None
        except GuestError as exc:
            on_error(exc)
            return None
        head = avail_head(avail, last, num)
        if head in self._elements:
            self._skip_slot()  # not returned either: the device still owns that chain
            on_error(GuestError(f"chain head {head} made available again while the device still holds it"))
            return 0
        indirect = bool((self._conn.acked_features or 0) & (1 << Feature.RING_INDIRECT_DESC))
        try:
            chain = walk_chain(desc, num, head, memory, indirect, budget=budget)
            for seg in chain.segments:
                # The library maps every descriptor as it pops (and panics
                # at one outside guest RAM); the pure engine finds that
                # when the device reads the buffer, and returns it empty.
                memory.view(seg.addr, seg.length)
        except BudgetExhausted:
            return None
        except GuestError as exc:
            self._skip_slot()
            on_error(exc)
            if head < num:
                self._return_empty(head)  # so the driver does not leak it
            return 0
        return chain.descriptors

    def pop_chains(self, memory: GuestMemoryAccess, on_error: Callable[[GuestError], None]) -> list[Chain]:
        conn, lib = self._conn, self._lib
        library_memory = conn.memory
        chains: list[Chain] = []
        if library_memory is None:
            return chains
        views = self._ring_views()
        budget = descriptor_budget(max(1, self.vq.vring.num))
        for _ in range(max(1, self.vq.vring.num)):
            if views is not None:
                walked = self._vet(views, library_memory, budget, on_error)
                if walked is None:
                    break
                if not walked:
                    continue
                budget -= walked
            ptr = lib.vu_queue_pop(conn.dev_ref, self._vq, _ELEMENT_SIZE)
            if not ptr:
                break
            elem = VuVirtqElement.from_address(ptr)
            head = int(elem.index)
            try:
                segments = []
                for sg, count, writable in ((elem.out_sg, elem.out_num, False), (elem.in_sg, elem.in_num, True)):
                    if count:
                        for iov in (IoVec * count).from_address(sg):
                            length = int(iov.iov_len)
                            segments.append(Segment(library_memory.gpa_of(iov.iov_base or 0, length), length, writable))
            except ProtocolError as exc:
                on_error(GuestError(str(exc)))
                lib.vu_queue_push(conn.dev_ref, self._vq, ptr, 0)  # returned empty
                lib.free(ptr)
                continue
            self._elements[head] = ptr
            chains.append(Chain(head, tuple(segments), int(elem.out_num + elem.in_num)))
            self.counters.chains += 1
        if conn.broken_reason is not None:
            on_error(GuestError(conn.broken_reason))
        return chains

    def pending(self) -> bool:
        """More chains wait (the pass stopped at its bound). Asked of the
        ring itself first: the library panics at an avail index more than a
        queue ahead, and a ring in that state waits for the driver's reset."""
        if not self.live or self._conn.broken_reason:
            return False
        views = self._ring_views()
        if views is not None:
            try:
                available(views[1], int(self.vq.last_avail_idx), int(self.vq.vring.num))
            except GuestError:
                return False
        return not self._lib.vu_queue_empty(self._conn.dev_ref, self._vq)

    def set_kicks(self, on: bool) -> None:
        """Ask the driver for kicks (on), or tell it they are not needed while
        the binding polls the ring. The library's vu_queue_set_notification
        does both without EVENT_IDX (the used ring's NO_NOTIFY flag); with
        it, turning them off only stops the library's pops from moving
        avail_event, and the driver would still kick once past its last
        value, so the binding moves it 32K buffers ahead, as the pure engine
        does. Turning them on sets avail_event to the avail index (the
        library's barrier follows); the caller then looks at the ring once
        more."""
        vq = self.vq
        self._lib.vu_queue_set_notification(self._conn.dev_ref, self._vq, int(on))
        if not on and self._conn.event_idx and vq.vring.used:
            U16.pack_into((ctypes.c_char * 2).from_address(vq.vring.used + 4 + 8 * int(vq.vring.num)), 0,
                          (int(vq.last_avail_idx) + 0x7FFF) & 0xFFFF)

    def push(self, head: int, written: int) -> None:
        ptr = self._elements.pop(head, None)
        if ptr is None:
            return
        self._lib.vu_queue_push(self._conn.dev_ref, self._vq, ptr, written)
        self._lib.free(ptr)
        self._conn.log_used_ring(self)

    def notify(self) -> None:
        """Interrupt the guest if it wants one for what was just used (see
        the module): never blocks, whatever the frontend did to the fd."""
        vq = self.vq
        if vq.call_fd < 0 or not self._wants_interrupt(vq):
            return  # no call fd (yet): nothing to signal, as in the pure engine
        self.counters.notifications += 1
        if not eventfd_signal(vq.call_fd):
            self.counters.calls_skipped += 1

    def _wants_interrupt(self, vq: Any) -> bool:
        """libvhost-user's vring_notify, on its own state (the balloon
        offers no NOTIFY_ON_EMPTY)."""
        avail = vq.vring.avail
        if not avail:
            return False
        # The used index the library just stored must be visible before
        # the driver's request is read (as SplitQueue.should_notify).
        full_barrier()
        event_idx = self._conn.event_idx
        wanted = interrupt_wanted(
            event_idx=event_idx,
            avail_flags=ctypes.c_uint16.from_address(avail).value,
            used_event=ctypes.c_uint16.from_address(avail + 4 + 2 * int(vq.vring.num)).value if event_idx else 0,
            signalled_valid=bool(vq.signalled_used_valid), signalled_used=int(vq.signalled_used),
            used_idx=int(vq.used_idx))
        if event_idx:
            vq.signalled_used_valid = True
            vq.signalled_used = int(vq.used_idx)
        return wanted

    def drop_held(self) -> int:
        """The ring stops: give every element the device still holds back to
        the frontend as not consumed (vu_queue_rewind); how many."""
        held = len(self._elements)
        for ptr in self._elements.values():
            self._lib.free(ptr)
        self._elements.clear()
        if held:
            self._lib.vu_queue_rewind(self._conn.dev_ref, self._vq, held)
        return held

    def free_all(self) -> None:
        for ptr in self._elements.values():
            self._lib.free(ptr)
        self._elements.clear()
