"""The policy loop driving a real VirtualMachine through a real socket.

The daemon's pieces run in this process (an asyncio loop in a thread: the
VM's listener, its device and the policy loop), QEMU and the guest driver are
`TestFrontend` on the test's thread, and the host is a `SimulatedHost`: a
pretend host whose free memory is its size minus the guest RAM the memfd
holds (measured by the daemon as resident_bytes). So the test sees the whole
loop: the policy asks for a balloon, the "guest" inflates, the daemon punches
holes, resident memory falls, the pretend host gets its reserve back; then
the host has plenty and the balloon is given back step by step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from balloond.device.balloon import DeviceSettings
from balloond.engine.listener import VhostUserListener, open_listening_socket
from balloond.services.host_memory import SimulatedHost
from balloond.services.policy import MiB, PolicyConfig
from balloond.services.policy_loop import PolicyLoop
from balloond.vm import VirtualMachine
from harness.loop_thread import LoopThread
from protocol.balloon import StatTag
from tests.frontend import PAGE_SIZE, TestFrontend

RAM = 256 * MiB
USED = 64 * MiB  # the "guest's" working set


class InProcessDaemon(LoopThread):
    """One VM served by an asyncio loop on a thread."""

    def __init__(self, path: str, settings: DeviceSettings) -> None:
        super().__init__("in-process-daemon")
        self.vm = VirtualMachine("vm0", path, settings)
        self.vm.listener = VhostUserListener(open_listening_socket(path), path=path)
        self.serving = self.call(self._serve())

    async def _serve(self) -> asyncio.Task[None]:
        assert self.vm.listener is not None
        return asyncio.create_task(self.vm.listener.serve(self.vm.serve_connection))

    def close(self) -> None:  # type: ignore[override]
        async def stop() -> None:
            self.serving.cancel()
            await asyncio.gather(self.serving, return_exceptions=True)
            assert self.vm.listener is not None
            self.vm.listener.close()

        self.call(stop())
        super().close()


#: The device's discard delay per mode: as with the daemon fixture, the
#: default (deferred) and 0 (each buffer's discards before it is returned).
DELAYS = {"immediate": 0.0, "deferred": DeviceSettings().discard_max_delay}


@pytest.fixture(params=list(DELAYS))
def served(tmp_path, request) -> Iterator[InProcessDaemon]:
    d = InProcessDaemon(str(tmp_path / "vm0.sock"),
                        DeviceSettings(stats_interval=0.05, discard_max_delay=DELAYS[request.param]))
    yield d
    d.close()


class Guest:
    """The guest side: a driver that follows the target, and stats as Linux
    with DEFLATE_ON_OOM reports them (ballooned pages count as used)."""

    def __init__(self, fe: TestFrontend) -> None:
        self.fe = fe
        self.first = fe.first_free_pfn
        self.pages = 0  # in the balloon: PFNs first .. first + pages

    def stats(self) -> dict[int, int]:
        total = RAM
        available = total - USED - self.pages * PAGE_SIZE
        return {StatTag.TOTAL_MEMORY: total, StatTag.AVAILABLE_MEMORY: available,
                StatTag.FREE_MEMORY: available, StatTag.MAJOR_FAULTS: 0}

    def follow(self) -> None:
        want = self.fe.num_pages()
        if want > self.pages:
            self.fe.inflate(range(self.first + self.pages, self.first + want))
        elif want < self.pages:
            self.fe.deflate(range(self.first + want, self.first + self.pages))
        self.pages = want
        self.fe.set_actual(want)
        assert self.fe.serve_stats(self.stats(), timeout=3), "the device stopped asking for stats"


def test_policy_reclaims_from_a_real_vm_and_gives_back(served):
    fe = TestFrontend(served.vm.socket_path, ram_size=RAM, connect=False)
    try:
        fe.connect()
        fe.probe()
        guest = Guest(fe)
        # the whole guest RAM above the driver area is resident on the host
        fe.ram.populate(guest.first, RAM // PAGE_SIZE - guest.first)
        fe.prime_stats(guest.stats())
        fe.start()
        resident = fe.ram.allocated_bytes()
        assert resident > RAM - 4 * MiB

        host = SimulatedHost(total_bytes=resident + 32 * MiB)  # 32 MiB free: below the reserve
        config = PolicyConfig(enabled=True, interval=3600, reserve_bytes=64 * MiB, hysteresis_bytes=32 * MiB,
                              step_bytes=16 * MiB, idle_step_bytes=8 * MiB, dead_band_bytes=2 * MiB,
                              headroom_bytes=16 * MiB, headroom_fraction=0.0)
        loop = PolicyLoop({"vm0": served.vm}, config, host=host)
        guest.follow()  # fresh stats

        modes = []
        for _ in range(12):
            d = served.run(loop.tick)
            modes.append(d.mode)
            if d.vm("vm0").changed:
                assert 0 < d.vm("vm0").delta_bytes <= 16 * MiB
            guest.follow()
            if d.mode == "hold":
                break
        assert modes[0] == "reclaim" and modes[-1] == "hold", modes
        deadline = time.monotonic() + 3  # deferred discards: done within the delay
        while (summary := served.run(served.vm.summary))["pending_discard_bytes"] and time.monotonic() < deadline:
            time.sleep(0.02)
        # 32 MiB below the reserve + half the band: about 48 MiB ballooned and freed
        assert 48 * MiB <= summary["target_bytes"] <= 64 * MiB
        assert summary["actual_bytes"] == summary["target_bytes"] == guest.pages * PAGE_SIZE
        assert summary["host_freed_bytes"] == summary["target_bytes"]
        d = served.run(loop.tick)
        assert d.mode == "hold" and d.host["available_bytes"] >= 64 * MiB
        assert d.host["source"] == "simulated"

        # the host has plenty again: the balloon goes back, 8 MiB an interval
        host.total_bytes += 1024 * MiB
        steps = 0
        while served.run(served.vm.summary)["target_bytes"] > 0:
            d = served.run(loop.tick)
            assert d.mode == "give" and d.vm("vm0").action == "deflate"
            assert -d.vm("vm0").delta_bytes <= 8 * MiB
            guest.follow()
            steps += 1
            assert steps < 20
        assert steps >= 6
        assert loop.counts["vm0"]["inflate"] >= 3 and loop.counts["vm0"]["deflate"] == steps
        assert served.run(served.vm.summary)["actual_bytes"] == 0
    finally:
        fe.close()
