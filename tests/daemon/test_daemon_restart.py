"""A daemon killed with SIGKILL and started again finds each VM's balloon in
--state-dir and carries on with the same QEMU (here: the test frontend,
reconnecting as QEMU's fixed vhost-user-base does: the same guest RAM and
rings, each ring resuming from the used index it saw)."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from harness.daemon import DaemonProcess
from protocol.balloon import Feature
from tests.daemon.discards import DISCARD_MODES
from tests.daemon.harness import crash_and_restart, reconnect
from tests.frontend import DRIVER_FEATURES, GuestRam, TestFrontend

PAGE = 4096


def test_balloon_and_target_survive_sigkill(stateful, tmp_path):
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(stateful.sockets["vm0"], ram=ram)
        fe.start()
        first = fe.first_free_pfn
        held = list(range(first, first + 512)) + list(range(first + 4096, first + 4096 + 300))
        ram.touch(held)
        fe.inflate(held)
        stateful.api.set_target("vm0", 8 << 20)
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0)
        assert stateful.api.pfn_set("vm0") == set(held)

        crash_and_restart(stateful)
        assert stateful.api.vm("vm0")["target_bytes"] == 8 << 20  # known before QEMU is back
        ram.touch(held[:10])  # as if discards pending at the crash were lost
        reconnect(fe)
        state = stateful.wait_vm("vm0", lambda s: s["ballooned_bytes"] == len(held) * PAGE)
        assert stateful.api.pfn_set("vm0") == set(held)
        assert state["counters"]["driver_resets"] == 0
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0)
        assert ram.nonzero(held) == [], "restored frames were not discarded again"

        # and it keeps working: deflate some, inflate others, crash again
        fe.deflate(held[:100])
        more = list(range(first + 8192, first + 8192 + 256))
        fe.inflate(more)
        crash_and_restart(stateful)
        reconnect(fe)
        expect = set(held[100:]) | set(more)
        stateful.wait_vm("vm0", lambda s: s["ballooned_bytes"] == len(expect) * PAGE)
        assert stateful.api.pfn_set("vm0") == expect
        fe.close()
    finally:
        ram.close()


def test_a_new_guest_after_a_restart_starts_with_an_empty_balloon(stateful):
    fe = TestFrontend(stateful.sockets["vm0"])
    fe.start()
    fe.inflate(range(fe.first_free_pfn, fe.first_free_pfn + 256))
    fe.close()
    crash_and_restart(stateful)
    fe2 = TestFrontend(stateful.sockets["vm0"])  # another QEMU: another memfd
    fe2.start()
    state = stateful.api.vm("vm0")
    assert state["ballooned_bytes"] == 0 and stateful.api.pfns("vm0")["count"] == 0
    fe2.close()


# ------------------------------------------------ a journal it may not restore

def dropped_lines(daemon: DaemonProcess, since: int) -> list[dict]:
    return [r for r in daemon.log_records(since) if r.get("event", "").startswith("state journal dropped")]


def log_size(daemon: DaemonProcess) -> int:
    return daemon.log_path.stat().st_size


def test_guest_rebooted_while_the_daemon_was_down_keeps_its_pages(stateful):
    """The rebooted guest reuses the frames its old kernel ballooned: the
    rings start at 0, and the journal is dropped before anything is discarded."""
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(stateful.sockets["vm0"], ram=ram)
        fe.start()
        held = list(range(fe.first_free_pfn, fe.first_free_pfn + 512))
        fe.inflate(held)
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0 and s["ballooned_bytes"] == 512 * PAGE)
        stateful.proc.send_signal(signal.SIGKILL)
        stateful.proc.wait(10)
        fe.close()
        fe.reset_driver()  # the guest reboots while the daemon is down
        ram.fill(held, seed=7)  # and the new kernel writes into those frames
        since = log_size(stateful)
        stateful.start()
        fe.connect()  # QEMU reconnects; the new driver's rings start at 0
        fe.start()
        stateful.wait_vm("vm0", lambda s: s["running"])
        assert ram.damaged(held, seed=7) == [], "pages of the rebooted guest were discarded"
        assert stateful.api.pfns("vm0")["count"] == 0
        lines = dropped_lines(stateful, since)
        assert len(lines) == 1 and "inflate ring is at 0" in lines[0]["reason"]
        fe.close()
    finally:
        ram.close()


def test_a_new_qemu_on_the_same_ram_file_gets_nothing_discarded(stateful):
    """Another process connecting with the very same RAM file and rings at the
    very same indices (everything a QEMU on a fixed RAM path could repeat)
    is still another QEMU: emulated by reconnecting from a forked child, so
    only the peer process differs."""
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(stateful.sockets["vm0"], ram=ram)
        fe.start()
        held = list(range(fe.first_free_pfn, fe.first_free_pfn + 256))
        fe.inflate(held)
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0)
        crash_and_restart(stateful)
        ram.fill(held, seed=3)  # the new guest's data
        since = log_size(stateful)
        pid = os.fork()
        if pid == 0:  # the "new QEMU": connect, start, wait for the decision, exit
            code = 1
            try:
                reconnect(fe)
                stateful.wait_vm("vm0", lambda s: s["running"])
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        stateful.wait_vm("vm0", lambda s: not s["connected"])
        assert ram.damaged(held, seed=3) == [], "the old balloon was discarded under the new guest"
        lines = dropped_lines(stateful, since)
        assert len(lines) == 1 and lines[0]["reason"] == "another QEMU process"
        # and the same process reconnecting now finds nothing to restore either
        reconnect(fe)
        stateful.wait_vm("vm0", lambda s: s["running"])
        assert stateful.api.pfns("vm0")["count"] == 0 and ram.damaged(held, seed=3) == []
        fe.close()
    finally:
        ram.close()


@pytest.mark.parametrize("poison", [0, 0xAA])
def test_poison_value_survives_a_restart(stateful, poison):
    """Linux writes poison_val once, at probe. Restored known, reported free
    pages are discarded (0) or left alone (non-zero) as before the restart."""
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(stateful.sockets["vm0"], ram=ram)
        fe.probe(fe.choose_features(DRIVER_FEATURES | (1 << Feature.PAGE_POISON)))
        fe.set_poison(poison)
        fe.start()
        first = fe.first_free_pfn
        fe.inflate(range(first, first + 16))
        stateful.wait_vm("vm0", lambda s: s["pending_discard_bytes"] == 0)
        crash_and_restart(stateful)
        reconnect(fe)
        stateful.wait_vm("vm0", lambda s: s["running"] and s["ballooned_bytes"] == 16 * PAGE)
        free = list(range(first + 1024, first + 1024 + 64))
        ram.fill(free, seed=9)
        fe.report_free([(free[0] * PAGE, len(free) * PAGE)])
        state = stateful.api.vm("vm0")
        if poison:
            assert ram.damaged(free, seed=9) == [], "poisoned free pages were discarded after the restart"
            assert state["counters"]["reports_skipped_poison"] == 1
        else:
            assert ram.nonzero(free) == [], "poison 0 was lost: free pages no longer reported"
            assert state["counters"]["reports_skipped_poison"] == 0
        fe.close()
    finally:
        ram.close()


def test_kill_right_after_acknowledged_batches_restores_the_frontends_list(stateful):
    """Kill -9 at once after each acknowledgement (discards may be pending):
    the restored set is exactly what the driver believes is ballooned."""
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(stateful.sockets["vm0"], ram=ram)
        fe.start()
        first = fe.first_free_pfn
        mine: set[int] = set()
        for round_ in range(3):
            batch = list(range(first + round_ * 1024, first + round_ * 1024 + 300))
            fe.inflate(batch)
            mine |= set(batch)
            fe.deflate(batch[:50])
            mine -= set(batch[:50])
            crash_and_restart(stateful)  # no wait for the discards
            reconnect(fe)
            stateful.wait_vm("vm0", lambda s: s["running"] and s["ballooned_bytes"] == len(mine) * PAGE)
            assert stateful.api.pfn_set("vm0") == mine
        fe.close()
    finally:
        ram.close()


def test_a_record_torn_by_the_kill_is_cut_off_and_nothing_is_discarded(stateful, tmp_path):
    """The log ends in half a record: replay stops there with one line; the
    ring is past the journal, so it is dropped, and no frame is discarded."""
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(stateful.sockets["vm0"], ram=ram)
        fe.start()
        first = fe.first_free_pfn
        fe.inflate(range(first, first + 256))
        fe.deflate(range(first, first + 256))
        stateful.proc.send_signal(signal.SIGKILL)
        stateful.proc.wait(10)
        (log,) = (tmp_path / "state").glob("vm0.log.*")
        log.write_bytes(log.read_bytes()[:-7])
        ram.fill(range(first, first + 256), seed=5)  # the guest uses its deflated pages
        since = log_size(stateful)
        stateful.start()
        reconnect(fe)
        stateful.wait_vm("vm0", lambda s: s["running"])
        assert ram.damaged(range(first, first + 256), seed=5) == [], "deflated pages were discarded"
        assert stateful.api.pfns("vm0")["count"] == 0
        assert [r for r in stateful.log_records(since) if "bad record" in r.get("event", "")]
        assert len(dropped_lines(stateful, since)) == 1
        fe.close()
    finally:
        ram.close()


@pytest.fixture
def tiny_state_dir(tmp_path):
    """A state directory on a 48 KiB tmpfs: the journal's writes fail with ENOSPC."""
    path = tmp_path / "tiny"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_state_disk_turns_persistence_off_and_the_guest_goes_on(tmp_path, tiny_state_dir):
    # Immediate discards: with the deferred mode a deflate racing a due flush
    # is a separate matter (see the deferral's own tests); here only the disk fails.
    d = DaemonProcess(tmp_path / "d", vms=("vm0",),
                      extra_args=[*DISCARD_MODES["immediate"], "--state-dir", str(tiny_state_dir)])
    d.start()
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(d.sockets["vm0"], ram=ram)
        fe.start()
        first = fe.first_free_pfn
        pfns = list(range(first, first + 16384))  # 128 KiB of records: more than the disk holds
        fe.inflate(pfns)  # returns only if every buffer came back
        fe.deflate(pfns[:4096])
        state = d.wait_vm("vm0", lambda s: s["ballooned_bytes"] == (16384 - 4096) * PAGE)
        assert state["counters"]["journal_write_errors"] == 1 and state["journal_persisting"] is False
        assert len([r for r in d.log_records() if "no longer persisted" in r.get("event", "")]) == 1
        # a restart must not restore the stale journal: the deflated pages are the guest's
        ram.fill(pfns[:4096], seed=11)
        crash_and_restart(d)
        reconnect(fe)
        d.wait_vm("vm0", lambda s: s["running"])
        assert ram.damaged(pfns[:4096], seed=11) == []
        assert d.api.pfns("vm0")["count"] == 0
        fe.close()
    finally:
        ram.close()
        d.stop()
