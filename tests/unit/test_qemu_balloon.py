"""QemuBalloonVm (a VM with QEMU's built-in virtio-balloon, steered over QMP)
over a real QmpLink against tests.fake_qmp.FakeQmp playing such a QEMU."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import structlog

from balloond.services.policy import HostSample, MiB
from balloond.services.qemu_balloon import QemuBalloonVm
from balloond.services.qmp_link import QmpLink
from balloond.vm import NotSupported, TargetError
from tests.fake_qmp import FakeQmp, QemuBalloon, until
from tests.unit.test_policy_loop import make_loop

RAM = 512 * MiB
DEVICE = "/machine/peripheral/balloon0"
log = structlog.get_logger()



def balloon_calls(fake: FakeQmp) -> list[int]:
    return [args["value"] for name, args in fake.calls if name == "balloon"]


def count(fake: FakeQmp, command: str) -> int:
    return sum(1 for name, _ in fake.calls if name == command)


def make_vm(path: str, *, poll_interval: float = 0.02, stats_interval: float = 0.0) -> QemuBalloonVm:
    link = QmpLink(path, backoff_initial=0.01, backoff_max=0.05, log=log)
    return QemuBalloonVm("q", link, stats_interval=stats_interval, poll_interval=poll_interval, log=log)


def scenario(path: str, body: Callable[[FakeQmp, QemuBalloonVm], Awaitable[None]], *,
             setup: Callable[[FakeQmp], Any] = lambda fake: QemuBalloon(fake), connect: bool = True,
             **vm_kw: Any) -> None:
    async def main() -> None:
        async with FakeQmp(path) as fake:
            fake.qemu = setup(fake)  # type: ignore[attr-defined]
            vm = make_vm(path, **vm_kw)
            vm.qmp.start()
            try:
                if connect:
                    await until(lambda: vm.connected)
                await body(fake, vm)
            finally:
                await vm.qmp.stop()

    asyncio.run(main())


@pytest.mark.parametrize("container,name,kind", [
    ("/machine/peripheral", "balloon0", "virtio-balloon-pci"),
    ("/machine/peripheral-anon", "device[0]", "virtio-balloon-pci-non-transitional"),
])
def test_discovery_and_summary(sock, container, name, kind):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        s = vm.summary()
        assert s["kind"] == "qemu" and s["name"] == "q" and s["socket"] is None and s["qmp"] == sock
        assert s["connected"] is True and s["qmp_connected"] is True and s["run_state"] == "running"
        assert s["running"] is True and s["connections"] == 1
        assert s["device"] == f"{container}/{name}" and s["last_error"] is None
        assert s["guest_ram_bytes"] == RAM
        assert s["actual_bytes"] == s["ballooned_bytes"] == 0 and s["target_bytes"] == 0
        assert s["discard_inhibited"] is None and s["discard_guard"] is None
        assert s["host_freed_bytes"] is None and s["migrations"] is None
        assert s["counters"] == {"targets_sent": 0}
        # The fake runs in this process: QEMU's pid (SO_PEERCRED) is ours, its RSS ours.
        assert vm.qmp.pid == os.getpid()
        assert isinstance(s["resident_bytes"], int) and s["resident_bytes"] > 0
        with pytest.raises(NotSupported):
            vm.pfn_ranges()
        fake.qemu.logical = RAM - 96 * MiB  # the guest inflated on its own (someone else's `balloon`)
        await until(lambda: vm.summary()["actual_bytes"] == 96 * MiB)
        assert vm.summary()["ballooned_bytes"] == 96 * MiB
        assert balloon_calls(fake) == []

    scenario(sock, body, setup=lambda fake: QemuBalloon(fake, container=container, name=name, kind=kind))


def test_an_existing_balloon_is_taken_over_as_the_target(sock):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        assert vm.target_bytes == 128 * MiB
        s = vm.summary()
        assert s["target_bytes"] == s["actual_bytes"] == 128 * MiB
        polls = count(fake, "query-balloon")
        await until(lambda: count(fake, "query-balloon") >= polls + 3)  # several looks later
        assert balloon_calls(fake) == [] and vm.targets_sent == 0  # nothing deflated, nothing sent
        assert fake.qemu.logical == RAM - 128 * MiB

    scenario(sock, body, setup=lambda fake: QemuBalloon(fake, logical=RAM - 128 * MiB))


def test_set_target_sends_the_logical_size_and_the_summary_follows(sock):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        assert vm.set_target_bytes(64 * MiB) == 64 * MiB // 4096
        assert vm.summary()["target_bytes"] == 64 * MiB
        await until(lambda: balloon_calls(fake) == [RAM - 64 * MiB])
        await until(lambda: vm.summary()["actual_bytes"] == 64 * MiB)
        assert vm.summary()["counters"] == {"targets_sent": 1}
        polls = count(fake, "query-balloon")
        await until(lambda: count(fake, "query-balloon") >= polls + 3)
        assert balloon_calls(fake) == [RAM - 64 * MiB]  # an unchanged target is not sent again
        # The largest balloon QEMU takes: one page of guest left (value 0 is refused).
        vm.set_target_bytes(RAM - 4096)
        await until(lambda: balloon_calls(fake)[-1:] == [4096])
        vm.set_target_bytes(0)
        await until(lambda: balloon_calls(fake)[-1:] == [RAM])
        await until(lambda: vm.summary()["actual_bytes"] == 0)
        assert fake.handler_errors == [] and vm.last_error is None

    scenario(sock, body)


def test_targets_qemu_cannot_take_are_rejected(sock):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        for bad in (RAM, RAM + 4096, -1, 1.5, "64M", True, None):
            with pytest.raises(TargetError):
                vm.set_target_bytes(bad)
        assert vm.target_bytes == 0  # unchanged (taken over: no balloon)
        polls = count(fake, "query-balloon")
        await until(lambda: count(fake, "query-balloon") >= polls + 2)
        assert balloon_calls(fake) == [] and vm._push is None  # nothing scheduled, nothing sent

    scenario(sock, body)


def test_stats_are_decoded_from_guest_stats(sock):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        assert fake.qemu.polling == 3  # 2.5 s rounded up: QEMU takes whole seconds
        assert ("qom-set", {"path": DEVICE, "property": "guest-stats-polling-interval", "value": 3}) in fake.calls
        gets = count(fake, "qom-get")
        await until(lambda: count(fake, "qom-get") >= gets + 2)
        assert vm.stats == {} and vm.stats_updated_at is None  # last-update 0: nothing from the guest yet
        now = int(time.time())
        fake.qemu.stats.update({"stat-free-memory": 458502144, "stat-total-memory": 500 * MiB,
                                "stat-htlb-pgalloc": 5, "stat-htlb-pgfail": 1, "stat-swap-in": 0})
        fake.qemu.last_update = now
        await until(lambda: vm.stats_updated_at is not None)
        assert vm.stats_updated_at == float(now)
        assert vm.stats == {"free_memory": 458502144, "total_memory": 500 * MiB, "hugetlb_allocations": 5,
                            "hugetlb_failures": 1, "swap_in": 0}  # unset (2^64-1) ones dropped
        s = vm.summary()
        assert s["stats"] == vm.stats and s["stats_updated_at"] == float(now) and s["stats_interval"] == 2.5
        # Interval 0: polling off in QEMU, and guest-stats is no longer read.
        vm.set_stats_interval(0)
        await until(lambda: fake.qemu.polling == 0)
        polls = count(fake, "query-balloon")
        await until(lambda: count(fake, "query-balloon") >= polls + 2)  # a look under way has ended
        gets = count(fake, "qom-get")
        polls = count(fake, "query-balloon")
        await until(lambda: count(fake, "query-balloon") >= polls + 3)
        assert count(fake, "qom-get") == gets
        vm.set_stats_interval(2.5)
        await until(lambda: fake.qemu.polling == 3)
        with pytest.raises(TargetError):
            vm.set_stats_interval(-1)

    scenario(sock, body, stats_interval=2.5)


def test_balloon_change_updates_actual_before_the_next_poll(sock):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        polls = count(fake, "query-balloon")
        fake.qemu.logical = RAM - 32 * MiB
        await fake.emit("BALLOON_CHANGE", {"actual": RAM - 32 * MiB})
        await until(lambda: vm.summary()["actual_bytes"] == 32 * MiB, timeout=1.0)
        assert count(fake, "query-balloon") == polls  # the event, not a look, told it

    scenario(sock, body, poll_interval=60.0)


def test_an_inactive_balloon_is_not_connected_until_the_driver_comes(sock):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        await until(lambda: vm.last_error is not None)
        assert vm.qmp.connected is True and vm.connected is False
        assert "not active" in vm.last_error and "No balloon device has been activated" in vm.last_error
        s = vm.summary()
        assert s["connected"] is False and s["running"] is False and s["actual_bytes"] == 0
        assert s["last_error"] == vm.last_error
        assert vm.target_bytes is None and balloon_calls(fake) == []
        fake.qemu.active = True  # the guest's driver probed
        await until(lambda: vm.connected)
        assert vm.last_error is None and vm.target_bytes == 0

    scenario(sock, body, setup=lambda fake: QemuBalloon(fake, active=False), connect=False)


def test_a_vm_without_a_balloon_device_says_so(sock):
    def no_device(fake: FakeQmp) -> QemuBalloon:
        qemu = QemuBalloon(fake)
        fake.qom["/machine/peripheral"] = [{"name": "type", "type": "string"},
                                           {"name": "net0", "type": "child<virtio-net-pci>"}]
        return qemu

    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        await until(lambda: vm.last_error is not None)
        assert vm.last_error == "no virtio-balloon device in this VM"
        assert vm.connected is False and vm.device_path is None and vm.summary()["device"] is None
        assert count(fake, "query-balloon") == 0
        fake.qom["/machine/peripheral"].append({"name": "balloon0", "type": "child<virtio-balloon-pci>"})
        await until(lambda: vm.connected)  # device_add: found on the next look
        assert vm.device_path == DEVICE and vm.last_error is None

    scenario(sock, body, setup=no_device, connect=False)


def test_a_restarted_qemu_gets_the_target_again(sock):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        vm.set_target_bytes(64 * MiB)
        await until(lambda: balloon_calls(fake) == [RAM - 64 * MiB])
        sets = count(fake, "qom-set")
        fake.qemu = QemuBalloon(fake)  # a new QEMU: no balloon, polling off
        fake.drop_clients()
        await until(lambda: vm.qmp.connects == 2 and vm.connected)
        await until(lambda: balloon_calls(fake) == [RAM - 64 * MiB] * 2)
        assert fake.qemu.logical == RAM - 64 * MiB and vm.target_bytes == 64 * MiB  # not taken over
        assert fake.qemu.polling == 5 and count(fake, "qom-set") == sets + 1  # the polling interval too
        await until(lambda: vm.summary()["actual_bytes"] == 64 * MiB)

    scenario(sock, body, stats_interval=5.0)


def test_a_target_set_while_disconnected_is_sent_on_connect(sock):
    async def main() -> None:
        vm = make_vm(sock)
        vm.qmp.start()
        try:
            await until(lambda: vm.qmp.last_error is not None)
            # RAM is not known yet: any size is taken, and capped once it is.
            assert vm.set_target_bytes(RAM) == RAM // 4096
            assert vm.summary()["connected"] is False and vm.summary()["target_bytes"] == RAM
            await until(lambda: vm._push is not None and vm._push.done())  # the push found no link
            assert vm._push.exception() is None and vm.last_error is None
            async with FakeQmp(sock) as fake:
                fake.qemu = QemuBalloon(fake, logical=RAM - 128 * MiB)  # an existing balloon, not taken over
                await until(lambda: balloon_calls(fake) != [])
                assert balloon_calls(fake) == [4096]  # RAM - (RAM - one page): never value 0
                assert vm.target_bytes == RAM
                await until(lambda: vm.summary()["actual_bytes"] == RAM - 4096)
                vm.set_target_bytes(100 * MiB)
                await until(lambda: balloon_calls(fake) == [4096, RAM - 100 * MiB])
        finally:
            await vm.qmp.stop()

    asyncio.run(main())


def test_the_policy_loop_steers_a_qemu_balloon_vm(sock):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        fake.qemu.stats.update({"stat-total-memory": RAM - 16 * MiB, "stat-available-memory": 400 * MiB,
                                "stat-free-memory": 380 * MiB, "stat-major-faults": 0})
        fake.qemu.last_update = int(time.time())
        await until(lambda: "available_memory" in vm.stats)
        loop = make_loop([vm], host=lambda: HostSample(256 * MiB, 32 * 1024 * MiB))  # the host is short
        d = loop.tick()
        assert d.vm("q").action == "inflate", d.vm("q")
        assert vm.target_bytes and vm.target_bytes > 0
        await until(lambda: balloon_calls(fake) == [RAM - vm.target_bytes])
        await until(lambda: vm.summary()["actual_bytes"] == vm.target_bytes)

    scenario(sock, body, stats_interval=1.0)


def test_a_deleted_balloon_is_dropped_and_a_new_one_found(sock):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        vm.set_target_bytes(64 * MiB)
        await until(lambda: balloon_calls(fake) == [RAM - 64 * MiB])
        fake.qom["/machine/peripheral"] = [{"name": "type", "type": "string"}]  # device_del
        await fake.emit("DEVICE_DELETED", {"device": "balloon0", "path": DEVICE})
        await until(lambda: vm.device_path is None)
        assert vm.connected is False and vm.summary()["actual_bytes"] == 0
        await until(lambda: vm.last_error == "no virtio-balloon device in this VM")
        assert vm.target_bytes == 64 * MiB  # the target is the VM's, not the device's

    scenario(sock, body, stats_interval=5.0)


def test_a_re_added_balloon_gets_the_target_and_stats_polling(sock):
    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        vm.set_target_bytes(64 * MiB)
        await until(lambda: balloon_calls(fake) == [RAM - 64 * MiB] and fake.qemu.polling == 5)
        await fake.emit("DEVICE_DELETED", {"device": "balloon0", "path": DEVICE})
        await until(lambda: vm.device_path is None)
        fake.qemu = QemuBalloon(fake)  # device_add of a fresh balloon: no balloon, polling off
        await until(lambda: vm.connected)
        await until(lambda: len(balloon_calls(fake)) == 2 and fake.qemu.polling == 5, timeout=0.5)

    scenario(sock, body, stats_interval=5.0)


def test_a_reply_it_cannot_read_is_reported_and_the_link_stays(sock):
    def odd(fake: FakeQmp) -> QemuBalloon:
        qemu = QemuBalloon(fake)
        fake.commands["query-balloon"] = lambda _a: {"size": 1}  # not what QEMU says
        return qemu

    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        await until(lambda: vm.last_error is not None)
        assert vm.last_error.startswith("QEMU's query-balloon reply has no size")
        assert vm.connected is False and vm.qmp.connected and vm.qmp.connects == 1
        fake.commands["query-balloon"] = fake.qemu.query_balloon
        await until(lambda: vm.connected)

    scenario(sock, body, setup=odd, connect=False)


def test_a_watch_that_cannot_read_a_reply_does_not_end_the_session(sock):
    def odd(fake: FakeQmp) -> QemuBalloon:
        qemu = QemuBalloon(fake)
        fake.commands["query-memory-size-summary"] = lambda _a: {"base-memory": "lots"}
        return qemu

    async def body(fake: FakeQmp, vm: QemuBalloonVm) -> None:
        await until(lambda: vm.qmp.connected)
        polls = count(fake, "query-balloon")
        await until(lambda: count(fake, "query-balloon") >= polls + 3)
        # the RAM size watch could not read its reply; the link and the other watches go on
        assert vm.qmp.connected and vm.qmp.connects == 1 and vm.qmp.ram_bytes is None
        assert vm.qmp.status == "running" and vm.guest_ram_bytes == 0
        assert balloon_calls(fake) == []  # without the RAM size no target can be sent

    scenario(sock, body, setup=odd, connect=False)
