"""balloond beside libvirt: Debian's libvirtd (started here, privately:
harness/libvirt.py) runs the project's QEMU (TCG, direct kernel boot of the
test kernel) for two kinds of domain (docs/libvirt.md):

- balloond's own device, added through libvirt's QEMU namespace, with a
  second QMP monitor for balloond beside libvirt's: inflate, deflate, stats,
  and `virsh destroy` / `virsh start` with the daemon following;
- the domain's own `<memballoon model='virtio'>`, steered by balloond only
  through libvirt's API (`--vm NAME=libvirt:URI/DOMAIN`): targets, the stats
  period, statistics, and the domain's lifecycle;
- one policy on a simulated small host across the three kinds of balloon
  (ours in a libvirt domain, QEMU's over QMP, a libvirt domain's through libvirt).

One libvirtd serves the module; each test boots one guest.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import BuiltinBalloon
from harness.daemon import DaemonProcess
from harness.libvirt import LibvirtDaemon, LibvirtVm
from tests.e2e.waiting import MIB, wait_for

pytestmark = pytest.mark.vm

RAM = 512 * MIB
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@pytest.fixture(scope="module")
def libvirtd(vm_environment: None) -> Iterator[LibvirtDaemon]:
    try:
        import libvirt  # noqa: F401 - the daemon's binding, which the harness uses too
    except ImportError:
        pytest.skip("libvirt's Python binding missing; run as root: scripts/setup.sh")
    if shutil.which("libvirtd") is None or shutil.which("virsh") is None:
        pytest.skip("libvirtd or virsh missing; run as root: scripts/setup.sh")
    with LibvirtDaemon() as daemon:
        print(f"\nlibvirtd {daemon.version()} in {daemon.workdir}")
        yield daemon


@pytest.fixture
def sockdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bd-lvt-"))


def share_with_qemu(libvirtd: LibvirtDaemon, sockdir: Path) -> Path:
    """The layout docs/libvirt.md gives an operator, for QEMU running as
    libvirt-qemu: balloond's sockets reachable (--socket-group kvm), and a
    setgid directory of libvirt-qemu's in balloond's group where QEMU makes
    the second monitor's socket. Returns that directory."""
    sockdir.chmod(0o755)
    qmpdir = sockdir / "qmp"
    qmpdir.mkdir()
    os.chown(qmpdir, libvirtd.qemu_uid, os.getgid())
    qmpdir.chmod(0o2770)
    return qmpdir


def qemu_credentials(pid: int) -> tuple[int, set[int]]:
    """A process's uid and supplementary groups."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[0]), {int(g) for g in fields["Groups"].split()}


def _balloonctl(api: str, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "balloond.services.cli", "--api", api, *args],
                          capture_output=True, text=True, check=True, timeout=30).stdout


def test_balloond_device_in_a_libvirt_domain(libvirtd, sockdir, tmp_path):
    qmp = str(share_with_qemu(libvirtd, sockdir) / "ours.qmp")
    daemon = DaemonProcess(sockdir / "d", ("ours",), stats_interval=1, log_level="info",
                           vm_options={"ours": f"qmp={qmp}"}, extra_args=["--socket-group", "kvm"])
    daemon.start()
    # The domain carries exactly the QEMU arguments `balloonctl libvirt-xml` prints
    # (the harness writes the memory backing and <memballoon model='none'/> itself).
    fragment = _balloonctl(daemon.api_path, "libvirt-xml", "ours")
    for line in ("<source type='memfd'/>", "<access mode='shared'/>", "<memballoon model='none'/>"):
        assert line in fragment, (line, fragment)
    root = ET.fromstring(f"<domain xmlns:qemu='{QEMU_NS}'>{fragment}</domain>")
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    assert args == ["-chardev", f"socket,id=balloond0,path={daemon.sockets['ours']}",
                    "-device", "vhost-user-test-device-pci,chardev=balloond0,virtio-id=5,num_vqs=5,config_size=16,"
                    "config-cache=on", "-qmp", f"unix:{qmp},server=on,wait=off"], args
    vm = LibvirtVm(libvirtd, "6.12", name="bd-ours", memory_mib=RAM // MIB, log_dir=tmp_path / "ours",
                   qemu_args=args, load_balloon=True)
    ok = False
    try:
        vm.start()
        print(f"boot {vm.wait_boot():.1f} s")
        xml = libvirtd.virsh("dumpxml", vm.domain).stdout
        assert "vhost-user-test-device-pci" in xml and "<memballoon model='none'/>" in xml
        state = daemon.wait_vm("ours", lambda v: v["connected"] and v["run_state"] == "running"
                               and v["stats"].get("free_memory"), 60, "the device, stats and the second monitor")
        assert state["guest_ram_bytes"] == RAM and state["qmp_connected"], state
        # QEMU runs as libvirt-qemu and reaches balloond's socket through its supplementary group kvm;
        # the monitor it made is in balloond's group, which may write to it
        kvm = grp.getgrnam("kvm").gr_gid
        uid, groups = qemu_credentials(vm.qemu_pid)
        assert uid == libvirtd.qemu_uid and kvm in groups, (uid, groups)
        st = os.stat(daemon.sockets["ours"])
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, kvm), st
        st = os.stat(qmp)
        print(f"second monitor: {stat.filemode(st.st_mode)} uid {st.st_uid} gid {st.st_gid}")
        assert st.st_uid == libvirtd.qemu_uid and st.st_gid == os.getgid() and st.st_mode & 0o020, st
        # libvirt keeps its own monitor meanwhile
        assert vm.qmp("query-status")["status"] == "running"

        daemon.api.set_target("ours", 256 * MIB)
        # The guest's `actual` can reach the target before the daemon's
        # deferred discards are done (with QEMU's config writes no longer
        # waited for, it often does): what was freed is read once none waits.
        state = daemon.wait_vm("ours", lambda v: v["actual_bytes"] == 256 * MIB and v["pending_discard_bytes"] == 0,
                               120, "the inflate and its discards")
        allocated = vm.memfd_allocated_bytes()
        print(f"inflated 256 MiB: host freed {state['host_freed_bytes'] >> 20} MiB, "
              f"guest RAM allocated {allocated >> 20} MiB")
        assert state["host_freed_bytes"] >= 0.95 * state["ballooned_bytes"] > 0, state
        assert allocated <= RAM - 0.95 * 256 * MIB, allocated

        daemon.api.set_target("ours", 64 * MIB)
        daemon.wait_vm("ours", lambda v: v["actual_bytes"] == 64 * MIB, 120, "the deflate")

        # virsh destroy: the daemon sees the device and the monitor go ...
        vm.destroy()
        state = daemon.wait_vm("ours", lambda v: not v["connected"] and not v["qmp_connected"], 30, "QEMU gone")
        assert vm.state() == "shut off"
        assert state["target_bytes"] == 64 * MIB
        # ... and virsh start: a new QEMU, found again; its driver reads the target at probe
        print(f"boot after virsh start {vm.power_on():.1f} s")
        state = daemon.wait_vm("ours", lambda v: v["connected"] and v["run_state"] == "running"
                               and v["actual_bytes"] == 64 * MIB, 120, "the restarted domain at its target")
        assert state["connections"] == 2, state
        ok = True
    finally:
        vm.close() if ok else vm.kill()
        daemon.stop()
        print(f"balloond log: {daemon.log_path}")


def test_builtin_balloon_steered_through_libvirt(libvirtd, sockdir, tmp_path):
    domain = "bd-builtin"
    daemon = DaemonProcess(
        sockdir / "d", (), stats_interval=1, log_level="info",
        extra_args=["--vm", f"builtin=libvirt:{libvirtd.uri}/{domain}",
                    # a domain nobody defined: not connected, and no harm to the other
                    "--vm", f"ghost=libvirt:{libvirtd.uri}/no-such-domain"],
    )
    daemon.start()
    # No <stats period> in the XML: the period the guest reports with is the one balloond sets.
    vm = LibvirtVm(libvirtd, "6.12", name=domain, memory_mib=RAM // MIB, log_dir=tmp_path / "builtin",
                   balloon=BuiltinBalloon({"autodeflate": "on"}), load_balloon=True)
    ok = False
    try:
        vm.start()
        print(f"boot {vm.wait_boot():.1f} s")
        state = daemon.wait_vm("builtin", lambda v: v["connected"] and v["run_state"] == "running", 60,
                               "the domain through libvirt")
        assert state["kind"] == "libvirt" and state["qmp"] is None and state["guest_ram_bytes"] == RAM, state
        assert state["target_bytes"] == 0, state  # took over an empty balloon
        state = daemon.wait_vm("builtin", lambda v: v["stats"].get("available_memory"), 30,
                               "the guest's statistics (balloond set the period)")
        assert 0 < state["stats"]["total_memory"] <= RAM and state["resident_bytes"] > 0, state
        assert "<stats" not in libvirtd.virsh("dumpxml", "--inactive", domain).stdout

        resident_before = vm.memfd_allocated_bytes()
        daemon.api.set_target("builtin", 200 * MIB)
        state = daemon.wait_vm("builtin", lambda v: v["actual_bytes"] == 200 * MIB, 120, "the inflate")
        memstat = dict(line.split() for line in libvirtd.virsh("dommemstat", domain).stdout.splitlines())
        assert int(memstat["actual"]) == (RAM - 200 * MIB) // 1024, memstat
        # QEMU's own balloon gives the memory back to the host
        allocated = wait_for("QEMU to free the ballooned memory",
                             lambda: (a := vm.memfd_allocated_bytes()) <= RAM - 0.95 * 200 * MIB and a, 30, 1)
        print(f"built-in balloon 200 MiB: guest RAM allocated {resident_before >> 20} -> {allocated >> 20} MiB")
        status, body = daemon.api.call("GET", "/v1/vms/builtin/pfns")
        assert status == 409 and "does not tell" in body["error"], (status, body)
        assert 'balloond_vm_info{kind="libvirt",vm="builtin"} 1.0' in daemon.api.metrics()
        # balloonctl: the same table as for the other kinds, the libvirt kind named
        table = _balloonctl(daemon.api_path, "status").splitlines()
        row = next(line for line in table if line.startswith("builtin "))
        assert "libvirt" in row and "200.0 MiB" in row, table
        detail = _balloonctl(daemon.api_path, "status", "builtin")
        assert "guest stats" in detail and "available_memory" in detail, detail
        out = subprocess.run([sys.executable, "-m", "balloond.services.cli", "--api", daemon.api_path,
                              "libvirt-xml", "builtin"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "needs nothing from balloond" in out.stderr, out
        # the persistent definition is untouched: only the live balloon moved
        assert "<currentMemory unit='KiB'>524288</currentMemory>" in libvirtd.virsh(
            "dumpxml", "--inactive", domain).stdout

        ghost = daemon.api.vm("ghost")
        assert not ghost["connected"] and ghost["run_state"] is None, ghost

        # virsh destroy / start: balloond follows the lifecycle and sends its target to the new QEMU
        vm.destroy()
        daemon.wait_vm("builtin", lambda v: not v["connected"] and v["run_state"] == "shutoff", 30,
                       "the domain shut off")
        print(f"boot after virsh start {vm.power_on():.1f} s")
        state = daemon.wait_vm("builtin", lambda v: v["connected"] and v["actual_bytes"] == 200 * MIB, 120,
                               "the target on the restarted domain")
        assert state["target_bytes"] == 200 * MIB and state["counters"]["targets_sent"] == 2, state
        # libvirtd restarts (a package upgrade): balloond connects again and steers the same domain
        connects = len([r for r in daemon.log_records() if r.get("event") == "libvirt connected"
                        and r.get("vm") == "builtin"])
        libvirtd.restart()
        wait_for("balloond to connect to the new libvirtd",
                 lambda: len([r for r in daemon.log_records() if r.get("event") == "libvirt connected"
                              and r.get("vm") == "builtin"]) > connects, 30, 0.5)
        daemon.api.set_target("builtin", 0)  # and deflate through it
        daemon.wait_vm("builtin", lambda v: v["connected"] and v["actual_bytes"] == 0, 120, "the deflate")
        ok = True
    finally:
        vm.close() if ok else vm.kill()
        daemon.stop()
        print(f"balloond log: {daemon.log_path}")


#: The three-kind host: balloond's device in a libvirt domain, QEMU's built-in
#: balloon over QMP (a QEMU started by hand) and a libvirt domain's built-in
#: balloon through libvirt. All boot with page_poison=1, so all of guest RAM
#: is resident and only a balloon gives any back; resident is ~1.7 GiB (QEMU's
#: own memory counts for the two built-in kinds). A host of this size, keeping
#: its reserve, is short by ~700 MiB: more than any one guest can give
#: (RAM - used - headroom, ~350 MiB), so the policy must reclaim from several.
POLICY_STEP = 64 * MIB
POLICY_RESERVE = 256 * MIB
POLICY_HEADROOM = 96 * MIB
POLICY_HOST = 1280 * MIB


def test_one_policy_across_three_kinds_of_balloon(libvirtd, sockdir, tmp_path):
    from harness import Vm

    qmp = {"ours": str(share_with_qemu(libvirtd, sockdir) / "ours.qmp"), "builtin": str(sockdir / "builtin.qmp")}
    headroom = f"headroom={POLICY_HEADROOM >> 20}M"
    daemon = DaemonProcess(
        sockdir / "d", ("ours",), stats_interval=1, log_level="info",
        vm_options={"ours": f"qmp={qmp['ours']},{headroom}"},
        extra_args=["--vm", f"builtin=qmp:{qmp['builtin']},{headroom}",
                    "--vm", f"lv=libvirt:{libvirtd.uri}/bd-lv,{headroom}",
                    "--policy", "--policy-interval", "2", "--policy-simulate-host", f"{POLICY_HOST >> 20}M",
                    "--host-reserve", f"{POLICY_RESERVE >> 20}M", "--policy-step", f"{POLICY_STEP >> 20}M",
                    "--no-free-page-reporting", "--socket-group", "kvm"],
    )
    daemon.start()
    fragment = _balloonctl(daemon.api_path, "libvirt-xml", "ours")
    root = ET.fromstring(f"<domain xmlns:qemu='{QEMU_NS}'>{fragment}</domain>")
    ours_args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    common = {"memory_mib": RAM // MIB, "load_balloon": True, "cmdline": ["page_poison=1"]}
    vms = {
        "ours": LibvirtVm(libvirtd, "6.12", name="bd-pol-ours", qemu_args=ours_args, log_dir=tmp_path / "ours",
                          **common),
        "builtin": Vm("6.12", name="builtin", balloon=BuiltinBalloon({"deflate-on-oom": "on"}),
                      qemu_args=["-qmp", f"unix:{qmp['builtin']},server=on,wait=off"],
                      log_dir=tmp_path / "builtin", **common),
        "lv": LibvirtVm(libvirtd, "6.12", name="bd-lv", balloon=BuiltinBalloon({"autodeflate": "on"}),
                        log_dir=tmp_path / "lv", **common),
    }
    ok = False
    try:
        for vm in vms.values():
            vm.start()
        for vm in vms.values():
            vm.wait_boot()
        wait_for("three VMs managed", lambda: all(v["connected"] and v["run_state"] == "running"
                                                  for v in daemon.api.vms()), 60)
        assert {v["name"]: v["kind"] for v in daemon.api.vms()} == {"ours": "vhost-user", "builtin": "qemu",
                                                                    "lv": "libvirt"}
        wait_for("every guest's stats", lambda: all(v["stats"].get("free_memory") for v in daemon.api.vms()), 30)
        print(f"\nresident after boot: { {v['name']: v['resident_bytes'] >> 20 for v in daemon.api.vms()} } MiB")

        def all_ballooned() -> dict[str, int] | None:
            sizes = {v["name"]: v["actual_bytes"] for v in daemon.api.vms()}
            return sizes if all(s >= 2 * POLICY_STEP for s in sizes.values()) else None

        wait_for("balloons in all three guests", all_ballooned, 300, 1)
        # until the policy is done: no new target for four intervals
        seen: list[int] = []

        def settled() -> bool:
            seen.append(len(daemon.policy_targets()))
            return len(seen) > 4 and seen[-1] == seen[-5]

        wait_for("the policy to settle", settled, 300, 2)

        def freed() -> dict[str, tuple[int, int]] | None:
            now = {v["name"]: v["actual_bytes"] for v in daemon.api.vms()}
            allocated = {n: vm.memfd_allocated_bytes() for n, vm in vms.items()}
            if all(allocated[n] <= RAM - 0.95 * now[n] for n in vms):
                return {n: (now[n], allocated[n]) for n in vms}
            return None

        result = wait_for("the host memory behind every balloon freed", freed, 60, 1)
        # page_poison=1 made all of guest RAM resident: what is not allocated now was given back
        reclaimed = {n: RAM - allocated for n, (_, allocated) in result.items()}
        print("guest RAM given back to the host: "
              + ", ".join(f"{n} {r >> 20} MiB ({result[n][0] >> 20} MiB ballooned)" for n, r in reclaimed.items())
              + f"; total {sum(reclaimed.values()) >> 20} MiB")
        assert daemon.api.vm("ours")["host_freed_bytes"] >= 0.95 * daemon.api.vm("ours")["ballooned_bytes"]
        first = daemon.policy_targets()[0]
        assert "below its reserve" in first["reason"], first
        sent = [r for r in daemon.log_records() if r.get("event") == "target sent to libvirt"]
        assert sent and all(r["vm"] == "lv" for r in sent), sent
        ok = True
    finally:
        for vm in vms.values():
            vm.close() if ok else vm.kill()
        daemon.stop()
        print(f"balloond log: {daemon.log_path}")

    targets = daemon.policy_targets()
    steps = [abs(r["target_bytes"] - r["old_bytes"]) for r in targets]
    moved = {r["vm"] for r in targets}
    print(f"policy targets set: {len(steps)}; largest step {max(steps) >> 20} MiB; VMs moved: {sorted(moved)}")
    assert moved == {"ours", "builtin", "lv"}
    assert max(steps) <= POLICY_STEP
