"""DiscardGuard over a real QmpLink against tests.fake_qmp.FakeQmp: it is
closed until QEMU answers, closes for assigned (VFIO) devices and migrations,
reopens when they are gone, and passes its verdict to a VM's devices."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from structlog.testing import capture_logs

from balloond.device.balloon import DeviceSettings
from balloond.services.discard_guard import NOT_CONNECTED, DiscardGuard
from balloond.services.qmp_link import QmpLink
from balloond.vm import VirtualMachine
from tests.fake_qmp import FakeQmp, QmpCommandError, until

TYPE_ENTRY = {"name": "type", "type": "string"}  # QEMU lists it first in every container
VFIO_ANON = "/machine/peripheral-anon/device[0]"
VFIO_REASON = f"assigned device(s) (VFIO): {VFIO_ANON}"
log = structlog.get_logger()



class Rig:
    """A link with a guard on it; `changes` records every on_change call."""

    def __init__(self, path: str, poll_interval: float = 0.05) -> None:
        self.changes: list[str | None] = []
        self.link = QmpLink(path, backoff_initial=0.01, backoff_max=0.05)
        self.guard = DiscardGuard(self.changes.append, log=log, poll_interval=poll_interval)
        self.link.add(self.guard)


def scenario(path: str, body: Callable[[FakeQmp, Rig], Awaitable[None]], *, poll_interval: float = 0.05) -> None:
    """Run `body` with a started fake and a connected link whose guard has opened."""

    async def main() -> None:
        async with FakeQmp(path) as fake:
            rig = Rig(path, poll_interval)
            rig.link.start()
            try:
                await until(lambda: rig.guard.reason is None)
                assert rig.changes == [None]
                await body(fake, rig)
            finally:
                await rig.link.stop()

    asyncio.run(main())


async def migrating(fake: FakeQmp, status: str) -> None:
    """The migration moves to `status` (announced only if "events" is on, as QEMU does)."""
    await fake.set_migration_status(status)


def migrate_queries(fake: FakeQmp) -> int:
    return sum(1 for name, _ in fake.calls if name == "query-migrate")


def anon_devices(fake: FakeQmp, *types: str) -> None:
    fake.qom["/machine/peripheral-anon"] = [TYPE_ENTRY] + [
        {"name": f"device[{i}]", "type": f"child<{t}>"} for i, t in enumerate(types)
    ]


def test_closed_until_qemu_answers_then_open_on_an_idle_vm(sock):
    async def main() -> None:
        rig = Rig(sock)
        assert rig.guard.reason == NOT_CONNECTED and rig.guard.summary()["discard_inhibited"] == NOT_CONNECTED
        rig.link.start()
        try:
            await until(lambda: rig.link.last_error is not None)  # tried: nothing there
            assert rig.guard.reason == NOT_CONNECTED
            assert rig.changes == []  # still closed: no change to report
            async with FakeQmp(sock) as fake:
                fake.qom["/machine/peripheral"] = [
                    TYPE_ENTRY,
                    {"name": "net0", "type": "child<virtio-net-pci>"},
                    {"name": "bus", "type": "link<PCIBus>"},
                ]
                anon_devices(fake, "virtio-balloon-pci")
                await until(lambda: rig.guard.reason is None)
                assert rig.changes == [None]
                s = rig.guard.summary()
                assert s["discard_inhibited"] is None and s["vfio_devices"] == []
                assert s["migration_status"] == "none"  # idle QEMU: query-migrate returns {}
                assert s["devices_seen"] == 2 and s["checked_at"] is not None
                names = [name for name, _ in fake.calls]
                assert {"qom-list", "query-migrate"} <= set(names)
                assert ("qom-list", {"path": "/machine/peripheral-anon"}) in fake.calls
                assert ("qom-list", {"path": "/machine/peripheral"}) in fake.calls
        finally:
            await rig.link.stop()

    asyncio.run(main())


def test_a_vfio_device_closes_it_within_the_poll_interval_and_removal_reopens(sock):
    async def body(fake: FakeQmp, rig: Rig) -> None:
        loop = asyncio.get_running_loop()
        anon_devices(fake, "vfio-pci")  # device_add of a VFIO device: QEMU sends no event
        start = loop.time()
        await until(lambda: rig.guard.reason is not None, timeout=1.0)
        assert loop.time() - start < 0.5  # poll interval 0.05 s
        assert rig.guard.reason == VFIO_REASON
        assert rig.guard.vfio_devices == [VFIO_ANON]
        assert rig.changes == [None, VFIO_REASON]
        anon_devices(fake)  # device_del
        await until(lambda: rig.guard.reason is None, timeout=1.0)
        assert rig.changes == [None, VFIO_REASON, None]
        # Other VFIO kinds under /machine/peripheral (named by -device id=) count too.
        fake.qom["/machine/peripheral"] = [TYPE_ENTRY, {"name": "gpu0", "type": "child<vfio-pci-nohotplug>"}]
        await until(lambda: rig.guard.reason is not None, timeout=1.0)
        assert rig.guard.reason == "assigned device(s) (VFIO): /machine/peripheral/gpu0"

    scenario(sock, body)


def test_migration_closes_it_postcopy_is_named_and_completion_reopens(sock):
    async def body(fake: FakeQmp, rig: Rig) -> None:
        await migrating(fake, "active")
        await until(lambda: rig.guard.reason is not None, timeout=1.0)
        assert rig.guard.reason == "migration in progress (active)"
        assert rig.guard.summary()["migration_status"] == "active"
        await migrating(fake, "postcopy-active")
        await until(lambda: rig.guard.reason != "migration in progress (active)", timeout=1.0)
        assert rig.guard.reason == "postcopy migration in progress (postcopy-active)"
        anon_devices(fake, "vfio-pci")  # both at once: both named
        await until(lambda: rig.guard.reason is not None and "VFIO" in rig.guard.reason, timeout=1.0)
        assert rig.guard.reason == VFIO_REASON + "; postcopy migration in progress (postcopy-active)"
        anon_devices(fake)
        await migrating(fake, "completed")
        await until(lambda: rig.guard.reason is None, timeout=1.0)
        for status in ("failed", "cancelled", "none"):
            await migrating(fake, status)
            polls = migrate_queries(fake)
            await until(lambda polls=polls: migrate_queries(fake) >= polls + 2)
            assert rig.guard.reason is None, status
        assert rig.changes == [
            None,
            "migration in progress (active)",
            "postcopy migration in progress (postcopy-active)",
            VFIO_REASON + "; postcopy migration in progress (postcopy-active)",
            None,
        ]

    scenario(sock, body)


def test_a_migration_event_triggers_an_immediate_check(sock):
    async def body(fake: FakeQmp, rig: Rig) -> None:
        assert fake.migrate_capabilities["events"] is True  # the guard turned them on
        looks = migrate_queries(fake)
        await asyncio.sleep(0.1)
        assert migrate_queries(fake) == looks  # no poll for 60 s: only an event makes it look
        assert await fake.set_migration_status("setup") is True  # QEMU sends MIGRATION
        await until(lambda: rig.guard.reason is not None, timeout=1.0)
        assert rig.guard.reason == "migration in progress (setup)"
        await fake.set_migration_status("completed")
        await until(lambda: rig.guard.reason is None, timeout=1.0)
        assert rig.changes == [None, "migration in progress (setup)", None]

    scenario(sock, body, poll_interval=60.0)


def test_it_turns_migration_events_on_before_its_first_look_at_every_connect(sock):
    async def body(fake: FakeQmp, rig: Rig) -> None:
        names = [name for name, _ in fake.calls]
        assert ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}) in fake.calls
        assert names.index("migrate-set-capabilities") < names.index("query-migrate")
        assert rig.guard.migration_events is True and rig.guard.summary()["migration_events"] is True
        # QEMU restarts: the new process has the capability off again
        fake.drop_clients()
        await until(lambda: rig.guard.reason == NOT_CONNECTED, timeout=1.0)
        assert rig.guard.migration_events is None
        fake.migrate_capabilities["events"] = False
        await until(lambda: rig.guard.reason is None)
        assert rig.link.connects == 2
        assert fake.migrate_capabilities["events"] is True
        assert sum(1 for name, _ in fake.calls if name == "migrate-set-capabilities") == 2

    with capture_logs() as logs:
        scenario(sock, body, poll_interval=60.0)
    assert [e["event"] for e in logs if "migration events" in e["event"]] == ["migration events on"] * 2


def test_refused_during_a_migration_it_polls_then_turns_events_on_when_it_ends(sock):
    async def main() -> None:
        async with FakeQmp(sock) as fake:
            await fake.set_migration_status("active")  # running before the daemon connects
            rig = Rig(sock, poll_interval=0.05)
            rig.link.start()
            try:
                await until(lambda: rig.guard.reason == "migration in progress (active)")
                assert rig.guard.migration_events is False and fake.migrate_capabilities["events"] is False
                assert await fake.set_migration_status("cancelled") is False  # unannounced...
                await until(lambda: rig.guard.reason is None, timeout=1.0)  # ... but polled
                await until(lambda: rig.guard.migration_events is True, timeout=1.0)
                assert fake.migrate_capabilities["events"] is True
                assert await fake.set_migration_status("setup") is True  # announced from now on
                await until(lambda: rig.guard.reason == "migration in progress (setup)", timeout=1.0)
            finally:
                await rig.link.stop()

    with capture_logs() as logs:
        asyncio.run(main())
    mentions = [(e["log_level"], e["event"]) for e in logs if "migration events" in e["event"]]
    assert mentions == [
        ("warning", "migration events refused: the discard guard relies on polling"),
        ("info", "migration events on"),
    ]
    assert [e for e in logs if e["event"] == "migration events on"][0]["retried"] is True


def test_refused_for_good_it_says_so_once_and_still_catches_migrations_by_polling(sock):
    async def main() -> None:
        async with FakeQmp(sock) as fake:

            def refuse(_args: dict[str, Any]) -> Any:
                raise QmpCommandError("GenericError", "capabilities are managed elsewhere")

            fake.commands["migrate-set-capabilities"] = refuse
            rig = Rig(sock, poll_interval=0.05)
            rig.link.start()
            try:
                await until(lambda: rig.guard.reason is None)
                assert rig.guard.migration_events is False
                for _ in range(2):  # two migrations, start to end, none announced
                    assert await fake.set_migration_status("setup") is False
                    await until(lambda: rig.guard.reason == "migration in progress (setup)", timeout=1.0)
                    await fake.set_migration_status("completed")
                    await until(lambda: rig.guard.reason is None, timeout=1.0)
                assert rig.link.connected and rig.link.connects == 1
            finally:
                await rig.link.stop()
            assert sum(1 for name, _ in fake.calls if name == "migrate-set-capabilities") == 3  # connect + 2 ends

    with capture_logs() as logs:
        asyncio.run(main())
    refusals = [e for e in logs if e["event"].startswith("migration events refused")]
    assert len(refusals) == 1
    assert refusals[0]["error_class"] == "GenericError" and refusals[0]["poll_interval"] == 0.05
    assert "capabilities are managed elsewhere" in refusals[0]["error"]


def test_a_dropped_link_closes_it_until_qemu_answers_again(sock):
    async def body(fake: FakeQmp, rig: Rig) -> None:
        anon_devices(fake, "vfio-pci")
        await until(lambda: rig.guard.reason == VFIO_REASON, timeout=1.0)
        fake.drop_clients()  # QEMU went away (the fake keeps listening: it comes back)
        await until(lambda: rig.guard.reason == NOT_CONNECTED, timeout=1.0)
        assert rig.guard.vfio_devices == [] and rig.guard.migration_status is None
        anon_devices(fake)  # the new QEMU has no VFIO device
        await until(lambda: rig.guard.reason is None)
        assert rig.link.connects == 2
        assert rig.changes == [None, VFIO_REASON, NOT_CONNECTED, None]

    scenario(sock, body)


def test_a_qom_list_error_on_one_container_does_not_crash_it(sock):
    async def main() -> None:
        async with FakeQmp(sock) as fake:
            del fake.qom["/machine/peripheral"]  # DeviceNotFound for that container
            anon_devices(fake, "vfio-pci")
            rig = Rig(sock)
            rig.link.start()
            try:
                await until(lambda: rig.guard.reason is not None and rig.guard.reason != NOT_CONNECTED)
                assert rig.guard.reason == VFIO_REASON  # the other container was still read
                assert fake.handler_errors == []
                # A container failing some other way (GenericError) could hide
                # a VFIO device: the guard cannot tell, so it stays closed.
                real_qom_list = fake.commands["qom-list"]

                def flaky(args: dict[str, Any]) -> Any:
                    if args.get("path") == "/machine/peripheral-anon":
                        raise QmpCommandError("GenericError", "something went wrong")
                    return real_qom_list(args)

                fake.qom["/machine/peripheral"] = [TYPE_ENTRY]
                fake.commands["qom-list"] = flaky
                await until(lambda: rig.guard.reason is not None and "could not tell" in rig.guard.reason)
                assert "GenericError" in rig.guard.reason
                assert rig.link.connected and rig.link.connects == 1  # the session survived
                fake.commands["qom-list"] = real_qom_list
                fake.qom["/machine/peripheral-anon"] = [TYPE_ENTRY]
                await until(lambda: rig.guard.reason is None, timeout=1.0)
            finally:
                await rig.link.stop()

    asyncio.run(main())


def test_it_stays_closed_while_query_migrate_is_refused(sock):
    async def main() -> None:
        async with FakeQmp(sock) as fake:

            def refuse(_args: dict[str, Any]) -> Any:
                raise QmpCommandError("GenericError", "not now")

            answer = fake.commands["query-migrate"]
            fake.commands["query-migrate"] = refuse
            rig = Rig(sock)
            rig.link.start()
            try:
                await until(lambda: rig.link.connected)
                await until(lambda: migrate_queries(fake) >= 3)
                # failing closed: QEMU answers, but cannot say whether a migration runs
                assert rig.guard.reason is not None and "could not tell" in rig.guard.reason
                assert rig.changes == [rig.guard.reason]
                fake.commands["query-migrate"] = answer
                await until(lambda: rig.guard.reason is None, timeout=1.0)
            finally:
                await rig.link.stop()

    asyncio.run(main())


def test_a_virtual_machine_wired_to_a_guard_passes_the_reason_to_its_device(sock):
    async def serve_once(vm: VirtualMachine) -> None:
        """A frontend that connects and hangs up: the VM builds a device for it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        theirs.close()
        await asyncio.wait_for(vm.serve_connection(ours), 2.0)

    async def main() -> None:
        vm = VirtualMachine("g", None, DeviceSettings(), log=log)
        # As Daemon.open_sockets wires a VM configured with qmp=PATH.
        vm.qmp = QmpLink(sock, log=log, backoff_initial=0.01, backoff_max=0.05)
        vm.discard_guard = DiscardGuard(vm.set_discard_inhibit, log=log, poll_interval=0.05)
        vm.qmp.add(vm.discard_guard)
        vm.set_discard_inhibit(vm.discard_guard.reason)
        assert vm.summary()["discard_inhibited"] == NOT_CONNECTED
        await serve_once(vm)
        device = vm.device
        assert device is not None
        assert device.discard_inhibit == NOT_CONNECTED and device.snapshot().discard_inhibited == NOT_CONNECTED
        assert device.counters.discard_inhibits == 1
        async with FakeQmp(sock) as fake:
            vm.qmp.start()
            try:
                await until(lambda: vm.discard_inhibit is None)
                assert device.discard_inhibit is None  # the live device follows the guard
                s = vm.summary()
                assert s["discard_inhibited"] is None and s["qmp_connected"] is True
                assert s["discard_guard"]["discard_inhibited"] is None
                anon_devices(fake, "vfio-pci")
                await until(lambda: vm.discard_inhibit is not None, timeout=1.0)
                assert device.discard_inhibit == VFIO_REASON
                s = vm.summary()
                assert s["discard_inhibited"] == VFIO_REASON
                assert s["discard_guard"]["vfio_devices"] == [VFIO_ANON]
                await serve_once(vm)  # a new connection starts with the guard's verdict
                assert vm.device is not device and vm.device.discard_inhibit == VFIO_REASON
            finally:
                await vm.qmp.stop()
        assert vm.discard_inhibit == NOT_CONNECTED  # stopping the link forgets

    asyncio.run(main())
