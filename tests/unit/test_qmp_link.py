"""QmpLink against a fake QMP server (asyncio, Unix socket), and the policy
leaving a VM alone whose QEMU is not running."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

import pytest

from balloond.services.policy import MiB
from balloond.services.qmp_link import QmpLink, QmpUnavailable, QmpWatch
from tests.fake_qmp import FakeQmp, until
from tests.unit.test_policy_loop import FakeVm, make_loop


def qemu(path: str, status: str) -> FakeQmp:
    """A FakeQmp whose query-status answers `fake.run_status` (set it to change state)."""
    fake = FakeQmp(path)
    fake.run_status = status  # type: ignore[attr-defined]

    def query_status(_args: dict[str, Any]) -> dict[str, Any]:
        return {"status": fake.run_status, "singlestep": False, "running": fake.run_status == "running"}

    fake.commands["query-status"] = query_status
    return fake


async def event(fake: FakeQmp, name: str, status: str) -> None:
    """The guest changes state and QEMU says so (STOP/RESUME carry no data)."""
    fake.run_status = status  # type: ignore[attr-defined]
    await fake.emit(name)



def test_link_retries_until_qemu_is_there_and_tracks_the_run_state(sock):
    async def main() -> None:
        link = QmpLink(sock, backoff_initial=0.02, backoff_max=0.1)
        link.start()
        await until(lambda: link.last_error is not None)  # no socket yet: retrying, nothing known
        assert (link.connected, link.running, link.status, link.pid) == (False, None, None, None)
        with pytest.raises(QmpUnavailable, match="is not connected"):
            await link.execute("query-status")
        fake = qemu(sock, "prelaunch")
        await fake.start()
        try:
            await until(lambda: link.connected)
            assert (link.running, link.status) == (False, "prelaunch")
            assert [name for name, _ in fake.calls[:2]] == ["qmp_capabilities", "query-status"]
            assert link.pid == os.getpid()  # SO_PEERCRED: the fake serves from this process
            assert link.last_error is None
            assert (await link.execute("query-status"))["status"] == "prelaunch"
            await event(fake, "RESUME", "running")
            await until(lambda: link.status == "running")
            assert link.running is True
            await event(fake, "STOP", "paused")
            await until(lambda: link.status == "paused")
            assert link.running is False and link.summary() == {"qmp_connected": True, "run_state": "paused"}
            # QEMU restarts: the link forgets, then reconnects and asks again
            await fake.stop()
            await until(lambda: not link.connected)
            assert link.status is None and link.running is None and link.pid is None
            with pytest.raises(QmpUnavailable):
                await link.execute("query-status")
            fake = qemu(sock, "inmigrate")
            await fake.start()
            await until(lambda: link.connected and link.status == "inmigrate")
            assert link.connects == 2 and link.pid == os.getpid()
        finally:
            await link.stop()
            await fake.stop()
        assert link.connected is False and link.status is None

    asyncio.run(main())


def test_policy_leaves_a_paused_vm_alone_and_says_why():
    class QmpVm(FakeVm):
        run_state: str | None = "running"

        def status(self):
            return dataclasses.replace(super().status(), run_state=self.run_state)

    a, b = QmpVm("a", used=512 * MiB), QmpVm("b", used=512 * MiB)
    loop = make_loop([a, b], available=256 * MiB)  # host short: reclaim
    b.run_state = "paused"
    d = loop.tick()
    by = {v.name: v for v in d.vms}
    assert by["a"].action == "inflate" and a.target > 0
    assert by["b"].action == "skip" and by["b"].reason == "VM paused (QMP)" and b.calls == []
    for state in ("inmigrate", "postmigrate", "finish-migrate", "suspended"):
        b.run_state = state
        by = {v.name: v for v in loop.tick().vms}
        assert by["b"].action == "skip" and by["b"].reason == f"VM {state} (QMP)"
    assert b.calls == []
    b.run_state = "running"
    by = {v.name: v for v in loop.tick().vms}
    assert by["b"].action == "inflate" and b.calls
    # no QMP (run_state None): managed as before
    b.run_state = None
    assert {v.name: v for v in loop.tick().vms}["b"].action != "skip"


def test_virtual_machine_summary_carries_the_qmp_state(tmp_path):
    from balloond.device.balloon import DeviceSettings
    from balloond.vm import VirtualMachine

    vm = VirtualMachine("g", str(tmp_path / "g.sock"), DeviceSettings())
    s = vm.summary()
    assert s["qmp_connected"] is False and s["run_state"] is None
    link = QmpLink(str(tmp_path / "q.sock"))
    link.connected, link.run_state.status, link.run_state.running = True, "paused", False
    vm.qmp = link
    s = vm.summary()
    assert s["qmp_connected"] is True and s["run_state"] == "paused"


def test_daemon_wires_a_link_for_vms_with_qmp(tmp_path):
    from balloond.services import config
    from balloond.services.daemon import Daemon

    settings, _ = config.load(["--vm", f"a={tmp_path}/a.sock,qmp={tmp_path}/a.qmp", "--vm", f"b={tmp_path}/b.sock"])
    d = Daemon(settings)
    d.open_sockets()
    try:
        assert isinstance(d.vms["a"].qmp, QmpLink) and d.vms["a"].qmp.path == f"{tmp_path}/a.qmp"
        assert d.vms["b"].qmp is None
    finally:
        for listener in d.listeners:
            listener.close()


def test_link_learns_the_ram_size_and_a_vm_checks_targets_against_it(sock):
    from balloond.device.balloon import DeviceSettings
    from balloond.vm import TargetError, VirtualMachine

    async def main() -> None:
        async with FakeQmp(sock) as fake:
            fake.commands["query-memory-size-summary"] = lambda _a: {"base-memory": 256 * MiB,
                                                                      "plugged-memory": 128 * MiB}
            link = QmpLink(sock, backoff_initial=0.02)
            vm = VirtualMachine("g", None, DeviceSettings())
            vm.qmp = link
            assert vm.ram_bytes() == 0  # nothing known: any target is taken
            link.start()
            try:
                await until(lambda: link.connected)
                assert link.ram_bytes == 384 * MiB
                # before the guest's memory reaches the daemon, QMP's size bounds the target
                assert vm.summary()["guest_ram_bytes"] == 384 * MiB
                with pytest.raises(TargetError, match="more than the guest's"):
                    vm.set_target_bytes(512 * MiB)
                assert vm.set_target_bytes(128 * MiB) == 128 * MiB // 4096
                fake.drop_clients()
                await until(lambda: link.ram_bytes is None)
                assert vm.ram_bytes() == 384 * MiB  # remembered, as from a last connection
            finally:
                await link.stop()

    asyncio.run(main())


class Journal(QmpWatch):
    """A watch that writes down which of its hooks ran, in order, and whose
    on_connect sets something up in QEMU (as the discard guard does)."""

    poll_interval: float | None = 0.05

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def on_connect(self, client: Any) -> None:
        self.seen.append("connect")
        await client.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        await self.refresh(client)

    async def refresh(self, client: Any) -> None:
        self.seen.append("look")
        await client.execute("query-migrate")


def test_on_connect_runs_once_per_session_before_the_polls(sock):
    async def main() -> None:
        async with FakeQmp(sock) as fake:
            watch = Journal()
            link = QmpLink(sock, backoff_initial=0.01, backoff_max=0.05)
            link.add(watch)
            link.start()
            try:
                await until(lambda: watch.seen.count("look") >= 4)
                assert watch.seen[:2] == ["connect", "look"] and watch.seen.count("connect") == 1
                assert link.connected and fake.migrate_capabilities["events"] is True
                fake.drop_clients()
                await until(lambda: watch.seen.count("connect") == 2
                            and len(watch.seen) > watch.seen.index("connect", 1) + 1)
                assert watch.seen[watch.seen.index("connect", 1) + 1] == "look"
            finally:
                await link.stop()
            names = [name for name, _ in fake.calls if name in ("migrate-set-capabilities", "query-migrate")]
            assert names[:2] == ["migrate-set-capabilities", "query-migrate"]
            assert names.count("migrate-set-capabilities") == 2

    asyncio.run(main())
