"""The daemon's QMP side, through a real daemon, a real vhost-user socket and
a fake QEMU monitor (tests/fake_qmp.py) per VM.

vm0 has our device and a QMP socket: its discard guard must keep the host
memory behind ballooned frames untouched while the fake reports an assigned
(VFIO) device, a migration, or does not answer -- the balloon itself keeps
working -- and free all of it once discards are safe again.
"qemu0" has QEMU's built-in balloon, reached only over QMP: the API and
the metrics show and steer it like the others.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balloond.services import cli
from tests.fake_qmp import FakeQmpThread, QemuBalloon
from tests.frontend import PAGE_SIZE, TestFrontend

MiB = 1 << 20
VFIO = {"name": "hostdev0", "type": "child<vfio-pci>"}


@pytest.fixture(scope="module")
def monitors() -> Iterator[dict[str, FakeQmpThread]]:
    sockdir = Path(tempfile.mkdtemp(prefix="bd-dq-"))
    made = {name: FakeQmpThread(str(sockdir / f"{name}.qmp")) for name in ("vm0", "qemu0")}
    yield made
    for monitor in made.values():
        monitor.close()


@pytest.fixture(scope="module")
def daemon_options(monitors: dict[str, FakeQmpThread]) -> dict[str, Any]:
    return {
        "vms": ("vm0",),
        "vm_options": {"vm0": f"qmp={monitors['vm0'].fake.path}"},
        "extra_args": ["--vm", f"qemu0=qmp:{monitors['qemu0'].fake.path}"],
    }


@pytest.fixture
def builtin(monitors: dict[str, FakeQmpThread], daemon) -> QemuBalloon:
    return monitors["qemu0"].run(lambda fake: QemuBalloon(fake, ram=512 * MiB))


def guard_state(daemon) -> Any:
    return daemon.api.vm("vm0")["discard_inhibited"]


def wait_guard(daemon, predicate, what: str) -> dict[str, Any]:
    return daemon.wait_vm("vm0", lambda v: predicate(v["discard_inhibited"]), timeout=10, what=what)


def test_discards_wait_while_a_vfio_device_is_assigned(daemon, connect, monitors):
    monitor = monitors["vm0"]
    wait_guard(daemon, lambda r: r is None, "discards allowed on an idle VM")
    fe: TestFrontend = connect()
    pfns = range(fe.first_free_pfn, fe.first_free_pfn + 4096)  # 16 MiB
    fe.ram.touch(pfns)
    keep = range(pfns[-1] + 1, pfns[-1] + 257)
    fe.ram.fill(keep, seed=3)

    monitor.run(lambda fake: fake.qom["/machine/peripheral"].append(VFIO))
    state = wait_guard(daemon, lambda r: r is not None and "VFIO" in r, "the guard to see the VFIO device")
    assert "/machine/peripheral/hostdev0" in state["discard_inhibited"]
    assert state["discard_guard"]["vfio_devices"] == ["/machine/peripheral/hostdev0"]

    before = fe.ram.allocated_bytes()
    assert fe.inflate(pfns) == 16  # the balloon works: every buffer returned
    state = daemon.api.vm("vm0")
    assert state["ballooned_bytes"] == len(pfns) * PAGE_SIZE
    assert fe.ram.allocated_bytes() == before, "memory was discarded under an assigned device"
    assert state["host_freed_bytes"] == 0
    assert state["counters"]["discard_inhibits"] >= 1
    assert 'balloond_vm_discard_inhibited{vm="vm0"} 1.0' in daemon.api.metrics()

    monitor.run(lambda fake: fake.qom["/machine/peripheral"].remove(VFIO))
    wait_guard(daemon, lambda r: r is None, "discards allowed after the device left")
    daemon.wait_vm("vm0", lambda v: v["host_freed_bytes"] == len(pfns) * PAGE_SIZE, timeout=5,
                   what="the held balloon to be freed")
    assert before - fe.ram.allocated_bytes() == len(pfns) * PAGE_SIZE
    assert fe.ram.damaged(keep, seed=3) == []
    fe.deflate(pfns)


def test_discards_wait_during_migration_and_without_qmp(daemon, connect, monitors):
    monitor = monitors["vm0"]
    wait_guard(daemon, lambda r: r is None, "discards allowed")
    fe: TestFrontend = connect()
    first = range(fe.first_free_pfn, fe.first_free_pfn + 1024)
    second = range(first[-1] + 1, first[-1] + 1025)
    fe.ram.touch(first)
    fe.ram.touch(second)
    base = fe.ram.allocated_bytes()

    # postcopy: announced by an event (the guard looks at once, not at its next poll)
    monitor.run(lambda fake: fake.commands.update({"query-migrate": lambda _a: {"status": "postcopy-active"}}))
    monitor.emit("MIGRATION", {"status": "postcopy-active"})
    state = wait_guard(daemon, lambda r: r is not None and "postcopy" in r, "the guard to see postcopy")
    assert state["discard_guard"]["migration_status"] == "postcopy-active"
    fe.inflate(first)
    assert fe.ram.allocated_bytes() == base

    # QMP gone: nobody can say discards are safe
    monitor.run(lambda fake: fake.commands.update({"query-migrate": lambda _a: {"status": "completed"}}))
    monitor.go_away()
    wait_guard(daemon, lambda r: r is not None and "QMP not connected" in r, "the guard to close without QMP")
    fe.inflate(second)
    assert fe.ram.allocated_bytes() == base

    monitor.come_back()
    wait_guard(daemon, lambda r: r is None, "discards allowed once QEMU answers again")
    held = (len(first) + len(second)) * PAGE_SIZE
    daemon.wait_vm("vm0", lambda v: base - fe.ram.allocated_bytes() == held, timeout=5,
                   what="both batches freed")
    fe.deflate(list(first) + list(second))
    monitor.run(lambda fake: fake.commands.update({"query-migrate": lambda _a: {}}))


def test_a_builtin_balloon_vm_is_steered_over_qmp(daemon, monitors, builtin):
    monitor = monitors["qemu0"]
    builtin.report(free_memory=400 * MiB, total_memory=480 * MiB, available_memory=420 * MiB, major_faults=7)
    state = daemon.wait_vm("qemu0", lambda v: v["connected"] and v["stats"], timeout=10,
                           what="QEMU's balloon and its stats")
    assert state["kind"] == "qemu" and state["socket"] is None and state["device"] == builtin.path
    assert state["guest_ram_bytes"] == 512 * MiB and state["ballooned_bytes"] == 0
    assert state["stats"]["free_memory"] == 400 * MiB and state["stats"]["major_faults"] == 7
    assert "swap_in" not in state["stats"]  # QEMU's "never sent" is not a value
    assert builtin.polling >= 1  # the daemon asked QEMU to poll the guest

    state = daemon.api.set_target("qemu0", 128 * MiB)
    assert state["target_bytes"] == 128 * MiB
    daemon.wait_vm("qemu0", lambda v: v["actual_bytes"] == 128 * MiB, timeout=5, what="the balloon to follow")
    assert builtin.logical == 384 * MiB
    assert [a["value"] for a in monitor.calls("balloon")][-1] == 384 * MiB  # QEMU's balloon takes the logical size

    status, body = daemon.api.call("PUT", "/v1/vms/qemu0/target", {"bytes": 512 * MiB})
    assert status == 400 and "all of the guest's RAM" in body["error"]
    status, body = daemon.api.call("GET", "/v1/vms/qemu0/pfns")
    assert status == 409 and "does not tell" in body["error"]
    metrics = daemon.api.metrics()
    assert 'balloond_vm_info{kind="qemu",vm="qemu0"} 1.0' in metrics
    assert 'balloond_vm_ballooned_bytes{vm="qemu0"} 1.34217728e+08' in metrics
    assert 'balloond_vm_host_freed_bytes_total{vm="qemu0"}' not in metrics  # QEMU does not say

    daemon.api.set_target("qemu0", 0)
    daemon.wait_vm("qemu0", lambda v: v["actual_bytes"] == 0, timeout=5, what="the balloon to deflate")
    assert [a["value"] for a in monitor.calls("balloon")][-1] == 512 * MiB


def balloonctl(daemon, capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--api", daemon.api_path, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_balloonctl_shows_both_kinds_and_explains_refusals(daemon, connect, monitors, builtin, capsys):
    wait_guard(daemon, lambda r: r is None, "discards allowed")
    daemon.wait_vm("qemu0", lambda v: v["connected"], timeout=10, what="QEMU's balloon")
    connect()
    code, out, err = balloonctl(daemon, capsys, "status")
    assert code == 0 and err == ""
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["VM", "KIND", "CONN"]
    kinds = {row.split()[0]: row.split()[1:3] for row in rows}
    assert kinds == {"vm0": ["vhost-user", "yes"], "qemu0": ["qemu", "yes"]}
    assert rows[[r.split()[0] for r in rows].index("qemu0")].split()[-1] == "-"  # migrations: QEMU does not say

    code, out, _ = balloonctl(daemon, capsys, "status", "qemu0")
    assert code == 0 and f"qmp: {monitors['qemu0'].fake.path} (connected, running)" in out

    monitors["vm0"].run(lambda fake: fake.qom["/machine/peripheral"].append(VFIO))
    wait_guard(daemon, lambda r: r is not None, "the guard to close")
    code, out, _ = balloonctl(daemon, capsys, "status", "vm0")
    assert code == 0 and "discards refused: assigned device(s) (VFIO): /machine/peripheral/hostdev0" in out
    monitors["vm0"].run(lambda fake: fake.qom["/machine/peripheral"].remove(VFIO))
    wait_guard(daemon, lambda r: r is None, "the guard to open")

    code, out, err = balloonctl(daemon, capsys, "set", "qemu0", "64M")
    assert code == 0 and out.strip() == "qemu0: balloon target set to 64.0 MiB"
    code, out, err = balloonctl(daemon, capsys, "pfns", "qemu0")
    assert code == 1 and out == ""
    assert err.strip() == "balloonctl: QEMU's built-in balloon does not tell which guest frames it holds"
    code, _, err = balloonctl(daemon, capsys, "set", "qemu0", "512M")
    assert code == 1 and err.strip() == "balloonctl: QEMU's balloon cannot take all of the guest's RAM"
    code, _, err = balloonctl(daemon, capsys, "set", "qemu0", "lots")
    assert code == 1 and err.startswith("balloonctl: ") and "\n" not in err.strip()
    balloonctl(daemon, capsys, "set", "qemu0", "0")
