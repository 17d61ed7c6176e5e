"""One host, two kinds of balloon, one policy.

Guest "ours" has balloond's vhost-user device; guest "builtin" has QEMU's
own virtio-balloon-pci and the stock driver, and balloond reaches it only
through its QMP socket (`--vm builtin=qmp:PATH`). Both boot with
page_poison=1, so every free page is written (all of guest RAM is resident,
and only a discard can free any of it), and idle on a simulated host that is
short by more than one guest can give: the policy has to reclaim from both,
and the host gets the memory back from both (QEMU's own discards for one,
ours for the other). Then the built-in guest allocates a large block: the
policy gives it memory back and it does not OOM.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from harness import BuiltinBalloon, VhostUserBalloon, Vm
from harness.daemon import DaemonProcess
from tests.e2e.conftest import ENGINES, assert_served_by
from tests.e2e.waiting import MIB, wait_for

pytestmark = pytest.mark.vm

#: The policy steers balloons served by either engine.
E2E_ENGINES = ENGINES

STEP = 64 * MIB
RESERVE = 256 * MIB
HEADROOM = 96 * MIB
#: Resident with page_poison=1: all 512 MiB of the vhost-user guest's RAM,
#: and RAM plus QEMU's own memory for the built-in one (balloond counts QEMU's
#: whole resident set there): ~1.1 GiB. A host of this size is short by
#: ~500 MiB with its reserve, more than either guest can give alone
#: (RAM - used - headroom, ~350 MiB).
SIMULATED_HOST = 832 * MIB
RAM = 512 * MIB


def test_policy_steers_our_balloon_and_qemus_builtin_one(vm_environment, tmp_path, engine):
    sockdir = Path(tempfile.mkdtemp(prefix="bd-mix-"))
    qmp = {"ours": str(sockdir / "ours.qmp"), "builtin": str(sockdir / "builtin.qmp")}
    daemon = DaemonProcess(
        sockdir / "d", ("ours",), stats_interval=1, log_level="info",
        vm_options={"ours": f"qmp={qmp['ours']},headroom={HEADROOM >> 20}M"},
        extra_args=["--vm", f"builtin=qmp:{qmp['builtin']},headroom={HEADROOM >> 20}M",
                    "--policy", "--policy-interval", "2", "--policy-simulate-host", f"{SIMULATED_HOST >> 20}M",
                    "--host-reserve", f"{RESERVE >> 20}M", "--policy-step", f"{STEP >> 20}M",
                    "--no-free-page-reporting", "--engine", engine],
    )
    daemon.start()
    vms: dict[str, Vm] = {}
    ok = False
    try:
        vms["ours"] = Vm("6.12", name="ours", memory_mib=512, balloon=VhostUserBalloon(daemon.sockets["ours"]),
                         load_balloon=True, cmdline=["page_poison=1"], log_dir=tmp_path / "ours",
                         qemu_args=["-qmp", f"unix:{qmp['ours']},server=on,wait=off"])
        vms["builtin"] = Vm("6.12", name="builtin", memory_mib=512,
                            balloon=BuiltinBalloon({"deflate-on-oom": "on"}), load_balloon=True,
                            cmdline=["page_poison=1"],
                            log_dir=tmp_path / "builtin",
                            qemu_args=["-qmp", f"unix:{qmp['builtin']},server=on,wait=off"])
        for vm in vms.values():
            vm.start()
        for vm in vms.values():
            vm.wait_boot()
        wait_for("both VMs managed", lambda: all(v["connected"] and v["run_state"] == "running"
                                                 for v in daemon.api.vms()), 60)
        builtin = daemon.api.vm("builtin")
        assert builtin["kind"] == "qemu" and builtin["device"] == "/machine/peripheral/balloon0", builtin
        assert builtin["guest_ram_bytes"] == 512 * MIB
        # No target inherited: 0, unless the policy (on from the start) already set one.
        # (The log is read after the summary, so a target set in between is in it too.)
        set_by_policy = {r["target_bytes"] for r in daemon.policy_targets() if r["vm"] == "builtin"}
        assert builtin["target_bytes"] in {0} | set_by_policy, (builtin["target_bytes"], set_by_policy)
        assert daemon.api.vm("ours")["kind"] == "vhost-user"
        # QEMU's guest stats reach the policy through the device's QOM property
        wait_for("the built-in guest's stats", lambda: daemon.api.vm("builtin")["stats"].get("free_memory"), 30)
        resident = {v["name"]: v["resident_bytes"] >> 20 for v in daemon.api.vms()}
        print(f"\nresident after boot: {resident} MiB")

        # 1. the policy reclaims from both kinds of guest
        def both_ballooned() -> dict[str, int] | None:
            vms_now = {v["name"]: v for v in daemon.api.vms()}
            sizes = {n: v["actual_bytes"] for n, v in vms_now.items()}
            return sizes if all(s >= 2 * STEP for s in sizes.values()) else None

        sizes = wait_for("balloons in both guests", both_ballooned, 240, 1)
        print(f"ballooned: { {n: s >> 20 for n, s in sizes.items()} } MiB")
        # QEMU's own balloon freed the host memory behind its guest ...
        def builtin_freed() -> tuple[int, int] | None:
            allocated = vms["builtin"].memfd_allocated_bytes()
            ballooned = daemon.api.vm("builtin")["actual_bytes"]
            return (allocated, ballooned) if allocated <= RAM - 0.95 * ballooned else None

        allocated, ballooned = wait_for("QEMU to free the built-in guest's ballooned memory", builtin_freed, 30, 1)
        print(f"built-in guest: {ballooned >> 20} MiB ballooned, guest RAM allocated {allocated >> 20} MiB")
        # ... and ours behind the other (measured on the memfd by the daemon)
        ours = daemon.api.vm("ours")
        assert vms["ours"].memfd_allocated_bytes() <= RAM - 0.95 * ours["ballooned_bytes"], ours
        assert ours["host_freed_bytes"] >= 0.95 * ours["ballooned_bytes"] > 0, ours
        sent = [r for r in daemon.log_records() if r.get("event") == "target sent to QEMU"]
        assert sent, "no target reached QEMU's balloon"
        first = daemon.policy_targets()[0]
        assert "below its reserve" in first["reason"], first

        # 2. the built-in guest allocates a large block: memory flows back to it
        guest = vms["builtin"]
        target_before = daemon.api.vm("builtin")["target_bytes"]
        avail = guest.meminfo()["MemAvailable"] // 1024
        want = max(64, avail - 24)
        guest.sh(f"guesttool alloc {want} 8 > /tmp/alloc.log 2>&1 & echo $! > /tmp/alloc.pid")
        wait_for("the built-in guest's target to shrink",
                 lambda: daemon.api.vm("builtin")["target_bytes"] < target_before, 180, 1)
        wait_for("the allocation to complete", lambda: "ALLOC READY" in guest.sh("cat /tmp/alloc.log"), 300, 2)
        assert guest.run("kill -0 $(cat /tmp/alloc.pid)")[0] == 0, "the allocating process died"
        assert guest.sh("dmesg | grep -c 'Out of memory' || true").strip() == "0", guest.sh("dmesg | tail -30")
        gave_back = [r for r in daemon.policy_targets() if r["vm"] == "builtin" and r["action"] == "deflate"]
        assert gave_back, "the policy never deflated the built-in guest's balloon"
        # and the API says plainly what it cannot know about QEMU's balloon
        status, body = daemon.api.call("GET", "/v1/vms/builtin/pfns")
        assert status == 409 and "does not tell" in body["error"], (status, body)
        assert 'balloond_vm_info{kind="qemu",vm="builtin"} 1.0' in daemon.api.metrics()
        ok = True
    finally:
        for vm in vms.values():
            vm.kill() if not ok else vm.close()
        daemon.stop()
        print(f"balloond log: {daemon.log_path}")

    targets = daemon.policy_targets()
    steps = [abs(r["target_bytes"] - r["old_bytes"]) for r in targets]
    moved = {r["vm"] for r in targets}
    print(f"policy targets set: {len(steps)}; largest step {max(steps) >> 20} MiB; VMs moved: {sorted(moved)}")
    assert moved == {"ours", "builtin"}
    assert max(steps) <= STEP
    assert_served_by(daemon, engine)
