"""The policy loop: every `interval` seconds, sample the host and every VM,
ask the policy, apply its targets, and keep the decision for the API.

    loop = PolicyLoop(daemon.vms, policy_config, vm_settings={...})
    loop.start()                  # an asyncio task
    loop.snapshot()               # GET /v1/policy
    await loop.stop()

VMs are anything with `name`, `status()` and `set_target_bytes(n)` (the
daemon's `VirtualMachine`, or a fake in tests); targets are applied only to
connected VMs. The host comes from `HostMemorySampler` (/proc) unless another
source is given: `SimulatedHost` (a pretend host size, for tests on big
machines) or any callable returning a `HostSample`.

A failing interval (say /proc/meminfo unreadable) is logged and counted and
the loop goes on; the loop never raises into the daemon.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import structlog

from ..status import VmStatus
from .host_memory import HostMemorySampler, SimulatedHost
from .policy import (
    Decision,
    HostSample,
    Policy,
    PolicyConfig,
    PolicyError,
    VmPolicySettings,
    VmSample,
)

ACTIONS = ("inflate", "deflate", "hold", "skip", "error")


class PolicyVm(Protocol):
    def status(self) -> VmStatus: ...

    def set_target_bytes(self, value: Any) -> int: ...


HostSource = Callable[..., HostSample]


class PolicyLoop:
    def __init__(
        self,
        vms: Mapping[str, PolicyVm],
        config: PolicyConfig | None = None,
        *,
        vm_settings: Mapping[str, VmPolicySettings] | None = None,
        host: HostSource | None = None,
        clock: Callable[[], float] = time.time,
        log: Any = None,
        on_decision: Callable[[Decision], None] | None = None,
        history: int = 0,
    ) -> None:
        self.vms = vms
        self.policy = Policy(config or PolicyConfig())
        self.vm_settings: dict[str, VmPolicySettings] = dict(vm_settings or {})
        self.host: HostSource = host or HostMemorySampler()
        self._host_takes_summaries = _takes_argument(self.host)
        self.clock = clock
        self.log = log or structlog.get_logger()
        self.on_decision = on_decision
        self.last: Decision | None = None
        self.counts: dict[str, Counter[str]] = {}
        self.applied = 0
        self.errors = 0
        self.last_error: str | None = None
        self.ticks = 0
        self.history: list[Decision] = []  # the last `history` decisions (0: none kept)
        self.history_size = history
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # ----------------------------------------------------------------- settings

    @property
    def config(self) -> PolicyConfig:
        return self.policy.config

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def set_enabled(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise PolicyError("enabled must be true or false")
        self.config.enabled = enabled
        self.log.info("policy " + ("enabled" if enabled else "disabled"))
        self._wake.set()

    def settings_for(self, name: str) -> VmPolicySettings:
        return self.vm_settings.get(name) or VmPolicySettings()

    def update_vm_settings(self, name: str, changes: Mapping[str, Any]) -> VmPolicySettings:
        """PUT /v1/vms/{name}/policy: change some of a VM's settings (validated)."""
        if name not in self.vms:
            raise KeyError(name)
        new = self.settings_for(name).updated(changes)
        self.vm_settings[name] = new
        self.log.info("policy settings changed", vm=name, **{k: getattr(new, k) for k in changes})
        return new

    # ----------------------------------------------------------------- one interval

    def sample_host(self, statuses: list[VmStatus]) -> HostSample:
        if self._host_takes_summaries:  # host sources read the VMs' API objects (a simulated host: resident bytes)
            return self.host([s.to_json() for s in statuses])
        return self.host()

    def tick(self) -> Decision:
        """Sample, decide and apply once (synchronously; all of it is cheap)."""
        now = self.clock()
        statuses = [vm.status() for vm in self.vms.values()]
        host = self.sample_host(statuses)
        samples = [VmSample.from_status(s, now) for s in statuses]
        decision = self.policy.decide(host, samples, {n: self.settings_for(n) for n in self.vms}, now)
        for d in decision.vms:
            vm = self.vms.get(d.name)
            if d.changed and vm is not None:
                try:
                    vm.set_target_bytes(d.new_target_bytes)
                except ValueError as exc:  # TargetError: e.g. RAM changed under us
                    d.reason = f"could not apply: {exc}; " + d.reason
                    d.action = "error"
                    d.new_target_bytes = d.old_target_bytes
                else:
                    self.applied += 1
                    self.log.info("policy target", vm=d.name, action=d.action,
                                  target_bytes=d.new_target_bytes, old_bytes=d.old_target_bytes,
                                  reason=d.reason, mode=decision.mode)
            self.counts.setdefault(d.name, Counter())[d.action] += 1
        self.last = decision
        self.ticks += 1
        if self.history_size:
            self.history.append(decision)
            del self.history[: -self.history_size]
        if self.on_decision is not None:
            self.on_decision(decision)
        return decision

    # ----------------------------------------------------------------- the task

    async def run(self) -> None:
        while True:
            if self.enabled:
                try:
                    self.tick()
                    self.last_error = None
                except Exception as exc:  # never let the loop die
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self.log.exception("policy interval failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.config.interval)
            except TimeoutError:
                pass

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self.run(), name="balloond-policy")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ----------------------------------------------------------------- reading

    def snapshot(self) -> dict[str, Any]:
        """GET /v1/policy."""
        host_source = getattr(self.host, "source", type(self.host).__name__)
        return {
            "enabled": self.enabled,
            "interval": self.config.interval,
            "host_source": host_source,
            "config": self.config.as_dict(),
            "vm_settings": {n: vars(self.settings_for(n)).copy() for n in self.vms},
            "last": self.last.to_dict() if self.last else None,
            "counts": {n: dict(c) for n, c in self.counts.items()},
            "applied": self.applied,
            "ticks": self.ticks,
            "errors": self.errors,
            "last_error": self.last_error,
        }

    def status_line(self) -> str:
        """A short line for systemd's STATUS=."""
        if not self.enabled:
            return "policy off"
        d = self.last
        if d is None:
            return "policy on, no decision yet"
        moved = sum(1 for v in d.vms if v.changed)
        return f"policy {d.mode}: host {d.host['available_bytes'] >> 20} MiB available, {moved} VM(s) moved"


def _takes_argument(fn: Callable[..., Any]) -> bool:
    """Whether a host source wants the VM summaries (SimulatedHost does)."""
    if isinstance(fn, (HostMemorySampler, SimulatedHost)):
        return True
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in params)


class PolicyCollector:
    """Prometheus metrics of the policy loop; register next to the VM collector."""

    def __init__(self, loop: PolicyLoop) -> None:
        self.loop = loop

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        loop = self.loop
        yield GaugeMetricFamily("balloond_policy_enabled", "1 while the policy loop runs", value=1.0 if loop.enabled else 0.0)
        decisions = CounterMetricFamily("balloond_policy_decisions", "Policy decisions per VM, by action",
                                        labels=["vm", "action"])
        for name in sorted(set(loop.vms) | set(loop.counts)):
            counts = loop.counts.get(name, Counter())
            for action in ACTIONS:
                decisions.add_metric([name, action], float(counts.get(action, 0)))
        yield decisions
        yield CounterMetricFamily("balloond_policy_errors", "Policy intervals that failed", value=float(loop.errors))
        yield CounterMetricFamily("balloond_policy_targets_applied", "Targets the policy set", value=float(loop.applied))
        d = loop.last
        if d is None:
            return
        host = d.host
        yield GaugeMetricFamily("balloond_policy_host_available_bytes", "Host MemAvailable the policy last saw",
                                value=float(host["available_bytes"]))
        yield GaugeMetricFamily("balloond_policy_host_reserve_bytes", "Host memory the policy keeps available",
                                value=float(host["reserve_bytes"]))
        yield GaugeMetricFamily("balloond_policy_unmet_bytes", "Host memory the policy could not reclaim",
                                value=float(host.get("unmet_bytes", 0)))
        mode = GaugeMetricFamily("balloond_policy_mode", "1 for the policy's current mode", labels=["mode"])
        for m in ("reclaim", "hold", "give"):
            mode.add_metric([m], 1.0 if d.mode == m else 0.0)
        yield mode
        pressure = GaugeMetricFamily("balloond_policy_vm_pressure", "Guest memory pressure score (0: none)",
                                     labels=["vm"])
        floor = GaugeMetricFamily("balloond_policy_vm_floor_bytes", "Guest memory the policy leaves at least",
                                  labels=["vm"])
        for v in d.vms:
            if "pressure" in v.inputs:
                pressure.add_metric([v.name], float(v.inputs["pressure"]))
                floor.add_metric([v.name], float(v.inputs["floor_bytes"]))
        yield pressure
        yield floor
