"""The product on a real guest: QEMU 10.2's generic vhost-user device, the
stock Linux virtio_balloon driver, and balloond in a subprocess.

These are the proof that the daemon works: every number checked here comes
from the guest (/proc/meminfo), from QEMU (RssShmem), from the guest-RAM
memfd itself (allocated blocks) or from the daemon's API.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from harness import Vm, VhostUserBalloon
from harness.daemon import DaemonProcess
from tests.e2e.conftest import ENGINES
from tests.e2e.waiting import MIB, wait_for

pytestmark = pytest.mark.vm
#: The device's behaviour with a real guest: on both vhost-user engines.
E2E_ENGINES = ENGINES



def boot(make_vm: Callable[..., Vm], daemon: DaemonProcess, kernel: str, **kwargs: Any) -> Vm:
    kwargs.setdefault("memory_mib", 512)
    return make_vm(kernel, balloon=VhostUserBalloon(daemon.sockets["guest"]), load_balloon=True, **kwargs)


def reach(daemon: DaemonProcess, nbytes: int, timeout: float = 180.0) -> dict[str, Any]:
    """Set the target and wait until the guest reports that balloon size and
    the daemon has done every discard it deferred (up to --discard-delay-ms
    after the last inflate), so host memory can be measured."""
    daemon.api.set_target("guest", nbytes)
    return wait_for(
        f"the guest to report a {nbytes // MIB} MiB balloon",
        lambda: (vm := daemon.api.vm("guest"))["actual_bytes"] == nbytes and vm["ballooned_bytes"] == nbytes
        and vm["pending_discard_bytes"] == 0 and vm,
        timeout,
    )


# --------------------------------------------------------------------------- inflate


@pytest.mark.daemon_args("--no-deflate-on-oom")
def test_inflate_half_ram_returns_host_memory_and_deflate_restores(make_vm, daemon, kernel):
    # page_poison=1: free page reporting then frees nothing (the guest expects
    # its poison back) and every free page is dirty, so what the host gets
    # back below is the balloon's doing alone.
    vm = boot(make_vm, daemon, kernel, cmdline=["page_poison=1"])
    wait_for("the device to start", lambda: daemon.api.vm("guest")["running"])
    info = daemon.api.vm("guest")
    assert "PAGE_POISON" in info["features"] and "DEFLATE_ON_OOM" not in info["features"]
    total_before = vm.meminfo()["MemTotal"] * 1024
    rss_before, file_before = vm.rss_shmem(), vm.memfd_allocated_bytes()

    balloon = 256 * MIB  # half of the guest's 512 MiB
    state = reach(daemon, balloon)

    assert state["ballooned_bytes"] == balloon
    assert total_before - vm.meminfo()["MemTotal"] * 1024 == balloon
    rss_drop = rss_before - vm.rss_shmem()
    file_drop = file_before - vm.memfd_allocated_bytes()
    assert rss_drop >= 0.95 * balloon, f"QEMU's RssShmem fell by {rss_drop // MIB} MiB only"
    assert file_drop >= 0.95 * balloon, f"the memfd shrank by {file_drop // MIB} MiB only"
    assert state["host_freed_bytes"] >= 0.95 * balloon
    assert state["counters"]["guest_errors"] == 0 and state["counters"]["invalid_pfn"] == 0

    # the tracker's frames are exactly the ones the guest ballooned: count matches
    pfns = daemon.api.pfns("guest")
    assert pfns["count"] * 4096 == balloon

    reach(daemon, 0)
    assert vm.meminfo()["MemTotal"] * 1024 == total_before
    assert daemon.api.pfns("guest")["count"] == 0


# --------------------------------------------------------------------------- stats, reporting, OOM


@pytest.mark.daemon_args("--stats-interval", "1")
def test_stats_arrive_and_refresh_at_the_interval(make_vm, daemon, recent_kernel):
    vm = boot(make_vm, daemon, recent_kernel)
    first = wait_for("a stats sample", lambda: daemon.api.vm("guest")["stats_updated_at"])
    time.sleep(3.5)
    info = daemon.api.vm("guest")
    assert info["stats_updated_at"] - first >= 2.0, "stats did not refresh about once a second"
    stats = info["stats"]
    total = vm.meminfo()["MemTotal"] * 1024
    assert abs(stats["total_memory"] - total) <= 64 * MIB
    assert 0 < stats["free_memory"] <= stats["total_memory"]
    # Linux 6.12 sends the tags added in that release (7.3 sends the same set)
    assert {"oom_kills", "alloc_stalls", "direct_reclaims"} <= set(stats)
    # and the interval can change at run time: samples now come about 0.5 s
    # apart, which the old 1 s interval cannot do
    daemon.api.put("/v1/vms/guest/stats-interval", {"seconds": 0.5})
    t0 = daemon.api.vm("guest")["stats_updated_at"]
    wait_for("a sample after the change", lambda: daemon.api.vm("guest")["stats_updated_at"] > t0, 10, 0.05)
    seen: list[float] = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        at = daemon.api.vm("guest")["stats_updated_at"]
        if not seen or at != seen[-1]:
            seen.append(at)
        time.sleep(0.05)
    gaps = sorted(b - a for a, b in zip(seen, seen[1:]))
    assert len(gaps) >= 5, f"only {len(seen)} samples in 4 s at a 0.5 s interval: {gaps}"
    assert 0.4 <= gaps[len(gaps) // 2] <= 0.7, f"median gap {gaps[len(gaps) // 2]:.2f}s, want about 0.5: {gaps}"


def test_free_page_reporting_returns_freed_guest_memory(make_vm, daemon, recent_kernel):
    vm = boot(make_vm, daemon, recent_kernel)
    wait_for("the device to start", lambda: daemon.api.vm("guest")["running"])
    assert "REPORTING" in daemon.api.vm("guest")["features"]
    # Let the boot-time reports settle, then make 200 MiB resident and hold
    # it: the peak is measured before anything is freed, so reports that
    # start while the harness is still talking to the guest cannot hide in it.
    time.sleep(5)
    holder = vm.start_hold(200)
    before_reported = daemon.api.vm("guest")["reported_freed_bytes"]
    peak = vm.memfd_allocated_bytes()
    vm.sh(f"kill {holder}; while kill -0 {holder} 2>/dev/null; do sleep 0.1; done")
    returned = wait_for(
        "free page reporting to return at least 100 MiB to the host",
        lambda: (d := peak - vm.memfd_allocated_bytes()) >= 100 * MIB and d,
        60,
    )
    state = daemon.api.vm("guest")
    # Nothing but a report discards here, so the daemon's measured count
    # covers at least what the host got back.
    assert state["reported_freed_bytes"] - before_reported >= returned
    assert state["ballooned_bytes"] == 0  # reporting is not ballooning


def test_deflate_on_oom_lets_the_guest_allocate_past_its_limit(make_vm, daemon, recent_kernel):
    vm = boot(make_vm, daemon, recent_kernel)
    reach(daemon, 384 * MIB)
    free_mib = vm.meminfo()["MemAvailable"] // 1024
    want = free_mib + 160  # more than the guest has without the balloon's memory
    out = vm.sh(f"guesttool alloc {want} 16 > /tmp/alloc.log 2>&1 & pid=$!; "
                "while ! grep -q 'ALLOC READY' /tmp/alloc.log; do kill -0 $pid || break; sleep 0.2; done; "
                "cat /tmp/alloc.log; kill $pid", timeout=300)
    assert "ALLOC READY" in out, out[-2000:]
    info = daemon.api.vm("guest")
    assert info["actual_bytes"] < 384 * MIB, "the balloon did not give memory back under OOM"
    # The driver's OOM notifier sends the deflate before it writes `actual`
    # (and its size worker may be inflating back towards the target), so the
    # two agree once the guest is quiet, not at every instant.
    wait_for("the daemon's frames to match the guest's balloon",
             lambda: (v := daemon.api.vm("guest"))["ballooned_bytes"] == v["actual_bytes"], 30)


# --------------------------------------------------------------------------- lifecycle


def test_new_qemu_on_the_same_socket_gets_a_fresh_device(make_vm, daemon):
    vm = boot(make_vm, daemon, "6.12", name="first")
    reach(daemon, 64 * MIB)
    vm.poweroff()
    wait_for("the daemon to see QEMU go", lambda: not daemon.api.vm("guest")["connected"], 30)
    vm2 = boot(make_vm, daemon, "6.12", name="second")
    info = wait_for("the second QEMU to connect", lambda: (v := daemon.api.vm("guest"))["connected"] and v)
    assert info["connections"] == 2
    # the target belongs to the VM: the new guest's driver reads it at probe
    state = wait_for("the new guest to reach the kept target",
                     lambda: (v := daemon.api.vm("guest"))["actual_bytes"] == 64 * MIB and v)
    assert state["ballooned_bytes"] == 64 * MIB
    assert vm2.sh("echo alive").strip() == "alive"


def test_qmp_stop_cont_and_driver_reload_keep_the_balloon_working(make_vm, daemon, recent_kernel):
    vm = boot(make_vm, daemon, recent_kernel)
    reach(daemon, 64 * MIB)
    vm.qmp("stop")
    vm.qmp("cont")
    state = reach(daemon, 96 * MIB)  # stop/cont replayed the start sequence; still works
    assert state["ballooned_bytes"] == 96 * MIB
    vm.sh("rmmod virtio_balloon")  # the driver deflates everything on removal
    wait_for("the balloon to empty on rmmod", lambda: daemon.api.vm("guest")["ballooned_bytes"] == 0, 60)
    vm.load_module("virtio_balloon")
    state = wait_for("the reloaded driver to reach the target",
                     lambda: (v := daemon.api.vm("guest"))["ballooned_bytes"] == 96 * MIB and v)
    assert state["counters"]["guest_errors"] == 0
    reach(daemon, 32 * MIB)


def test_guest_data_survives_repeated_inflate_and_deflate(make_vm, daemon, kernel):
    vm = boot(make_vm, daemon, kernel)
    pid = vm.start_hold(160)
    for size in (200, 0, 240, 64, 0):
        reach(daemon, size * MIB)
    ok, bad = vm.verify_hold(pid)
    assert ok, f"{bad} pages of the guest's data changed"
    info = daemon.api.vm("guest")
    assert info["counters"]["stray_deflate"] == 0 and info["counters"]["double_inflate"] == 0
