"""Split virtqueue: chain walking and ring index rules, over a fake guest RAM."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import virtqueue as vq
from protocol.errors import GuestAddressError, GuestError

RAM = 1 << 20


class FlatMemory:
    """Guest RAM as one bytearray at guest-physical 0."""

    def __init__(self, size=RAM):
        self.ram = bytearray(size)
        self.mv = memoryview(self.ram)

    def view(self, gpa, length):
        if gpa < 0 or length < 0 or gpa + length > len(self.ram):
            raise GuestAddressError(f"{gpa:#x}+{length}")
        return self.mv[gpa : gpa + length]


DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000


def make_queue(mem, num=8, event_idx=True, indirect=True):
    return vq.SplitQueue(
        num,
        mem.view(DESC, vq.desc_table_size(num)),
        mem.view(AVAIL, vq.avail_ring_size(num)),
        mem.view(USED, vq.used_ring_size(num)),
        event_idx=event_idx,
        indirect=indirect,
    )


def put_desc(mem, table, index, addr, length, flags=0, nxt=0):
    vq.DESC.pack_into(mem.ram, table + 16 * index, addr, length, flags, nxt)


def publish(mem, q, heads):
    idx = struct.unpack_from("<H", mem.ram, AVAIL + 2)[0]
    for h in heads:
        struct.pack_into("<H", mem.ram, AVAIL + 4 + 2 * (idx % q.num), h)
        idx = (idx + 1) & 0xFFFF
    struct.pack_into("<H", mem.ram, AVAIL + 2, idx)


def test_pop_walk_and_push():
    mem = FlatMemory()
    q = make_queue(mem)
    put_desc(mem, DESC, 0, 0x10000, 8, vq.VRING_DESC_F_NEXT, 1)
    put_desc(mem, DESC, 1, 0x20000, 16, vq.VRING_DESC_F_WRITE)
    publish(mem, q, [0])
    chain = q.pop(mem)
    assert [(s.addr, s.length, s.writable) for s in chain.segments] == [(0x10000, 8, False), (0x20000, 16, True)]
    assert q.pop(mem) is None
    q.push(chain.head, 16)
    assert struct.unpack_from("<HHII", mem.ram, USED) == (0, 1, 0, 16)


def test_looping_chain_is_an_error_not_a_hang():
    mem = FlatMemory()
    q = make_queue(mem)
    put_desc(mem, DESC, 0, 0x10000, 8, vq.VRING_DESC_F_NEXT, 1)
    put_desc(mem, DESC, 1, 0x10000, 8, vq.VRING_DESC_F_NEXT, 0)
    publish(mem, q, [0])
    with pytest.raises(GuestError, match="loops"):
        q.pop(mem)


def test_head_and_next_out_of_range():
    mem = FlatMemory()
    q = make_queue(mem)
    publish(mem, q, [8])
    with pytest.raises(GuestError, match="head"):
        q.pop(mem)
    put_desc(mem, DESC, 0, 0x10000, 8, vq.VRING_DESC_F_NEXT, 99)
    publish(mem, q, [0])
    with pytest.raises(GuestError, match="next index"):
        q.pop(mem)


def test_avail_index_jumping_past_the_queue_is_an_error():
    mem = FlatMemory()
    q = make_queue(mem)
    struct.pack_into("<H", mem.ram, AVAIL + 2, 9)
    with pytest.raises(GuestError, match="ahead"):
        q.pending()


def test_indirect_table():
    mem = FlatMemory()
    q = make_queue(mem)
    table = 0x40000
    put_desc(mem, table, 0, 0x10000, 4, vq.VRING_DESC_F_NEXT, 1)
    put_desc(mem, table, 1, 0x11000, 4)
    put_desc(mem, DESC, 0, table, 32, vq.VRING_DESC_F_INDIRECT)
    publish(mem, q, [0])
    chain = q.pop(mem)
    assert [s.addr for s in chain.segments] == [0x10000, 0x11000]


def test_indirect_rules():
    mem = FlatMemory()
    table = 0x40000
    # not negotiated
    q = make_queue(mem, indirect=False)
    put_desc(mem, DESC, 0, table, 16, vq.VRING_DESC_F_INDIRECT)
    publish(mem, q, [0])
    with pytest.raises(GuestError, match="without"):
        q.pop(mem)
    # nested
    mem = FlatMemory()
    q = make_queue(mem)
    put_desc(mem, table, 0, table, 16, vq.VRING_DESC_F_INDIRECT)
    put_desc(mem, DESC, 0, table, 16, vq.VRING_DESC_F_INDIRECT)
    publish(mem, q, [0])
    with pytest.raises(GuestError, match="nested"):
        q.pop(mem)
    # bad length, outside RAM
    for addr, length, pattern in ((table, 15, "indirect table"), (RAM - 8, 16, "0x")):
        mem = FlatMemory()
        q = make_queue(mem)
        put_desc(mem, DESC, 0, addr, length, vq.VRING_DESC_F_INDIRECT)
        publish(mem, q, [0])
        with pytest.raises(GuestError, match=pattern):
            q.pop(mem)


def test_indirect_loop_bounded_by_its_table():
    mem = FlatMemory()
    q = make_queue(mem)
    table = 0x40000
    put_desc(mem, table, 0, 0x10000, 4, vq.VRING_DESC_F_NEXT, 1)
    put_desc(mem, table, 1, 0x10000, 4, vq.VRING_DESC_F_NEXT, 0)
    put_desc(mem, DESC, 0, table, 32, vq.VRING_DESC_F_INDIRECT)
    publish(mem, q, [0])
    with pytest.raises(GuestError, match="loops"):
        q.pop(mem)


def test_readable_after_writable_is_refused():
    mem = FlatMemory()
    q = make_queue(mem)
    put_desc(mem, DESC, 0, 0x10000, 8, vq.VRING_DESC_F_WRITE | vq.VRING_DESC_F_NEXT, 1)
    put_desc(mem, DESC, 1, 0x20000, 8)
    publish(mem, q, [0])
    with pytest.raises(GuestError, match="readable"):
        q.pop(mem)


def test_event_idx_notification_rule():
    mem = FlatMemory()
    q = make_queue(mem)
    q.push(0, 0)
    assert q.should_notify()  # the first notification always goes out
    # guest asks to be told when used idx passes 5
    struct.pack_into("<H", mem.ram, AVAIL + 4 + 2 * q.num, 5)
    q.push(0, 0)
    assert not q.should_notify()  # used 2, event 5
    for _ in range(4):
        q.push(0, 0)
    assert q.should_notify()  # crossed 5 -> 6


def test_no_interrupt_flag_without_event_idx():
    mem = FlatMemory()
    q = make_queue(mem, event_idx=False)
    q.push(0, 0)
    assert q.should_notify()
    struct.pack_into("<H", mem.ram, AVAIL, vq.VRING_AVAIL_F_NO_INTERRUPT)
    q.push(0, 0)
    assert not q.should_notify()


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_need_event_matches_the_spec_formula(event, new, old):
    expected = ((new - event - 1) % 65536) < ((new - old) % 65536)
    assert vq.need_event(event, new, old) == expected


def test_interrupt_rule_shared_by_both_engines():
    """interrupt_wanted is the whole decision both engines' rings make."""
    def wanted(**kw):
        args = dict(event_idx=True, avail_flags=0, used_event=0, signalled_valid=True, signalled_used=0,
                    used_idx=1)
        args.update(kw)
        return vq.interrupt_wanted(**args)

    # Without EVENT_IDX only the driver's NO_INTERRUPT flag counts.
    assert wanted(event_idx=False, used_event=100)
    assert not wanted(event_idx=False, avail_flags=vq.VRING_AVAIL_F_NO_INTERRUPT)
    # With it the flag is ignored and used_event decides...
    assert wanted(avail_flags=vq.VRING_AVAIL_F_NO_INTERRUPT, used_event=0)
    assert not wanted(used_event=5, signalled_used=1, used_idx=3)
    assert wanted(used_event=5, signalled_used=3, used_idx=6)
    # ...unless nothing was signalled yet: then always.
    assert wanted(used_event=5, signalled_valid=False, used_idx=1)
    # Across the 16-bit wrap.
    assert wanted(used_event=0xFFFF, signalled_used=0xFFFE, used_idx=0)


def test_set_avail_event_writes_after_the_used_ring():
    mem = FlatMemory()
    q = make_queue(mem)
    publish(mem, q, [0, 0, 0])
    put_desc(mem, DESC, 0, 0x10000, 4)
    for _ in range(3):
        q.pop(mem)
        q.push(0, 0)  # returned, so the guest may make it available again
    q.set_avail_event()
    assert struct.unpack_from("<H", mem.ram, USED + 4 + 8 * q.num)[0] == 3


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=16 * 8, max_size=16 * 8), st.lists(st.integers(0, 15), max_size=8))
def test_random_descriptor_tables_never_hang_or_crash(table, heads):
    mem = FlatMemory()
    mem.ram[DESC : DESC + len(table)] = table
    q = make_queue(mem)
    publish(mem, q, heads)
    for _ in heads:
        try:
            chain = q.pop(mem)
        except GuestError:
            continue
        assert chain is not None
        assert len(chain.segments) <= 8 * 4096  # bounded by table sizes


def test_queue_size_must_be_a_power_of_two():
    mem = FlatMemory()
    with pytest.raises(GuestError):
        make_queue(mem, num=6)


def test_a_zero_length_descriptor_is_a_guest_error():
    mem = FlatMemory()
    q = make_queue(mem)
    put_desc(mem, DESC, 0, 0x10000, 8, vq.VRING_DESC_F_NEXT, 1)
    put_desc(mem, DESC, 1, 0x20000, 0)
    publish(mem, q, [0])
    with pytest.raises(GuestError, match="zero-length"):
        q.pop(mem)


def test_a_head_still_in_flight_is_a_guest_error_until_pushed():
    mem = FlatMemory()
    q = make_queue(mem)
    put_desc(mem, DESC, 3, 0x10000, 8)
    publish(mem, q, [3, 3])
    assert q.pop(mem).head == 3
    with pytest.raises(GuestError, match="still holds it"):
        q.pop(mem)
    q.push(3, 0)
    publish(mem, q, [3])
    assert q.pop(mem).head == 3


def test_the_descriptor_budget_stops_a_pass_between_chains():
    """One long chain in every avail slot: a pass walks at most its budget
    and hands the rest back (the slot is popped again, whole, next pass)."""
    num = 1024
    mem = FlatMemory(4 << 20)
    q = vq.SplitQueue(
        num,
        mem.view(0x100000, vq.desc_table_size(num)),
        mem.view(0x200000, vq.avail_ring_size(num)),
        mem.view(0x300000, vq.used_ring_size(num)),
        event_idx=True,
        indirect=False,
    )
    for i in range(num):  # descriptor i -> i+1 -> ... -> num-1
        flags = vq.VRING_DESC_F_NEXT if i < num - 1 else 0
        vq.DESC.pack_into(mem.ram, 0x100000 + 16 * i, 0x10000, 1, flags, i + 1)
    struct.pack_into(f"<{num}H", mem.ram, 0x200000 + 4, *range(num))
    struct.pack_into("<H", mem.ram, 0x200000 + 2, num)
    budget = vq.descriptor_budget(num)
    walked, chains = 0, 0
    while True:
        try:
            chain = q.pop(mem, budget=budget - walked)
        except vq.BudgetExhausted:
            break
        walked += chain.descriptors
        chains += 1
    assert walked <= budget and chains == 2  # 1024 + 1023, then 1022 would not fit
    assert q.last_avail == 2  # the third chain stays available
    assert q.pop(mem, budget=budget).descriptors == num - 2
