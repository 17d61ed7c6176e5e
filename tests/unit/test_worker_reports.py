"""When a worker reports: a change in a burst waits out CHANGE_DELAY after
the last look, but a balloon coming to rest at its target is reported at
once (BalloonDevice.on_settled -> VirtualMachine.on_settled -> the worker's
report loop). Time to target is what an operator reads from the API: the
last step of a change must not lag by CHANGE_DELAY.

The report loop runs here against a real socketpair, with CHANGE_DELAY made
long enough (30 s) that "at once" and "after the delay" cannot be confused
on a loaded machine."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from balloond.device.balloon import BalloonDevice, DeviceSettings
from balloond.status import ServingStatus
from balloond.worker import process
from balloond.worker.channel import TO_SUPERVISOR, Status, read_message
from balloond.worker.process import Worker, WorkerSpec
from protocol.balloon import BalloonConfig

MIB = 1 << 20


def write_actual(device: BalloonDevice, pages: int) -> None:
    device.write_config(BalloonConfig.OFFSET_ACTUAL, struct.pack("<I", pages))


def test_device_says_settled_when_the_guest_reaches_the_target():
    device = BalloonDevice(DeviceSettings(), target_pages=256)
    calls: list[int] = []
    device.on_settled = lambda: calls.append(device.config.actual)
    write_actual(device, 128)
    assert calls == []  # on the way
    write_actual(device, 256)
    assert calls == [256]
    device.set_target(0)
    write_actual(device, 0)
    assert calls == [256, 0]


def test_device_is_not_settled_while_a_discard_is_pending():
    device = BalloonDevice(DeviceSettings(), target_pages=2)
    calls: list[str] = []
    device.on_settled = lambda: calls.append("settled")
    device._pending.add(5)  # an inflated frame whose discard waits (as _release leaves it)
    write_actual(device, 2)
    assert calls == []
    device.flush_discards()  # no memory mapped: the release fails, but nothing is pending any more
    assert calls == ["settled"]


class StubVm:
    """What the report loop reads: a status the test changes."""

    def __init__(self) -> None:
        self.actual = 0
        self.on_settled = None

    def serving_status(self) -> ServingStatus:
        return ServingStatus(guest_ram_bytes=64 * MIB, target_pages=self.actual)


def make_worker(channel: socket.socket) -> Worker:
    spec = WorkerSpec(name="vm0", socket="/nonexistent", settings=DeviceSettings(), poll_seconds=0.0,
                      state_dir=None, target_pages=None, discard_inhibit=None, log_format="text",
                      log_level="warning", timeout=600.0)
    return Worker(spec, socket.socket(socket.AF_UNIX), channel, log=None)


async def next_report(reader: asyncio.StreamReader, timeout: float) -> Status:
    message = await asyncio.wait_for(read_message(reader, TO_SUPERVISOR), timeout)
    assert isinstance(message, Status)
    return message


@pytest.fixture
def long_change_delay(monkeypatch):
    monkeypatch.setattr(process, "CHANGE_DELAY", 30.0)


def test_the_worker_wires_the_vm_to_its_report_loop(long_change_delay):
    ours, theirs = socket.socketpair()
    worker = make_worker(theirs)

    async def main() -> None:
        worker.changed, worker.settled = asyncio.Event(), asyncio.Event()
        vm = worker._make_vm(None)
        # A frontend connects: the device made for it reports to the VM.
        frontend, backend = socket.socketpair()
        serving = asyncio.create_task(vm.serve_connection(backend))
        await asyncio.sleep(0.1)
        assert vm.device is not None and vm.device.on_settled is not None
        vm.device.on_settled()
        assert worker.settled.is_set()
        frontend.close()
        await asyncio.wait_for(serving, 5)

    try:
        asyncio.run(main())
    finally:
        ours.close()
        theirs.close()


def test_a_settled_balloon_is_reported_without_waiting_out_the_change_delay(long_change_delay):
    ours, theirs = socket.socketpair()
    worker = make_worker(theirs)
    vm = StubVm()
    worker.vm = vm  # type: ignore[assignment]

    async def main() -> None:
        worker.changed, worker.settled = asyncio.Event(), asyncio.Event()
        # Both ends' writers are kept: a dropped one closes its socket.
        reader, our_writer = await asyncio.open_unix_connection(sock=ours)
        _, writer = await asyncio.open_unix_connection(sock=theirs)
        task = asyncio.create_task(worker._report(writer))
        try:
            first = await next_report(reader, 5)
            assert first.serving.target_pages == 0
            # That first look found a change (there was no report before), so
            # the loop now holds off for CHANGE_DELAY: a change in a burst waits.
            vm.actual = 200
            worker.changed.set()
            with pytest.raises(TimeoutError):
                await next_report(reader, 0.5)
            # The balloon comes to rest: reported now, not 30 s later.
            vm.actual = 256
            worker._settled()
            assert (await next_report(reader, 5)).serving.target_pages == 256
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            writer.close()
            our_writer.close()

    try:
        asyncio.run(main())
    finally:
        ours.close()
        theirs.close()
