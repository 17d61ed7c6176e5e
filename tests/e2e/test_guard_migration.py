"""The discard guard against a real QEMU 10.2 migration.

The QEMU here is a plain one (tests/e2e/test_live_migration.py migrates
real guests with balloond's device): no guest, no balloon, 256 MiB of RAM,
stopped before it ever ran (-S). Its
second QMP socket is given to a balloond VM whose vhost-user socket is driven
by the test frontend: the guard reads the real QEMU's migration state while
its verdict is applied to a device the test can watch. The guard's poll is
set to an hour, so it can only close in time if balloond turned QEMU's
migration events on and reacted to the MIGRATION event.

The migration goes to `exec:cat > /dev/null` with a bandwidth limit that
keeps it active for tens of seconds, and is cancelled by the test. The same
QEMU also checks the fake monitor (tests/fake_qmp.py) that the unit and
daemon-level tests rely on: the same migration steps, over the same client,
must get the same answers and the same events from both.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qemu.qmp import ExecuteError

from harness import SetupError, find_qemu
from harness.daemon import DaemonProcess
from harness.qmp import QmpSession
from tests.fake_qmp import FakeQmpThread
from tests.frontend import PAGE_SIZE, TestFrontend

pytestmark = pytest.mark.vm

#: Long enough that the guard never polls during the test: what it sees
#: after connecting, it saw because QEMU announced it.
NO_POLL_SECONDS = 3600
#: How soon after `migrate` returns the guard must refuse discards: an event
#: takes milliseconds; the margin is for a loaded 2-core machine.
REACTION_SECONDS = 2.0
#: Bytes/s: ~65536 zero pages at a few bytes each take well over 10 s.
MIGRATION_BANDWIDTH = 32 * 1024
MIGRATION_IDLE = ("none", "completed", "failed", "cancelled")


@dataclass
class BareQemu:
    """A QEMU process with RAM and nothing else, and two QMP sockets: one for
    the test (`qmp`), one for balloond (`daemon_qmp`)."""

    proc: subprocess.Popen[bytes]
    qmp: QmpSession
    daemon_qmp: str
    log: Path

    def migration_status(self) -> str:
        return str(self.qmp.command("query-migrate").get("status", "none"))

    def capability(self, name: str) -> bool:
        states = {c["capability"]: c["state"] for c in self.qmp.command("query-migrate-capabilities")}
        return bool(states[name])


@pytest.fixture
def bare_qemu(tmp_path: Path) -> Iterator[BareQemu]:
    try:
        qemu = find_qemu()
    except SetupError as exc:
        pytest.skip(f"VM test prerequisites missing: {exc}")
    sockdir = Path(tempfile.mkdtemp(prefix="bd-mig-"))  # sun_path is short; tmp_path may not be
    ours, theirs = sockdir / "test.qmp", sockdir / "daemon.qmp"
    log = tmp_path / "qemu.log"
    argv = [
        str(qemu.binary), "-name", "migrating", "-accel", "tcg", "-S",
        "-machine", "q35,memory-backend=mem", "-m", "256M",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
        *qemu.firmware_args(), "-nodefaults", "-display", "none", "-monitor", "none",
        "-qmp", f"unix:{ours},server=on,wait=off", "-qmp", f"unix:{theirs},server=on,wait=off",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    session = QmpSession("guard-migration-test")

    def still_running() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"QEMU exited with {proc.returncode}: {log.read_text(errors='replace')}")

    try:
        session.connect(str(ours), check=still_running)
        yield BareQemu(proc, session, str(theirs), log)
    finally:
        session.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(sockdir, ignore_errors=True)


def wait_guard(daemon: DaemonProcess, predicate: Any, timeout: float, what: str) -> dict[str, Any]:
    return daemon.wait_vm("vm0", lambda v: predicate(v["discard_inhibited"]), timeout=timeout, what=what)


def test_the_guard_refuses_discards_as_soon_as_a_real_migration_starts(bare_qemu: BareQemu, tmp_path: Path):
    qemu = bare_qemu
    assert qemu.capability("events") is False  # QEMU's default: migrations go unannounced
    assert qemu.migration_status() == "none"
    daemon = DaemonProcess(tmp_path / "daemon", ("vm0",), log_level="info",
                           vm_options={"vm0": f"qmp={qemu.daemon_qmp}"},
                           extra_args=["--guard-poll-interval", str(NO_POLL_SECONDS), "--discard-delay-ms", "0"])
    daemon.start()
    fe: TestFrontend | None = None
    try:
        wait_guard(daemon, lambda r: r is None, 15, "balloond to reach QEMU and allow discards")
        assert qemu.capability("events") is True  # balloond turned them on
        state = daemon.api.vm("vm0")
        assert state["qmp_connected"] and state["run_state"] == "prelaunch"
        assert state["discard_guard"]["migration_events"] is True
        assert [r["event"] for r in daemon.log_records() if "migration events" in str(r.get("event"))] == [
            "migration events on"]

        fe = TestFrontend(daemon.sockets["vm0"], connect=False)
        fe.connect()
        fe.start()
        before = range(fe.first_free_pfn, fe.first_free_pfn + 1024)
        during = range(before[-1] + 1, before[-1] + 1025)
        fe.ram.touch(before)
        fe.ram.touch(during)
        base = fe.ram.allocated_bytes()
        fe.inflate(before)  # the guard is open: discarded at once
        assert base - fe.ram.allocated_bytes() == len(before) * PAGE_SIZE
        base = fe.ram.allocated_bytes()

        qemu.qmp.events()  # forget anything so far
        qemu.qmp.command("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
        qemu.qmp.command("migrate", {"uri": "exec:cat > /dev/null"})
        started = time.monotonic()
        state = wait_guard(daemon, lambda r: r is not None, REACTION_SECONDS,
                           "the guard to react to the migration's MIGRATION event")
        reaction = time.monotonic() - started
        assert state["discard_inhibited"] in ("migration in progress (setup)", "migration in progress (active)")
        assert 'balloond_vm_discard_inhibited{vm="vm0"} 1.0' in daemon.api.metrics()
        assert qemu.qmp.wait_event("MIGRATION", timeout=5)["data"]["status"] == "setup"  # QEMU announced it

        fe.inflate(during)  # acknowledged and tracked, not discarded
        assert fe.ram.allocated_bytes() == base
        assert daemon.api.vm("vm0")["ballooned_bytes"] == (len(before) + len(during)) * PAGE_SIZE
        assert qemu.migration_status() == "active"  # it really was still migrating meanwhile

        qemu.qmp.command("migrate_cancel")
        stopped = time.monotonic()
        wait_guard(daemon, lambda r: r is None, REACTION_SECONDS + 3, "the guard to open after migrate_cancel")
        assert qemu.migration_status() == "cancelled"
        daemon.wait_vm("vm0", lambda v: base - fe.ram.allocated_bytes() == len(during) * PAGE_SIZE, timeout=5,
                       what="the balloon held during the migration to be freed")
        print(f"\nguard closed {reaction:.2f} s after migrate, reopened {time.monotonic() - stopped:.2f} s "
              "after migrate_cancel")
        statuses = [qemu.qmp.wait_event("MIGRATION", timeout=5)["data"]["status"] for _ in range(3)]
        assert statuses == ["active", "cancelling", "cancelled"]  # after "setup", taken above
        fe.deflate(list(before) + list(during))
    finally:
        if fe is not None:
            fe.close()
        alive = daemon.alive
        daemon.stop()
        print(f"balloond log: {daemon.log_path}; QEMU log: {qemu.log}")
    assert alive


def migration_transcript(qmp: QmpSession) -> list[Any]:
    """Migration steps any QMP server is put through, and what it answered
    and announced: the rules the guard relies on (no MIGRATION event without
    the "events" capability; no changing it while a migration runs)."""
    out: list[Any] = []

    def do(name: str, args: dict[str, Any] | None = None) -> None:
        try:
            out.append((name, args, "ok", qmp.command(name, args, timeout=10)))
        except ExecuteError as exc:
            out.append((name, args, exc.error_class, exc.error.error.desc))

    def status() -> str:
        return str(qmp.command("query-migrate", timeout=10).get("status", "none"))

    def until(what: str, predicate: Any) -> None:
        deadline = time.monotonic() + 15
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)

    def migration(events: bool) -> None:
        do("migrate", {"uri": "exec:cat > /dev/null"})
        until("the migration to be active", lambda: status() == "active")
        do("migrate", {"uri": "exec:cat > /dev/null"})
        do("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": not events}]})
        do("migrate_cancel")
        until("the migration to be cancelled", lambda: status() == "cancelled")
        if events:
            until("the cancelled event", lambda: {"status": "cancelled"} in [
                e["data"] for e in qmp.events(clear=False) if e["event"] == "MIGRATION"])
        do("query-migrate")
        out.append(("events", [(e["event"], e["data"]) for e in qmp.events() if e["event"].startswith("MIGRATION")]))

    qmp.events()
    out.append(("capabilities", qmp.command("query-migrate-capabilities")))
    do("query-migrate")
    do("migrate_cancel")
    do("migrate", {})
    do("migrate-set-capabilities", {"capabilities": [{"capability": "bogus", "state": True}]})
    migration(events=False)
    do("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    migration(events=True)
    return out


def test_the_fake_monitor_migrates_like_qemu(bare_qemu: BareQemu):
    qemu = bare_qemu
    qemu.qmp.command("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})  # real RAM takes time
    real = migration_transcript(qemu.qmp)
    sockdir = Path(tempfile.mkdtemp(prefix="bd-fake-"))
    monitor = FakeQmpThread(str(sockdir / "fake.qmp"))
    session = QmpSession("guard-migration-fake")
    try:
        session.connect(monitor.fake.path)
        fake = migration_transcript(session)
    finally:
        session.close()
        monitor.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert ("events", []) in real  # the rule itself, seen on QEMU
    assert fake == real
