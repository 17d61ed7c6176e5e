"""The guest-side trace of the stock driver's buffers (benchmarks/guest_trace.py),
parsed from text shaped like the function-graph tracer's output."""

from __future__ import annotations

import pytest

from benchmarks.guest_trace import DriverCalls, TraceUnavailable, parse_function_graph, trace_guest

HEADER = """\
# tracer: function_graph
#
# CPU  DURATION                  FUNCTION CALLS
# |     |   |                     |   |   |   |
"""
INFLATE = """\
 0)               |  update_balloon_size_func [virtio_balloon]() {
 0) ! 120.500 us  |    tell_host [virtio_balloon]();
 0) # 1500.250 us |  }
"""
DEFLATE = """\
 0)               |  update_balloon_size_func [virtio_balloon]() {
 0)               |    leak_balloon [virtio_balloon]() {
 0) ! 210.000 us  |      tell_host [virtio_balloon]();
 0)   ==========> |
 0) + 30.100 us   |      __sysvec_apic_timer_interrupt();
 0)   <========== |
 0) # 4000.800 us |    }
 0) # 4100.800 us |  }
"""
NOTHING_SENT = """\
 0)   3.000 us    |  update_balloon_size_func [virtio_balloon]();
 0)               |  update_balloon_size_func [virtio_balloon]() {
 0) + 12.000 us   |  }
"""
UNFINISHED = """\
 0)               |  update_balloon_size_func [virtio_balloon]() {
 0)               |    leak_balloon [virtio_balloon]() {
 0) ! 999.000 us  |      tell_host [virtio_balloon]();
"""


def test_inflate_and_deflate_buffers_and_the_wait_inside_each():
    calls = parse_function_graph(HEADER + INFLATE + DEFLATE + DEFLATE.replace("4100.800", "3900.000")
                                 + NOTHING_SENT + UNFINISHED)
    assert calls.inflate == [1500.25]
    assert calls.inflate_waits == [120.5]
    # A work item that sent nothing is no buffer; an unfinished one is left out whole.
    assert calls.deflate == [4100.8, 3900.0]
    assert calls.deflate_waits == [210.0, 210.0]
    assert calls.median("deflate") == pytest.approx(4000.4)
    assert DriverCalls().median("deflate") is None


def test_a_call_whose_opening_was_lost_is_left_out():
    # The ring buffer wrapped: the trace starts inside a deflating work item.
    lost = """\
 0) ! 150.000 us  |      tell_host [virtio_balloon]();
 0) # 4000.000 us |    } /* leak_balloon [virtio_balloon] */
 0) # 4100.000 us |  } /* update_balloon_size_func [virtio_balloon] */
"""
    calls = parse_function_graph(lost + INFLATE)
    assert calls == DriverCalls(inflate=[1500.25], inflate_waits=[120.5])


def test_waits_outside_a_work_item_are_not_counted():
    migration = """\
 0)               |  virtballoon_migratepage [virtio_balloon]() {
 0) ! 300.000 us  |    tell_host [virtio_balloon]();
 0) ! 400.000 us  |  }
 0)   6.100 us    |  __folio_put();
garbage line
"""
    assert parse_function_graph(migration) == DriverCalls()


class FakeGuest:
    def __init__(self, trace: str) -> None:
        self.trace = trace
        self.commands: list[str] = []

    def sh(self, cmd: str, timeout: float = 60.0) -> str:
        self.commands.append(cmd)
        return self.trace if "cat trace" in cmd else ""


def test_tracing_is_on_only_around_the_change_and_off_after_a_failure():
    guest = FakeGuest(DEFLATE)
    seen: list[int] = []
    calls = trace_guest(guest, lambda: seen.append(len(guest.commands)))
    assert seen == [2]  # the change ran after the check and the tracer's set-up
    assert "'update_balloon_size_func leak_balloon tell_host' > set_ftrace_filter" in guest.commands[1]
    assert guest.commands[-1].endswith("echo > set_ftrace_filter")
    assert calls.deflate == [4100.8]

    def fails() -> None:
        raise RuntimeError("no target")

    guest = FakeGuest(DEFLATE)
    with pytest.raises(RuntimeError):
        trace_guest(guest, fails)
    assert "echo nop > current_tracer" in guest.commands[-1]


def test_a_guest_that_cannot_trace_the_driver_is_told_before_the_change():
    guest = FakeGuest(DEFLATE)
    guest.sh = lambda cmd, timeout=60.0: "leak_balloon\n" if "available_filter_functions" in cmd else ""
    ran: list[bool] = []
    with pytest.raises(TraceUnavailable, match="leak_balloon"):
        trace_guest(guest, lambda: ran.append(True))
    assert ran == []
