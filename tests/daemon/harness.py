"""Test-only helpers on top of the shared daemon runner (harness/daemon.py)."""

from __future__ import annotations

import re
import warnings

import signal
from typing import TYPE_CHECKING

from harness.daemon import REPO, ApiClient, ApiError, DaemonProcess  # noqa: F401  (re-exported for the tests)

if TYPE_CHECKING:
    from tests.frontend import TestFrontend


def crash_and_restart(daemon: DaemonProcess) -> None:
    """SIGKILL the daemon (no chance to flush anything) and start it again."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    daemon.start()


def reconnect(fe: "TestFrontend", features: int | None = None) -> None:
    """What a reconnecting QEMU does after its backend died: the rings stay
    as they are in the shared GuestRam and resume from the used indices."""
    fe.close()
    for q in fe.queues.values():
        q.base = q.read_used_idx()
    fe.connect()
    fe.start(features)


#: What the daemon logs when it reads an avail index more than a queue ahead
#: of its own. On this project's sandboxes (nested virtualisation) a 16-bit
#: word that another process is writing is now and then misread as 0 across
#: processes (reproduced without balloond: two processes on one memfd), which
#: shows up as exactly this. A daemon bug would show other reasons.
SHARED_MEMORY_GLITCH = re.compile(r"avail index moved \d+ entries ahead of a queue")


def assert_no_guest_errors(daemon: "DaemonProcess", vm: str = "vm0") -> None:
    """The VM's device counted no guest error in this test, or only misreads
    of a racing avail index (see SHARED_MEMORY_GLITCH), which warn."""
    count = daemon.api.vm(vm)["counters"]["guest_errors"]
    if count == 0:
        return
    since = getattr(daemon, "test_log_start", 0)
    reasons = [
        str(r.get("reason", ""))
        for r in daemon.log_records(since)
        if r.get("event") == "bad buffer from guest" and r.get("vm") == vm
    ]
    if reasons and all(SHARED_MEMORY_GLITCH.search(x) for x in reasons):
        warnings.warn(f"{vm}: {count} guest error(s) from misread shared memory: {reasons[:3]}")
        return
    raise AssertionError(f"{vm}: {count} guest error(s): {reasons[:5]}")


def worker(d: DaemonProcess, vm: str) -> dict:
    """The VM's worker as the API shows it (state, pid, restarts, last_exit)."""
    return d.api.vm(vm)["worker"]


def restarted(d: DaemonProcess, vm: str, times: int = 1, timeout: float = 10.0) -> dict:
    """Wait until the VM's worker runs again after its `times`-th restart."""
    state = d.wait_vm(vm, lambda s: s["worker"]["state"] == "running" and s["worker"]["restarts"] == times,
                      timeout, f"{vm}'s worker restarted {times} time(s)")
    return state["worker"]
