"""The policy loop with fake VMs, and host memory sampling from test files."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from balloond.services.host_memory import (
    HostMemoryError,
    HostMemorySampler,
    SimulatedHost,
    read_meminfo,
    read_psi,
)
from balloond.services.policy import (
    GiB,
    HostSample,
    MiB,
    PolicyConfig,
    PolicyError,
    VmPolicySettings,
)
from balloond.status import VmStatus
from balloond.services.policy_loop import PolicyCollector, PolicyLoop


class FakeVm:
    """What the loop uses of VirtualMachine: status() and set_target_bytes()."""

    def __init__(self, name, *, ram=4 * GiB, used=1 * GiB, connected=True, stats=True):
        self.name = name
        self.ram = ram
        self.used = used
        self.connected = connected
        self.stats = stats
        self.target = 0
        self.calls: list[int] = []
        self.refuse = False

    def status(self):
        total = self.ram - 64 * MiB
        return VmStatus(
            name=self.name,
            connected=self.connected,
            guest_ram_bytes=self.ram,
            target_bytes=self.target,
            actual_bytes=self.target,
            resident_bytes=self.ram - self.target,
            stats={"total_memory": total, "available_memory": total - self.used - self.target,
                   "major_faults": 0} if self.stats else {},
            stats_updated_at=time.time() - 1 if self.stats else None,
        )

    def set_target_bytes(self, value):
        if self.refuse:
            raise ValueError("no")
        self.calls.append(value)
        self.target = value
        return value // 4096


def make_loop(vms, available=512 * MiB, **kw):
    host = kw.pop("host", lambda: HostSample(available, 32 * GiB))
    return PolicyLoop({vm.name: vm for vm in vms}, PolicyConfig(enabled=True, interval=0.05), host=host, **kw)


def test_tick_applies_targets_only_to_connected_vms_and_counts():
    a, b, off = FakeVm("a"), FakeVm("b", used=3 * GiB), FakeVm("off", connected=False)
    loop = make_loop([a, b, off])
    d = loop.tick()
    assert d.mode == "reclaim"
    assert a.calls == [100 * MiB] and b.calls == [100 * MiB]
    assert off.calls == [] and d.vm("off").action == "skip"
    loop.tick()
    assert loop.counts["a"]["inflate"] == 2 and loop.counts["off"]["skip"] == 2
    assert loop.applied == 4 and loop.ticks == 2
    snap = loop.snapshot()
    json.dumps(snap)
    assert snap["last"]["mode"] == "reclaim" and snap["counts"]["a"] == {"inflate": 2}
    assert snap["vm_settings"]["a"]["enabled"] is True
    assert "reclaim" in loop.status_line()


def test_a_refused_target_is_recorded_not_raised():
    a = FakeVm("a")
    a.refuse = True
    loop = make_loop([a])
    d = loop.tick()
    assert d.vm("a").action == "error" and "could not apply" in d.vm("a").reason
    assert loop.counts["a"]["error"] == 1 and loop.applied == 0


def test_vm_settings_at_run_time():
    a = FakeVm("a")
    loop = make_loop([a], vm_settings={"a": VmPolicySettings(max_bytes=50 * MiB)})
    loop.tick()
    assert a.target == 50 * MiB
    loop.update_vm_settings("a", {"enabled": False})
    loop.tick()
    assert a.calls == [50 * MiB]
    with pytest.raises(PolicyError):
        loop.update_vm_settings("a", {"shares": -1})
    with pytest.raises(KeyError):
        loop.update_vm_settings("nope", {"enabled": True})


def test_simulated_host_sees_balloons_return_memory():
    vms = [FakeVm("a"), FakeVm("b")]
    host = SimulatedHost(total_bytes=9 * GiB)  # 8 GiB of guests resident: 1 GiB free, no more
    loop = make_loop(vms, host=host)
    d = loop.tick()
    assert d.host["source"] == "simulated"
    assert d.host["available_bytes"] == 1 * GiB and d.mode == "hold"
    host.other_used_bytes = 400 * MiB  # pretend something on the host took 400 MiB
    for _ in range(10):
        d = loop.tick()
    assert d.mode == "hold"
    assert sum(vm.target for vm in vms) >= 400 * MiB
    assert 1 * GiB <= d.host["available_bytes"] < 1 * GiB + 512 * MiB
    assert loop.snapshot()["host_source"] == "simulated"


def test_run_loops_until_stopped_and_survives_errors():
    calls = []

    def flaky_host():
        calls.append(1)
        if len(calls) == 2:
            raise OSError("meminfo went away")
        return HostSample(512 * MiB, 32 * GiB)

    a = FakeVm("a")

    async def scenario():
        loop = make_loop([a], host=flaky_host)
        loop.start()
        await asyncio.sleep(0.4)
        await loop.stop()
        return loop

    loop = asyncio.run(scenario())
    assert len(calls) >= 4
    assert loop.errors == 1 and loop.ticks == len(calls) - 1
    assert len(a.calls) >= 3


def test_disabled_loop_does_nothing_until_enabled():
    a = FakeVm("a")

    async def scenario():
        loop = make_loop([a])
        loop.config.enabled = False
        loop.config.interval = 3600
        loop.start()
        await asyncio.sleep(0.1)
        assert loop.ticks == 0 and a.calls == []
        loop.set_enabled(True)  # wakes the loop at once
        await asyncio.sleep(0.1)
        assert loop.ticks == 1 and a.calls == [100 * MiB]
        await loop.stop()
        assert loop.status_line().startswith("policy reclaim")

    asyncio.run(scenario())


def test_on_decision_and_history():
    seen = []
    loop = make_loop([FakeVm("a")], on_decision=seen.append, history=3)
    for _ in range(5):
        loop.tick()
    assert len(seen) == 5 and len(loop.history) == 3 and loop.history[-1] is seen[-1]


def test_metrics():
    loop = make_loop([FakeVm("a"), FakeVm("b", stats=False)])
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PolicyCollector(loop))
    text = generate_latest(registry).decode()
    assert "balloond_policy_enabled 1.0" in text
    assert "balloond_policy_host_available_bytes" not in text  # no decision yet
    loop.tick()
    text = generate_latest(registry).decode()
    assert 'balloond_policy_decisions_total{action="inflate",vm="a"} 1.0' in text
    assert 'balloond_policy_decisions_total{action="hold",vm="b"} 1.0' in text
    assert "balloond_policy_host_available_bytes 5.36870912e+08" in text
    assert 'balloond_policy_mode{mode="reclaim"} 1.0' in text
    assert 'balloond_policy_vm_pressure{vm="a"} 0.0' in text
    assert "balloond_policy_targets_applied_total 1.0" in text


# ------------------------------------------------------------------ /proc readers

MEMINFO = """MemTotal:       24576000 kB
MemFree:         1000000 kB
MemAvailable:   20000000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""


def test_meminfo_and_psi(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    psi = tmp_path / "memory"
    psi.write_text("some avg10=1.50 avg60=0.80 avg300=0.10 total=12345\n"
                   "full avg10=0.25 avg60=0.00 avg300=0.00 total=678\n")
    info = read_meminfo(str(meminfo))
    assert info["MemAvailable"] == 20000000 * 1024 and info["HugePages_Total"] == 0
    assert read_psi(str(psi)) == (1.5, 0.25)
    s = HostMemorySampler(str(meminfo), str(psi)).sample()
    assert (s.available_bytes, s.total_bytes, s.psi_some_avg10, s.psi_full_avg10) == (
        20000000 * 1024, 24576000 * 1024, 1.5, 0.25)


def test_no_psi_is_none(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    s = HostMemorySampler(str(meminfo), str(tmp_path / "absent"))()
    assert s.psi_some_avg10 is None and s.psi_full_avg10 is None
    assert read_psi(str(tmp_path)) == (None, None)  # a read error (EISDIR) too


def test_meminfo_errors(tmp_path):
    with pytest.raises(HostMemoryError):
        read_meminfo(str(tmp_path / "absent"))
    old = tmp_path / "meminfo"
    old.write_text("MemTotal: 100 kB\nMemFree: 10 kB\n")  # a kernel before 3.14
    with pytest.raises(HostMemoryError, match="MemAvailable"):
        HostMemorySampler(str(old)).sample()


def test_the_real_host():
    s = HostMemorySampler().sample()
    assert 0 < s.available_bytes <= s.total_bytes
