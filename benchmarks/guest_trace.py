"""What a balloon change costs as the guest sees it: Linux's stock
virtio_balloon timed by the guest kernel's function-graph tracer.

A time to target mixes the device's part (each 256-page buffer's round trip,
which the driver waits for in `tell_host`) with the guest's own work per page
(taking pages off or onto its lists, and for a deflate freeing them, which
with page poisoning writes every page). Only the first differs between two
devices. The tracer times both per call, in the guest: the driver's work item
handles one buffer (up to 256 pages) and `tell_host` inside it is the wait
for the device. Only three functions are traced, so the tracer's own cost is
a few entries per buffer, the same on either device.

`parse_function_graph` is pure (tested on text alone); `trace_guest` runs a
change in a guest with the tracer on and returns the parsed calls.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

#: The stock driver's work item, one buffer of up to 256 pages in either
#: direction and the write of `actual` after it (6.1 inlines fill_balloon
#: into it; leak_balloon stays a call of its own, which tells the two apart),
#: and the wait for the device inside it.
WORK, DEFLATE, WAIT = "update_balloon_size_func", "leak_balloon", "tell_host"

TRACEFS = "/sys/kernel/tracing"
#: Enough for a few thousand calls (three lines each); the default is per CPU and small.
BUFFER_KB = 8192

# " 0) ! 196.105 us  |    tell_host [virtio_balloon]();"   a call with no traced callee
# " 0)               |  leak_balloon [virtio_balloon]() {"  a call with traced callees, opened
# " 0) # 4100.8 us   |  }"                                  ... and closed (a comment may follow)
_LINE = re.compile(r"^\s*\d+\)\s+[-+!#*@$]?\s*(?:(?P<us>\d+(?:\.\d+)?) us)?\s*\|\s*(?P<what>.*?)\s*$")
_NAME = re.compile(r"^(?P<name>\w+)(?: \[\w+\])?\(\)\s*(?P<kind>[;{])")


@dataclass
class DriverCalls:
    """Per-call durations (µs) of one traced change, in the order they ran."""

    inflate: list[float] = field(default_factory=list)  # each inflating work item, whole
    deflate: list[float] = field(default_factory=list)  # each deflating work item, whole
    inflate_waits: list[float] = field(default_factory=list)  # tell_host inside an inflating one
    deflate_waits: list[float] = field(default_factory=list)  # tell_host inside a deflating one

    def extend(self, other: DriverCalls) -> None:
        for f in fields(self):
            getattr(self, f.name).extend(getattr(other, f.name))

    def median(self, name: str) -> float | None:
        values: list[float] = getattr(self, name)
        return statistics.median(values) if values else None


def parse_function_graph(text: str) -> DriverCalls:
    """The stock driver's buffers in a function_graph trace of `WORK`,
    `DEFLATE` and `WAIT`: a work item that called leak_balloon was a
    deflate, one that waited for the device without it an inflate, one that
    did not wait sent nothing. A call the trace holds only half of (its
    opening lost when the buffer wrapped, or still open at the end) is left
    out; lines of anything else (interrupts, markers, headers) are skipped."""
    calls = DriverCalls()
    stack: list[str] = []  # open calls, innermost last
    deflating, waits = False, list[float]()  # of the work item open now
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        what, us = m.group("what"), m.group("us")
        if what.startswith("}"):
            if not stack:
                continue  # its opening was lost
            if stack.pop() == WORK and us is not None and waits:
                (calls.deflate if deflating else calls.inflate).append(float(us))
                (calls.deflate_waits if deflating else calls.inflate_waits).extend(waits)
            continue
        name = _NAME.match(what)
        if name is None:
            continue
        if name.group("kind") == "{":
            if name.group("name") == WORK:
                stack, deflating, waits = [], False, list[float]()
            elif not stack:
                continue  # not inside a work item the trace holds whole
            elif name.group("name") == DEFLATE:
                deflating = True
            stack.append(name.group("name"))
        elif name.group("name") == WAIT and stack and us is not None:
            waits.append(float(us))
    return calls


class TraceUnavailable(Exception):
    """The guest kernel has no tracer, or the driver's functions are not
    traceable (inlined, renamed)."""


class Guest(Protocol):
    def sh(self, cmd: str, timeout: float = ...) -> str: ...


def trace_guest(vm: Guest, change: Callable[[], None]) -> DriverCalls:
    """Run `change` (which returns once the balloon is where it asked) with
    the guest's function-graph tracer on the stock driver's three functions;
    the tracer is off again afterwards, whatever happened. TraceUnavailable
    before `change` runs if the guest cannot trace the driver."""
    functions = " ".join((WORK, DEFLATE, WAIT))
    missing = vm.sh(f"grep -q ' {TRACEFS} ' /proc/mounts || mount -t tracefs nodev {TRACEFS}; cd {TRACEFS} && "
                    f"for f in {functions}; do grep -q \"^$f \" available_filter_functions || echo $f; done").split()
    if missing:
        raise TraceUnavailable(f"the guest kernel cannot trace {', '.join(missing)}")
    vm.sh(f"cd {TRACEFS} && "
          f"echo 0 > tracing_on && echo nop > current_tracer && echo '{functions}' > set_ftrace_filter && "
          f"echo {BUFFER_KB} > buffer_size_kb && echo function_graph > current_tracer && "
          "echo > trace && echo 1 > tracing_on")
    try:
        change()
        text = vm.sh(f"cd {TRACEFS} && echo 0 > tracing_on && cat trace", timeout=120)
    finally:
        vm.sh(f"cd {TRACEFS} && echo 0 > tracing_on && echo nop > current_tracer && echo > set_ftrace_filter")
    return parse_function_graph(text)
