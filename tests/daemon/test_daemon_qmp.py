"""The daemon's QMP side, through a real daemon, a real vhost-user socket and
a fake QEMU monitor (tests/fake_qmp.py) per VM.

vm0 has our device and a QMP socket: its discard guard must keep the host
memory behind ballooned frames untouched while the fake reports an assigned
(VFIO) device, a migration, or does not answer -- the balloon itself keeps
working -- and free all of it once discards are safe again. The daemon turns
on QEMU's migration events; `event_rig` runs a daemon whose guard does not
poll within a test, so its migration test fails unless the guard reacts to
the MIGRATION event, and the other daemon shows the poll still catching a
migration when QEMU refuses those events (the fake then sends none, as QEMU).
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
from tests.fake_qmp import FakeQmp, FakeQmpThread, QemuBalloon, QmpCommandError
from tests.daemon.conftest import bug_records
from tests.daemon.harness import DaemonProcess
from tests.frontend import PAGE_SIZE, TestFrontend

MiB = 1 << 20
VFIO = {"name": "hostdev0", "type": "child<vfio-pci>"}


@pytest.fixture(scope="module")
def monitors(discard_mode: str) -> Iterator[dict[str, FakeQmpThread]]:
    """Fresh fake QEMUs for each discard mode's daemon: one daemon's setup
    (capabilities, the balloon's polling) must not be what the next one finds."""
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


def test_discards_wait_while_qmp_is_gone(daemon, connect, monitors):
    monitor = monitors["vm0"]
    wait_guard(daemon, lambda r: r is None, "discards allowed")
    fe: TestFrontend = connect()
    pfns = range(fe.first_free_pfn, fe.first_free_pfn + 1024)
    fe.ram.touch(pfns)
    base = fe.ram.allocated_bytes()

    monitor.go_away()  # nobody can say discards are safe
    wait_guard(daemon, lambda r: r is not None and "QMP not connected" in r, "the guard to close without QMP")
    fe.inflate(pfns)
    assert fe.ram.allocated_bytes() == base

    monitor.come_back()
    wait_guard(daemon, lambda r: r is None, "discards allowed once QEMU answers again")
    daemon.wait_vm("vm0", lambda v: base - fe.ram.allocated_bytes() == len(pfns) * PAGE_SIZE, timeout=5,
                   what="the held batch freed")
    fe.deflate(pfns)


def refuse_capabilities(_args: dict[str, Any]) -> Any:
    raise QmpCommandError("GenericError", "capabilities are managed elsewhere")


def test_without_the_events_capability_no_event_comes_and_polling_catches_the_migration(daemon, monitors):
    """QEMU refusing the capability (here: for good) costs the guard its
    reaction at once, not its protection: the 1 s poll still closes it."""
    monitor = monitors["vm0"]
    wait_guard(daemon, lambda r: r is None, "discards allowed")
    assert monitor.run(lambda fake: fake.migrate_capabilities["events"]) is True  # the daemon turned it on
    assert daemon.api.vm("vm0")["discard_guard"]["migration_events"] is True
    start = daemon.log_size()
    accept = monitor.run(lambda fake: fake.commands["migrate-set-capabilities"])

    def refusing(fake: FakeQmp) -> None:
        fake.commands["migrate-set-capabilities"] = refuse_capabilities
        fake.migrate_capabilities["events"] = False  # a new QEMU: off again
        fake.drop_clients()

    monitor.run(refusing)
    daemon.wait_vm("vm0", lambda v: v["discard_guard"]["migration_events"] is False and v["discard_inhibited"] is None,
                   timeout=10, what="the guard back, without migration events")
    try:
        assert monitor.set_migration_status("active") is False  # QEMU says nothing...
        state = wait_guard(daemon, lambda r: r is not None, "the poll to see the migration")
        assert state["discard_inhibited"] == "migration in progress (active)"
        monitor.set_migration_status("cancelled")
        wait_guard(daemon, lambda r: r is None, "the poll to see it end")
        records = [r for r in daemon.log_records(start) if r.get("vm") == "vm0"]
        assert not [r for r in records if r.get("event") == "qmp event" and r.get("qmp_event") == "MIGRATION"]
        refusals = [r for r in records if str(r.get("event")).startswith("migration events refused")]
        assert len(refusals) == 1 and "capabilities are managed elsewhere" in refusals[0]["error"]
    finally:
        # QEMU accepting it again: the next connection turns it back on
        monitor.run(lambda fake: fake.commands.update({"migrate-set-capabilities": accept}))
        monitor.drop_clients()
    daemon.wait_vm("vm0", lambda v: v["discard_guard"]["migration_events"] is True, timeout=10,
                   what="migration events on again after the reconnect")
    assert monitor.run(lambda fake: fake.migrate_capabilities["events"]) is True


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
    daemon.wait_vm("vm0", lambda v: v["connected"])  # a list may show a new frontend a moment later (docs/api.md)
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


#: The guard's poll interval for `event_rig`: no poll falls inside a test, so
#: whatever the guard sees after connecting it saw because QEMU said so.
NO_POLL_SECONDS = 3600


@pytest.fixture(scope="module")
def event_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, FakeQmpThread]]:
    """A daemon whose guard practically never polls (discarding at once, so
    a discard the guard let through would show), with its own fake QEMU."""
    monitor = FakeQmpThread(str(Path(tempfile.mkdtemp(prefix="bd-dqe-")) / "vm0.qmp"))
    proc = DaemonProcess(tmp_path_factory.mktemp("balloond-events"), ("vm0",),
                         vm_options={"vm0": f"qmp={monitor.fake.path}"},
                         extra_args=["--discard-delay-ms", "0", "--guard-poll-interval", str(NO_POLL_SECONDS)])
    proc.start()
    try:
        yield proc, monitor
        alive, bugs = proc.alive, bug_records(proc.log_records())
    finally:
        code = proc.stop()
        monitor.close()
    assert alive and code == 0, proc.log_tail()
    assert bugs == []


def test_a_migration_closes_the_guard_at_its_event_not_at_a_poll(event_rig):
    daemon, monitor = event_rig
    state = wait_guard(daemon, lambda r: r is None, "discards allowed")
    assert state["discard_guard"]["migration_events"] is True
    assert monitor.run(lambda fake: fake.migrate_capabilities["events"]) is True
    assert len([r for r in daemon.log_records() if r.get("event") == "migration events on"]) == 1
    fe = TestFrontend(daemon.sockets["vm0"], connect=False)
    fe.connect()
    try:
        fe.start()
        pfns = range(fe.first_free_pfn, fe.first_free_pfn + 1024)
        fe.ram.touch(pfns)
        base = fe.ram.allocated_bytes()

        assert monitor.set_migration_status("setup") is True  # QEMU's migrate: announced
        monitor.set_migration_status("active")
        state = daemon.wait_vm("vm0", lambda v: v["discard_inhibited"] is not None, timeout=2,
                               what="the guard to react to MIGRATION (no poll for an hour)")
        assert state["discard_inhibited"] in ("migration in progress (setup)", "migration in progress (active)")
        assert fe.inflate(pfns) == 4  # acknowledged, tracked, not discarded
        assert fe.ram.allocated_bytes() == base
        state = daemon.api.vm("vm0")
        assert state["ballooned_bytes"] == len(pfns) * PAGE_SIZE and state["host_freed_bytes"] == 0
        assert 'balloond_vm_discard_inhibited{vm="vm0"} 1.0' in daemon.api.metrics()

        monitor.set_migration_status("postcopy-active")
        state = wait_guard(daemon, lambda r: r is not None and "postcopy" in r, "the guard to see postcopy")
        assert state["discard_guard"]["migration_status"] == "postcopy-active"
        monitor.set_migration_status("completed")
        daemon.wait_vm("vm0", lambda v: v["discard_inhibited"] is None, timeout=2, what="the guard to open at once")
        daemon.wait_vm("vm0", lambda v: v["host_freed_bytes"] == len(pfns) * PAGE_SIZE, timeout=5,
                       what="the held balloon to be freed")
        assert base - fe.ram.allocated_bytes() == len(pfns) * PAGE_SIZE
        fe.deflate(pfns)
    finally:
        fe.close()
    daemon.wait_disconnected("vm0")
