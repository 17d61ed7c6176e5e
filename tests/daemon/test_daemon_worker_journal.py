"""A VM's journal found corrupt when its worker starts (--state-dir, process
isolation): a snapshot of garbage, or a log whose record is torn. That VM
starts with an empty balloon and one line saying so, naming it; the other
VM's worker restores its balloon for the same frontend reconnecting; the
daemon stays up and its API answers."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest

from harness.daemon import DaemonProcess
from tests.frontend import GuestRam, TestFrontend

PAGE = 4096


def reconnect(fe: TestFrontend) -> None:
    """What a reconnecting QEMU does after its backend went away."""
    fe.close()  # the GuestRam is the test's, so the rings stay as they are
    for q in fe.queues.values():
        q.base = q.read_used_idx()
    fe.connect()
    fe.start()


def spoil_snapshot(state) -> None:
    (state / "vm0.snap").write_bytes(b"\x00garbage\xff{not a header" * 100)


def tear_log(state) -> None:
    """Only a log, its one record cut short (as a kill in mid-write leaves it)."""
    for path in state.glob("vm0.*"):
        path.unlink()
    header = b"I" + (8 * 257).to_bytes(4, "little") + b"\x12\x34\x56\x78"
    (state / "vm0.log.0").write_bytes(header + b"\x01" * 100)


@pytest.mark.parametrize("spoil, level, line", [(spoil_snapshot, "error", "state snapshot unusable"),
                                                (tear_log, "warning", "state log: replay stopped at a bad record")])
def test_a_corrupt_journal_empties_only_its_vm(tmp_path, spoil, level, line):
    state = tmp_path / "state"
    d = DaemonProcess(tmp_path / "d", vms=("vm0", "vm1"), extra_args=["--state-dir", str(state)])
    ram0, ram1 = GuestRam(64 << 20), GuestRam(96 << 20)
    try:
        d.start()
        fe0 = TestFrontend(d.sockets["vm0"], ram=ram0)
        fe0.start()
        fe0.inflate(range(fe0.first_free_pfn, fe0.first_free_pfn + 256))
        d.api.set_target("vm0", 2 << 20)
        fe1 = TestFrontend(d.sockets["vm1"], ram=ram1)
        fe1.start()
        held = list(range(fe1.first_free_pfn, fe1.first_free_pfn + 512))
        ram1.touch(held)
        fe1.inflate(held)
        d.api.set_target("vm1", 4 << 20)
        for vm, count in (("vm0", 256), ("vm1", 512)):
            d.wait_vm(vm, lambda s, count=count: s["ballooned_bytes"] == count * PAGE and s["pending_discard_bytes"] == 0)
        fe0.close()
        assert d.stop() == 0, d.log_tail()
        assert sorted(p.name for p in state.glob("vm0.*")), "the first run left vm0 no journal to spoil"

        spoil(state)
        since = d.log_size()
        d.start()
        reconnect(fe1)
        d.wait_vm("vm1", lambda s: s["connected"] and s["ballooned_bytes"] == len(held) * PAGE)
        assert d.api.pfn_set("vm1") == set(held)
        assert d.api.vm("vm1")["target_bytes"] == 4 << 20

        vm0 = d.api.vm("vm0")
        assert vm0["target_bytes"] == 0 and vm0["ballooned_bytes"] == 0
        assert vm0["worker"]["state"] == "running" and vm0["worker"]["restarts"] == 0
        assert d.api.pfns("vm0")["count"] == 0
        with TestFrontend(d.sockets["vm0"]) as fresh:  # vm0 is served: an empty balloon
            fresh.start()
            assert fresh.num_pages() == 0
            fresh.inflate([fresh.first_free_pfn])
            d.wait_vm("vm0", lambda s: s["ballooned_bytes"] == PAGE)
        assert [s["name"] for s in d.api.vms()] == ["vm0", "vm1"]
        assert "balloond_vm_ballooned_bytes" in d.api.metrics()

        records = d.log_records(since)
        said = [r for r in records if r.get("level") in ("warning", "error") and r.get("vm") == "vm0"]
        assert len(said) == 1 and said[0]["level"] == level and said[0]["event"].startswith(line), said
        assert not [r for r in records if r.get("level") in ("warning", "error") and r.get("vm") == "vm1"]
        assert not [r for r in records if r.get("event") == "worker ended; starting another"]
        assert d.alive
        fe1.close()
    finally:
        code = d.stop()
        ram0.close()
        ram1.close()
    assert code == 0, d.log_tail()


def test_a_vm_waits_for_its_journal_lock_and_only_that_vm(tmp_path):
    """Another process holds vm0's journal lock when the daemon starts, as a
    worker of a killed supervisor does until PR_SET_PDEATHSIG ends it:
    vm0's worker waits (one log line naming the holder, heartbeats meanwhile,
    so it is not taken for hung), neither restores nor writes the journal,
    nor serves vm0's frontend, while vm1 on the same daemon is served as
    usual. Once the lock is released vm0's frontend gets its balloon back."""
    timeout = 1.5
    state = tmp_path / "state"
    d = DaemonProcess(tmp_path / "d", vms=("vm0", "vm1"),
                      extra_args=["--state-dir", str(state), "--worker-timeout", str(timeout)])
    ram0, ram1 = GuestRam(64 << 20), GuestRam(64 << 20)
    lock_fd = None
    try:
        d.start()
        fe0 = TestFrontend(d.sockets["vm0"], ram=ram0, timeout=30)
        fe0.start()
        held = list(range(fe0.first_free_pfn, fe0.first_free_pfn + 256))
        ram0.touch(held)
        fe0.inflate(held)
        d.wait_vm("vm0", lambda s: s["ballooned_bytes"] == len(held) * PAGE and s["pending_discard_bytes"] == 0)
        assert d.stop() == 0, d.log_tail()
        journal = {p.name: p.read_bytes() for p in state.glob("vm0.*") if p.suffix != ".lock"}
        assert journal, "the first run left vm0 no journal"

        lock_fd = os.open(state / "vm0.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(lock_fd, 0)
        os.write(lock_fd, f"{os.getpid()}\n".encode())
        since = d.log_size()
        d.start()
        served: dict[str, float] = {}
        t = threading.Thread(target=lambda: (reconnect(fe0), served.update(at=time.monotonic())), daemon=True)
        t.start()

        with TestFrontend(d.sockets["vm1"], ram=ram1) as fe1:
            fe1.start()
            start = time.monotonic()
            fe1.inflate(list(range(fe1.first_free_pfn, fe1.first_free_pfn + 512)))
            assert time.monotonic() - start < 2.0
            d.wait_vm("vm1", lambda s: s["connected"] and s["ballooned_bytes"] == 512 * PAGE)
        time.sleep(2 * timeout)  # past the heartbeat timeout: a waiting worker is not a hung one
        assert t.is_alive() and not served, "vm0's frontend was served while its journal was locked"
        vm0 = d.api.vm("vm0")
        assert not vm0["connected"] and vm0["ballooned_bytes"] == 0
        assert vm0["worker"]["state"] == "running" and vm0["worker"]["restarts"] == 0, vm0["worker"]
        assert {p.name: p.read_bytes() for p in state.glob("vm0.*") if p.suffix != ".lock"} == journal

        released = time.monotonic()
        os.close(lock_fd)  # drops the flock
        lock_fd = None
        t.join(10)
        assert served and served["at"] - released < 2.0
        d.wait_vm("vm0", lambda s: s["connected"] and s["ballooned_bytes"] == len(held) * PAGE)
        assert d.api.pfn_set("vm0") == set(held)

        records = d.log_records(since)
        waits = [r for r in records if r.get("event", "").startswith("journal locked by another process")]
        assert len(waits) == 1 and waits[0]["vm"] == "vm0" and waits[0]["holder"] == os.getpid(), waits
        assert not [r for r in records if r.get("event") == "worker ended; starting another"]
        fe0.close()
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
        code = d.stop()
        ram0.close()
        ram1.close()
    assert code == 0, d.log_tail()
