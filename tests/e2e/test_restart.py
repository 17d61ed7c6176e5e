"""Kill -9 the daemon in the middle of an inflation, start it again, twenty
times, while the guest keeps running: QEMU (built with the project's
vhost-user-base reconnect patch) reconnects, the daemon restores the balloon
from --state-dir, and the guest reaches every target with its data intact.
"""

from __future__ import annotations

import random
import time

import pytest

from harness import VhostUserBalloon
from harness.daemon import DaemonProcess
from tests.e2e.conftest import ENGINES
from tests.e2e.test_guest_driver import MODULE, build_module, guest_pfns
from tests.e2e.waiting import MIB, wait_for

pytestmark = [pytest.mark.vm, pytest.mark.slow]

RESTARTS = 20
#: Restoring from --state-dir after a crash, on both vhost-user engines.
E2E_ENGINES = ENGINES


def guest_summary(vm) -> tuple[int, int]:
    """(count, sum) of the driver's ballooned frames, computed in the guest."""
    out = vm.sh("awk '{n++; s+=$1} END {printf \"%d %.0f\\n\", n, s}' /sys/kernel/debug/balloond/pfns")
    n, s = out.split()
    return int(n), int(s)


def test_daemon_killed_mid_inflation_twenty_times(make_vm, tmp_path, engine):
    daemon = DaemonProcess(tmp_path / "daemon", vms=("guest",), log_level="info",
                           extra_args=["--state-dir", str(tmp_path / "state"), "--stats-interval", "1",
                                       "--engine", engine])
    daemon.start()
    try:
        ko = build_module("6.12")
        vm = make_vm("6.12", memory_mib=768, modules=[ko],
                     balloon=VhostUserBalloon(daemon.sockets["guest"], chardev_options="reconnect-ms=200"))
        vm.sh(f"insmod /lib/modules/{MODULE}.ko")
        wait_for("the device to start", lambda: daemon.api.vm("guest")["running"])
        pid = vm.start_hold(48)
        qemu_pid = vm.qemu_pid
        rng = random.Random(7)
        # Every step at least 64 MiB, the wrap from the last size to the first too.
        sizes = [64, 256, 128, 320, 32, 288, 160, 0, 224, 128]
        previous = 0
        kills = missed = 0
        i = 0
        while kills < RESTARTS:
            assert i < 4 * RESTARTS, f"only {kills} of {i} balloon changes could be caught midway ({missed} missed)"
            target = sizes[i % len(sizes)] * MIB
            i += 1
            daemon.api.set_target("guest", target)
            # Kill once the balloon has covered a random 5-45 % of the way:
            # mid-change, with far more than one 1 MiB batch still to go. A
            # change the guest finished between two looks (a deflate of
            # 100 MiB can take less than one API read) is let be: nothing
            # to kill it in.
            way = abs(target - previous)
            fraction = rng.uniform(0.05, 0.45)

            def moved() -> int | None:
                b = daemon.api.vm("guest")["ballooned_bytes"]
                return b if b != previous and abs(b - previous) >= fraction * way else None

            mid = wait_for(f"step {i}: the balloon to move {fraction:.0%} of the way to {target // MIB} MiB",
                           lambda: (b := moved()) is not None and (b,), 120, 0.01)[0]
            if mid == target:
                missed += 1
                wait_for(f"step {i}: the balloon to settle at {target // MIB} MiB", lambda: guest_summary(vm)[0] * 4096 == target)
                previous = target
                continue
            daemon.kill()  # all of it: a worker must not outlive its supervisor here
            # With the daemon dead the driver cannot go on (it waits for the
            # batch in flight): what it holds is the balloon at the kill, and
            # it lies strictly between where it started and the target
            at_kill, _ = guest_summary(vm)
            time.sleep(0.3)
            assert guest_summary(vm)[0] == at_kill, f"step {i}: the guest's balloon moved without the daemon"
            low, high = sorted((previous, target))
            if at_kill * 4096 == target:
                missed += 1  # it finished between the look and the kill: a restart all the same
            else:
                assert low < at_kill * 4096 < high, \
                    f"step {i}: the kill came at {at_kill * 4096 // MIB} MiB (seen {mid // MIB} MiB before it), " \
                    f"not between {low // MIB} and {high // MIB}"
                kills += 1
            daemon.start()
            assert vm.running, f"QEMU died after the daemon restart of step {i}"
            def reached() -> bool:
                v = daemon.api.vm("guest")
                # running: the device started, so the journal has been settled
                # (before that a reconnected VM reports an empty balloon)
                return v["connected"] and v["running"] and v["actual_bytes"] == target \
                    and v["ballooned_bytes"] == target and v["pending_discard_bytes"] == 0

            deadline = time.monotonic() + 180
            while not reached():
                if time.monotonic() > deadline:
                    v = daemon.api.vm("guest")
                    pytest.fail(
                        f"step {i}: the guest did not reach {target // MIB} MiB: "
                        f"{ {k: v[k] for k in ('connected', 'running', 'target_bytes', 'actual_bytes', 'ballooned_bytes')} } "
                        f"counters {v['counters']}; guest driver: {vm.sh('cat /sys/kernel/debug/balloond/stats')}\n"
                        f"daemon log:\n{daemon.log_tail(30)}"
                    )
                time.sleep(0.25)
            state = daemon.api.vm("guest")
            n, s = guest_summary(vm)
            pfns = daemon.api.pfns("guest")
            assert n * 4096 == target and pfns["count"] == n, f"step {i}: guest {n} frames, daemon {pfns['count']}"
            assert sum(first * count + count * (count - 1) // 2 for first, count in pfns["ranges"]) == s
            # host memory: what the guest does not use is not held
            resident = vm.memfd_allocated_bytes()
            assert resident <= 768 * MIB - 0.95 * target, f"step {i}: {resident // MIB} MiB still resident"
            assert state["counters"]["guest_errors"] == 0
            previous = target
        assert vm.qemu_pid == qemu_pid
        assert daemon.api.pfn_set("guest") == guest_pfns(vm)
        ok, bad = vm.verify_hold(pid)
        assert ok, f"{bad} pages of the guest's data changed"
        served = {r.get("engine", "pure") for r in daemon.log_records() if r.get("event") == "frontend connected"}
        assert served == {engine}, f"served by {served}, not {engine}"
        print(f"\n{kills} daemon kills midway survived in {i} balloon changes ({missed} finished before a kill could "
              f"land midway); last balloon {state['ballooned_bytes'] // MIB} MiB")
    finally:
        daemon.stop()
