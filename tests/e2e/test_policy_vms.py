"""The overcommit policy on three real guests, one daemon, and QEMU's run
state over QMP.

Three idle 6.12 guests (512 MiB, TCG) on a simulated host that starts below
its reserve: the policy inflates their balloons until the host is back above
it. One guest then allocates a large block: memory flows back to it and the
allocation completes. Another is paused over QMP: the policy leaves its target
alone (the decision says why) until it runs again.

The daemon has a QMP socket of its own per guest (QEMU serves one client per
`-qmp` socket and the harness holds the first) and connects to it with
retries: it listens before QEMU starts.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from harness import VhostUserBalloon, Vm
from harness.daemon import ApiError, DaemonProcess
from tests.e2e.conftest import ENGINES, assert_served_by
from tests.e2e.waiting import MIB, wait_for

pytestmark = pytest.mark.vm

#: The policy steers balloons served by either engine.
E2E_ENGINES = ENGINES

NAMES = ("g0", "g1", "g2")
STEP = 64 * MIB
RESERVE = 256 * MIB
HEADROOM = 96 * MIB
#: Guest RAM resident after boot + `guesttool dirty 300` without free page
#: reporting is about 330-420 MiB per guest: a host of this size starts below
#: its reserve and gets above it once the balloons return some of it.
SIMULATED_HOST = 1216 * MIB


class Watcher:
    """Polls the API in a thread: the peak of ballooned memory, every policy decision seen.

    A poll may miss while the daemon is busy (a timeout, a reset connection,
    an error answer): that is counted. Anything else is a bug in the test or
    the daemon and is raised by `check()`, as is a watcher that saw nothing."""

    MISSES = (OSError, ApiError, http.client.HTTPException, json.JSONDecodeError)

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.peak_ballooned = 0
        self.decisions: dict[float, dict[str, Any]] = {}
        self.polls = 0
        self.misses: list[str] = []
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.polls += 1
            try:
                vms = self.daemon.api.vms()
                self.peak_ballooned = max(self.peak_ballooned, sum(v["ballooned_bytes"] for v in vms))
                last = self.daemon.api.get("/v1/policy")["last"]
                if last:
                    self.decisions[last["at"]] = last
            except self.MISSES as exc:
                self.misses.append(repr(exc))
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread by check()
                self.failure = exc
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def check(self) -> None:
        """After stop(): fail if the watcher broke or saw too little to go by."""
        assert not self._thread.is_alive(), "the API watcher is stuck"
        if self.failure is not None:
            raise AssertionError(f"the API watcher failed: {self.failure!r}") from self.failure
        assert self.polls - len(self.misses) >= max(1, self.polls // 2), \
            f"{len(self.misses)} of {self.polls} API polls failed; last: {self.misses[-3:]}"
        assert self.decisions, "the watcher saw no policy decision"


def policy(daemon: DaemonProcess) -> dict[str, Any]:
    return daemon.api.get("/v1/policy")


def decision_for(daemon: DaemonProcess, name: str) -> dict[str, Any] | None:
    last = policy(daemon)["last"]
    return next((v for v in last["vms"] if v["name"] == name), None) if last else None


def test_three_guests_reclaim_give_back_and_pause(vm_environment, tmp_path, engine):
    sockdir = Path(tempfile.mkdtemp(prefix="bd-pol-"))
    qmp = {n: str(sockdir / f"{n}.qmp") for n in NAMES}
    daemon = DaemonProcess(
        sockdir / "d", NAMES, stats_interval=1, log_level="info",
        vm_options={n: f"qmp={qmp[n]},headroom={HEADROOM >> 20}M" for n in NAMES},
        extra_args=["--policy", "--policy-interval", "2", "--policy-simulate-host", f"{SIMULATED_HOST >> 20}M",
                    "--host-reserve", f"{RESERVE >> 20}M", "--policy-step", f"{STEP >> 20}M",
                    "--no-free-page-reporting", "--engine", engine],
    )
    daemon.start()
    vms: dict[str, Vm] = {}
    watcher: Watcher | None = None
    ok = False
    try:
        for n in NAMES:
            vms[n] = Vm("6.12", name=n, memory_mib=512, balloon=VhostUserBalloon(daemon.sockets[n]),
                        load_balloon=True, log_dir=tmp_path / n,
                        qemu_args=["-qmp", f"unix:{qmp[n]},server=on,wait=off"])
            vms[n].start()
        for vm in vms.values():
            vm.wait_boot()
        # QMP links up and the guests' memory made resident (no free page reporting)
        wait_for("the daemon's QMP links", lambda: all(
            v["qmp_connected"] and v["run_state"] == "running" for v in daemon.api.vms()), 60)
        # The discard guard walked each real QEMU's devices (the balloon is
        # one), found no VFIO device and no migration, and let discards go.
        wait_for("discards allowed", lambda: all(v["discard_inhibited"] is None for v in daemon.api.vms()), 30)
        for v in daemon.api.vms():
            guard = v["discard_guard"]
            assert guard["devices_seen"] >= 1 and guard["vfio_devices"] == [], guard
            assert guard["migration_status"] == "none", guard
        for vm in vms.values():
            vm.sh("guesttool dirty 300", timeout=300)
        watcher = Watcher(daemon)
        resident = {v["name"]: v["resident_bytes"] for v in daemon.api.vms()}
        print(f"\nresident after dirty: { {k: v >> 20 for k, v in resident.items()} } MiB")

        # 1. all idle: the policy reclaims until the host is back above its reserve
        def host_ok() -> Any:
            last = policy(daemon)["last"]
            reclaimed = last and sum(v["new_target_bytes"] for v in last["vms"]) > 0
            return reclaimed and last["host"]["available_bytes"] >= RESERVE and last
        wait_for("the simulated host to get back above its reserve", host_ok, 240, 1)
        vms_now = {v["name"]: v for v in daemon.api.vms()}
        assert sum(v["target_bytes"] for v in vms_now.values()) > 0
        print(f"reclaimed: targets { {k: v['target_bytes'] >> 20 for k, v in vms_now.items()} } MiB")

        # 2. g1 allocates a large block: memory flows back to it and it does not OOM
        g1 = vms["g1"]
        target_before = daemon.api.vm("g1")["target_bytes"]
        avail = g1.meminfo()["MemAvailable"] // 1024
        want = max(64, avail - 24)
        g1.sh(f"guesttool alloc {want} 8 > /tmp/alloc.log 2>&1 & echo $! > /tmp/alloc.pid")
        wait_for("g1's target to shrink", lambda: daemon.api.vm("g1")["target_bytes"] < target_before, 180, 1)
        wait_for("g1's allocation to complete", lambda: "ALLOC READY" in g1.sh("cat /tmp/alloc.log"), 300, 2)
        assert g1.run("kill -0 $(cat /tmp/alloc.pid)")[0] == 0, "the allocating process died"
        assert g1.sh("dmesg | grep -c 'Out of memory' || true").strip() == "0", g1.sh("dmesg | tail -30")
        assert daemon.api.vm("g1")["stats"].get("oom_kills", 0) == 0

        # 3. g2 paused over QMP: the policy leaves its target alone, and says why
        vms["g2"].qmp("stop")
        wait_for("the daemon to see g2 paused", lambda: daemon.api.vm("g2")["run_state"] == "paused", 30)
        frozen = daemon.api.vm("g2")["target_bytes"]
        ticks = policy(daemon)["ticks"]
        wait_for("three policy intervals", lambda: policy(daemon)["ticks"] >= ticks + 3, 30)
        d = decision_for(daemon, "g2")
        assert d is not None and d["action"] == "skip" and d["reason"] == "VM paused (QMP)", d
        assert daemon.api.vm("g2")["target_bytes"] == frozen
        vms["g2"].qmp("cont")
        wait_for("g2 managed again", lambda: daemon.api.vm("g2")["run_state"] == "running"
                 and (dd := decision_for(daemon, "g2")) is not None and "QMP" not in dd["reason"], 30)
        ok = True
    finally:
        if watcher is not None:
            watcher.stop()
        for vm in vms.values():
            vm.kill() if not ok else vm.close()
        daemon.stop()
        print(f"balloond log: {daemon.log_path}")

    assert watcher is not None
    watcher.check()
    # every target the policy set: steps within the configured step, floors kept
    targets = daemon.policy_targets()
    steps = [abs(r["target_bytes"] - r["old_bytes"]) for r in targets]
    assert steps, "the policy never moved a target"
    first = targets[0]
    assert first["action"] == "inflate" and "below its reserve" in first["reason"], first
    largest = max(steps)
    for dec in watcher.decisions.values():
        for v in dec["vms"]:
            i = v["inputs"]
            if v["action"] == "inflate" and "floor_bytes" in i:
                assert i["guest_ram_bytes"] - v["new_target_bytes"] >= i["floor_bytes"] - 4096, v
    print(f"host memory reclaimed at the peak: {watcher.peak_ballooned >> 20} MiB ballooned; "
          f"largest target step: {largest >> 20} MiB (configured {STEP >> 20} MiB); "
          f"{len(steps)} targets set, {len(watcher.decisions)} decisions seen")
    assert largest <= STEP
    assert_served_by(daemon, engine)
