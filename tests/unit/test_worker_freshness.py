"""The supervisor's side of the API's freshness contract (docs/api.md): a
read of many VMs asks only the workers whose last report predates a command
sent to them, and a report that has seen the command ends that; a read of
one VM always asks its worker. Here the worker is the test, on the other end
of a real socketpair."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from balloond.device.balloon import DeviceSettings
from balloond.services.api import _refresh, _refresh_one
from balloond.status import ServingStatus
from balloond.worker.channel import (
    TO_WORKER,
    GetStatus,
    SetDiscardInhibit,
    SetStatsInterval,
    SetTarget,
    Status,
    encode,
    read_message,
)
from balloond.worker.process import WorkerSpec
from balloond.worker.supervisor import REFRESH_TIMEOUT, WorkerVm

MIB = 1 << 20


class FakeWorker:
    """The worker's end of the channel, driven by the test."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def next(self, timeout: float = 1.0):
        return await asyncio.wait_for(read_message(self.reader, TO_WORKER), timeout)

    async def nothing(self, within: float = 0.2) -> None:
        with pytest.raises(TimeoutError):
            message = await self.next(within)
            pytest.fail(f"the supervisor sent {message!r}")

    def report(self, applied: int, request_id: int = 0, **serving) -> None:
        self.writer.write(encode(Status(ServingStatus(guest_ram_bytes=64 * MIB, **serving), request_id, applied)))


async def running_vm(sent_before_start: int = 0, timeout: float = 5.0) -> tuple[WorkerVm, FakeWorker, asyncio.Task]:
    spec = WorkerSpec(name="vm0", socket="/nonexistent", settings=DeviceSettings(), poll_seconds=0.0,
                      state_dir=None, target_pages=None, discard_inhibit=None, log_format="text",
                      log_level="warning")
    vm = WorkerVm(spec, socket.socket(socket.AF_UNIX), context=None, timeout=timeout)  # type: ignore[arg-type]
    for _ in range(sent_before_start):  # no worker yet: each goes into the next worker's spec
        vm.set_stats_interval(2)
    assert vm.sent == sent_before_start
    vm.applied = vm.sent  # as _run_worker does when it makes the spec
    parent, child = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=parent)
    vm._writer, vm.state = writer, "running"
    reading = asyncio.create_task(vm._read(reader))
    worker = FakeWorker(*await asyncio.open_unix_connection(sock=child))
    worker.report(vm.sent)  # its first report
    await asyncio.sleep(0.05)
    assert vm.serving.guest_ram_bytes == 64 * MIB
    return vm, worker, reading


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_list_asks_only_a_worker_that_has_not_seen_a_command():
    async def go():
        vm, worker, reading = await running_vm()
        # No command outstanding: a list does not ask, and does not wait.
        assert not vm.stale
        await _refresh(vm)
        await worker.nothing()

        vm.set_target_bytes(8 * MIB)
        command = await worker.next()
        assert command == SetTarget(2048, 1)
        assert vm.stale
        # A report the worker made before it applied the command does not end it.
        worker.report(0)
        await asyncio.sleep(0.05)
        assert vm.stale

        listing = asyncio.create_task(_refresh(vm))
        ask = await worker.next()
        assert isinstance(ask, GetStatus)
        assert not listing.done(), "the list must wait for the report that has seen the command"
        worker.report(1, ask.id, target_pages=2048)
        await asyncio.wait_for(listing, 1)
        assert not vm.stale and vm.serving.target_pages == 2048

        await _refresh(vm)  # nothing outstanding again
        await worker.nothing()
        reading.cancel()
    run(go())


def test_every_command_is_numbered_and_a_report_of_its_own_ends_the_staleness():
    async def go():
        vm, worker, reading = await running_vm(sent_before_start=2)
        vm.set_stats_interval(7)
        vm.set_discard_inhibit("migration")
        assert await worker.next() == SetStatsInterval(7.0, 3)
        assert await worker.next() == SetDiscardInhibit("migration", 4)
        assert vm.stale
        worker.report(4)  # the worker's own report, on the change the commands made
        await asyncio.sleep(0.05)
        assert not vm.stale
        await _refresh(vm)
        await worker.nothing()
        reading.cancel()
    run(go())


def test_a_read_of_one_vm_always_asks_its_worker():
    async def go():
        vm, worker, reading = await running_vm()
        one = asyncio.create_task(_refresh_one(vm))
        ask = await worker.next()
        assert isinstance(ask, GetStatus)
        worker.report(0, ask.id, connected=True)
        await asyncio.wait_for(one, 1)
        assert vm.serving.connected
        reading.cancel()
    run(go())


def test_a_worker_that_does_not_answer_leaves_its_last_report_after_the_timeout():
    async def go():
        vm, worker, reading = await running_vm()
        vm.set_target_bytes(4 * MIB)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await _refresh(vm)
        assert REFRESH_TIMEOUT - 0.05 <= loop.time() - start < REFRESH_TIMEOUT + 0.5
        assert vm.stale and vm.status().target_bytes == 4 * MIB  # the supervisor's own value
        reading.cancel()
    run(go())


def test_a_worker_claiming_a_command_never_sent_is_killed():
    async def go():
        vm, worker, reading = await running_vm()
        worker.report(5)
        reason = await asyncio.wait_for(reading, 1)
        assert reason is not None and "malformed message" in reason
    run(go())


class FakeQmp:
    path, connected, status, ram_bytes = "/run/vm0.qmp", True, "running", 0


class FakeGuard:
    def __init__(self) -> None:
        self.reason: str | None = None

    def summary(self) -> dict:
        return {"discard_inhibited": self.reason}


def test_the_kept_status_body_follows_everything_the_status_is_made_of():
    """status_body() keeps its bytes between reads; after a change of any
    input of status() it must say what status() says."""
    async def go():
        vm, worker, reading = await running_vm()
        vm.qmp, vm.discard_guard = FakeQmp(), FakeGuard()

        def agrees() -> bytes:
            body = vm.status_body()
            assert json.loads(body) == vm.status().to_json()
            return body

        first = agrees()
        assert vm.status_body() is first, "nothing changed: the same bytes, not encoded again"
        changes = [
            lambda: worker.report(0, connected=True, connections=1),
            lambda: vm.set_target_bytes(8 * MIB),
            lambda: vm.set_stats_interval(3),
            lambda: setattr(vm.qmp, "status", "paused"),
            lambda: setattr(vm.qmp, "connected", False),
            lambda: setattr(vm.discard_guard, "reason", "migration"),
            lambda: setattr(vm, "state", "restarting"),
            lambda: setattr(vm, "restarts", 1),
            lambda: setattr(vm, "last_exit", "killed by SIGBUS"),
            lambda: setattr(vm, "pid", 4242),
        ]
        seen = {first}
        for change in changes:
            change()
            await asyncio.sleep(0.05)
            body = agrees()
            assert body not in seen, f"a change was not seen in the body: {body!r}"
            seen.add(body)
        reading.cancel()
    run(go())


def test_a_report_repeated_is_a_heartbeat_not_decoded_again(monkeypatch):
    from balloond.worker import supervisor

    decoded = []
    real = supervisor.decode
    monkeypatch.setattr(supervisor, "decode", lambda body, allowed: decoded.append(body) or real(body, allowed))

    async def go():
        vm, worker, reading = await running_vm(timeout=0.3)
        assert len(decoded) == 1  # running_vm's first report
        decoded.clear()
        for _ in range(8):  # 0.8 s of the same report: alive all along
            worker.report(0)
            await asyncio.sleep(0.1)
        assert not reading.done()
        assert decoded == [], "a report equal to the last one must not be decoded"
        worker.report(0, connected=True)
        await asyncio.sleep(0.05)
        assert vm.serving.connected and len(decoded) == 1
        # Silence now: the deadline, moved at every message, ends the worker.
        reason = await asyncio.wait_for(reading, 2)
        assert reason == "no heartbeat for 0.3 s"
    run(go())


def test_a_migrated_in_vm_brings_its_target_to_the_supervisor():
    """A worker whose VM migrated in took the source's target and stats
    interval (ServingStatus.adoptions grew): the supervisor's values become
    those, so the API shows them and a restarted worker gets them in its
    spec; a command sent after the migration is newer and stays."""
    async def go():
        vm, worker, reading = await running_vm()
        vm.set_target_bytes(8 * MIB)
        assert await worker.next() == SetTarget(2048, 1)
        worker.report(1, target_pages=2048)
        await asyncio.sleep(0.05)
        worker.report(1, target_pages=98304, adoptions=1, stats_interval=5.0)  # 384 MiB, from the source
        await asyncio.sleep(0.05)
        assert vm.target_pages == 98304 and vm.stats_interval == 5.0
        assert vm.status().target_bytes == 384 * MIB and vm.status().stats_interval == 5.0
        # The operator sets a target; a second migration's report made before
        # the worker applied it does not undo the command.
        vm.set_target_bytes(16 * MIB)
        assert await worker.next() == SetTarget(4096, 2)
        worker.report(1, target_pages=1024, adoptions=2, stats_interval=1.0)
        await asyncio.sleep(0.05)
        assert vm.target_pages == 4096 and vm.stats_interval == 5.0
        # Reports without a new adoption change nothing either.
        worker.report(2, target_pages=4096, adoptions=2, stats_interval=5.0)
        await asyncio.sleep(0.05)
        assert vm.target_pages == 4096
        reading.cancel()
    run(go())
