"""What a comparison with QEMU's built-in balloon needs so that it measures
the two devices and nothing else: the guest does the same work on both, and
watching the balloon costs neither of them.

The same work. The built-in `virtio-balloon-pci` offers, by default, neither
deflate-on-oom nor free page reporting, and asks for no statistics;
balloond offers all three by default. So balloond is started without them
(`BALLOOND_ARGS`). Free page reporting matters most: a guest that has it
scans and reports its free lists about 2 s after pages are freed, which on
a benchmark that inflates and deflates in turn lands in the middle of a
later change. Turned on for the built-in device instead (free-page-reporting=on
and statistics every 5 s), the built-in's own deflate time rose by about a
tenth in one run of three rounds on a 2-core host.

The guest boots with page_poison=1 on both (`GUEST_CMDLINE`): every page it
frees is written, so a deflated page is allocated on the host again before
the next inflation, and what an inflation gives back is measurable.

Watching costs nothing extra. Waiting for the balloon to reach a target reads
the daemon's state from its supervisor's last report (`balloond_at`), not
with `?fresh=1`. The worker reports at once when the balloon comes to rest
at its target (docs/api.md, "Freshness"), so the wait ends as promptly.
A fresh read, every 20 ms, would ask the VM's worker each time, in the
middle of the change: about 0.4 ms of the worker's CPU and 0.9 ms of the
supervisor's per read (measured through a socket with no guest), on a host
whose two cores the guest's vCPU also needs. QEMU answers its query-balloon
from the main loop with no such cost.
"""

from __future__ import annotations

from harness.daemon import ApiClient

#: balloond offers what QEMU's built-in balloon offers by default.
BALLOOND_ARGS = ("--no-deflate-on-oom", "--no-free-page-reporting", "--stats-interval", "0")

#: The guest's kernel command line on both devices.
GUEST_CMDLINE = ("page_poison=1",)


def balloond_at(api: ApiClient, vm: str, nbytes: int) -> bool:
    """Whether `vm`'s balloon is at `nbytes` (the guest's `actual`) with
    every discard done, from the supervisor's last report of the worker."""
    status = api.vm(vm, fresh=False)
    return status["actual_bytes"] == nbytes and status["pending_discard_bytes"] == 0
