"""The balloon policy: from host and guest memory figures to balloon targets.

A plain object with no I/O, no clock and no asyncio: `Policy.decide` takes
one interval's samples (`HostSample`, one `VmSample` per VM), the per-VM
settings (`VmPolicySettings`) and the time, and returns a `Decision`: the
target for every VM and, for each, the inputs and the reason behind it. The
loop that samples the host and the VMs and applies the targets is
`policy_loop.PolicyLoop`; the formulas are in docs/policy.md.

In one sentence: keep the host's MemAvailable above a reserve by growing the
balloons of the guests with the most unused memory, never below a guest's
floor; when the host has plenty again, shrink balloons, first for guests
that show memory pressure, then slowly for everyone. Every change is bounded
(a step per interval) and small changes are ignored (a dead band).

This module imports only the standard library (and `sizes`), so balloonctl
can use `render_policy` without the daemon's dependencies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from .sizes import format_size, parse_size
from ..status import VmStatus

PAGE_SIZE = 4096
MiB = 1 << 20
GiB = 1 << 30

#: Cumulative guest counters the policy turns into per-interval changes.
COUNTERS = ("major_faults", "alloc_stalls", "direct_reclaims", "oom_kills")


class PolicyError(ValueError):
    """A policy setting that cannot be used; the message says which and why."""


def _align(value: float) -> int:
    """Down to a whole page (balloon targets are in pages)."""
    return int(max(0, value)) // PAGE_SIZE * PAGE_SIZE


def _mib(value: float) -> str:
    return format_size(value)


# ====================================================================== inputs


@dataclass(frozen=True)
class HostSample:
    """The host's memory at one moment.

    `available_bytes` is /proc/meminfo's MemAvailable (or a simulated
    figure); the PSI figures are /proc/pressure/memory's avg10 percentages,
    None where the kernel has no PSI.
    """

    available_bytes: int
    total_bytes: int = 0
    psi_some_avg10: float | None = None
    psi_full_avg10: float | None = None
    source: str = "proc"


@dataclass(frozen=True)
class VmSample:
    """What the policy knows of one VM at one moment.

    `stats` are the guest's virtio-balloon statistics by lowercased tag name
    (free_memory, available_memory, total_memory, major_faults, oom_kills,
    alloc_stalls, direct_reclaims, ...); the last four are cumulative and the
    6.12-era tags may be absent. `stats_age` is how old they are in seconds
    (None: the guest never sent any).
    """

    name: str
    guest_ram_bytes: int
    target_bytes: int
    actual_bytes: int = 0
    stats: Mapping[str, int] = field(default_factory=dict)
    stats_age: float | None = None
    connected: bool = True
    #: QEMU's run state from QMP ("running", "paused", "inmigrate", ...); None: not known.
    run_state: str | None = None

    @classmethod
    def from_status(cls, status: VmStatus, now: float) -> VmSample:
        """From a VM's status (stats_updated_at is wall-clock time)."""
        updated, stats = status.stats_updated_at, status.stats
        return cls(
            name=status.name,
            guest_ram_bytes=status.guest_ram_bytes or 0,
            target_bytes=status.target_bytes or 0,
            actual_bytes=status.actual_bytes or 0,
            stats={k: int(v) for k, v in stats.items()},
            stats_age=None if not updated or not stats else max(0.0, now - float(updated)),
            connected=status.connected,
            run_state=status.run_state,
        )


@dataclass
class VmPolicySettings:
    """The operator's word on one VM.

    min_bytes       the guest keeps at least this much memory (RAM - balloon)
    max_bytes       the balloon never grows past this (None: no cap but the floor)
    shares          weight: a VM with more shares is reclaimed from later and
                    given back to sooner (like cgroup weights; default 1)
    enabled         False: the policy never touches this VM's target
    headroom_bytes  free memory the guest keeps above what it uses
                    (None: the policy's default)
    """

    enabled: bool = True
    min_bytes: int = 0
    max_bytes: int | None = None
    shares: float = 1.0
    headroom_bytes: int | None = None

    def validate(self) -> None:
        if self.min_bytes < 0:
            raise PolicyError("min_memory must not be negative")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise PolicyError("max_balloon must not be negative")
        if not (isinstance(self.shares, (int, float)) and math.isfinite(self.shares) and self.shares > 0):
            raise PolicyError(f"shares must be a positive number, not {self.shares!r}")
        if self.headroom_bytes is not None and self.headroom_bytes < 0:
            raise PolicyError("headroom must not be negative")

    #: Keys of a [[vm]] table (and ,key=value options of --vm) and their fields.
    FILE_KEYS: ClassVar[dict[str, str]] = {
        "policy": "enabled",
        "min_memory": "min_bytes",
        "max_balloon": "max_bytes",
        "shares": "shares",
        "headroom": "headroom_bytes",
    }

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "") -> VmPolicySettings:
        """From a [[vm]] table's policy keys (other keys are ignored).

        Sizes are bytes or strings like "1G"; `policy` is a boolean (or
        "on"/"off" from a --vm option)."""
        values: dict[str, Any] = {}
        prefix = f"{where}: " if where else ""
        for key, attr in cls.FILE_KEYS.items():
            if key not in data:
                continue
            value = data[key]
            try:
                if attr == "enabled":
                    values[attr] = _boolean(value)
                elif attr == "shares":
                    values[attr] = _number(value)
                else:
                    values[attr] = _size(value)
            except PolicyError as exc:
                raise PolicyError(f"{prefix}{key}: {exc}") from None
        settings = cls(**values)
        try:
            settings.validate()
        except PolicyError as exc:
            raise PolicyError(f"{prefix}{exc}") from None
        return settings

    def updated(self, changes: Mapping[str, Any]) -> VmPolicySettings:
        """A copy with API-style changes ({"enabled", "min_bytes", "max_bytes",
        "shares", "headroom_bytes"}: JSON numbers and booleans), validated."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise PolicyError(f"unknown policy settings {sorted(unknown)}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in changes.items():
            if key == "enabled":
                if not isinstance(value, bool):
                    raise PolicyError("enabled must be true or false")
            elif key == "shares":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise PolicyError("shares must be a number")
                value = float(value)
            elif (value is not None or key not in ("max_bytes", "headroom_bytes")) and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise PolicyError(f"{key} must be a whole number of bytes")
            values[key] = value
        new = replace(self, **values)
        new.validate()
        return new


@dataclass
class PolicyConfig:
    """Policy-wide settings; every size in bytes. See docs/policy.md."""

    #: The loop: whether it runs and how often (seconds).
    enabled: bool = False
    interval: float = 10.0
    #: Host MemAvailable to keep; below it balloons grow.
    reserve_bytes: int = 1 * GiB
    #: Balloons shrink only when MemAvailable is above reserve + hysteresis.
    hysteresis_bytes: int = 512 * MiB
    #: Largest change of one VM's target per interval; if step_fraction > 0,
    #: the step is that fraction of the guest's RAM instead (oVirt MoM: 0.05).
    step_bytes: int = 100 * MiB
    step_fraction: float = 0.0
    #: How fast guests without pressure get memory back when the host has plenty.
    idle_step_bytes: int = 25 * MiB
    #: Changes smaller than this are not made (except reaching 0 or a hard limit).
    dead_band_bytes: int = 10 * MiB
    #: Free memory a guest keeps above what it uses: max(bytes, fraction × RAM).
    headroom_bytes: int = 256 * MiB
    headroom_fraction: float = 0.10
    #: Stats older than this are not trusted: the VM is only deflated.
    stats_max_age: float = 30.0
    #: Major faults per second at which a guest counts as under pressure.
    fault_rate_threshold: float = 10.0
    #: Host PSI memory "full" avg10 (%) at which the host counts as short
    #: even with MemAvailable above the reserve (None: ignore PSI).
    psi_full_high: float | None = 10.0
    #: Host PSI memory "some" avg10 (%) above which nothing is given back
    #: except to guests below their floor (None: ignore).
    psi_some_high: float | None = 20.0

    def validate(self) -> None:
        if not (isinstance(self.interval, (int, float)) and 0.05 <= self.interval <= 3600):
            raise PolicyError("policy interval must be between 0.05 and 3600 seconds")
        for name in ("reserve_bytes", "hysteresis_bytes", "dead_band_bytes", "headroom_bytes"):
            if getattr(self, name) < 0:
                raise PolicyError(f"{name} must not be negative")
        if self.step_bytes <= 0 or self.idle_step_bytes <= 0:
            raise PolicyError("step and idle_step must be positive")
        if not 0 <= self.step_fraction <= 1:
            raise PolicyError("step_percent must be between 0 and 100")
        if not 0 <= self.headroom_fraction <= 1:
            raise PolicyError("headroom_percent must be between 0 and 100")
        if self.dead_band_bytes > min(self.idle_step_bytes, self.step_bytes):
            raise PolicyError("dead_band must not be larger than step and idle_step (nothing would ever move)")
        if self.stats_max_age <= 0:
            raise PolicyError("stats_max_age must be positive")
        if self.fault_rate_threshold <= 0:
            raise PolicyError("fault_rate must be positive")
        for name in ("psi_full_high", "psi_some_high"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 100:
                raise PolicyError(f"{name} must be a percentage in (0, 100]")

    #: Keys of the [policy] table: name → (field, kind).
    FILE_KEYS: ClassVar[dict[str, tuple[str, str]]] = {
        "enabled": ("enabled", "bool"),
        "interval": ("interval", "number"),
        "host_reserve": ("reserve_bytes", "size"),
        "hysteresis": ("hysteresis_bytes", "size"),
        "step": ("step_bytes", "size"),
        "step_percent": ("step_fraction", "percent"),
        "idle_step": ("idle_step_bytes", "size"),
        "dead_band": ("dead_band_bytes", "size"),
        "headroom": ("headroom_bytes", "size"),
        "headroom_percent": ("headroom_fraction", "percent"),
        "stats_max_age": ("stats_max_age", "number"),
        "fault_rate": ("fault_rate_threshold", "number"),
        "psi_full_high": ("psi_full_high", "number-or-off"),
        "psi_some_high": ("psi_some_high", "number-or-off"),
    }

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base: PolicyConfig | None = None,
                     where: str = "[policy]") -> PolicyConfig:
        """From a TOML [policy] table; unknown keys are errors."""
        unknown = set(data) - set(cls.FILE_KEYS)
        if unknown:
            raise PolicyError(f"{where}: unknown keys {sorted(unknown)}; known: {sorted(cls.FILE_KEYS)}")
        values: dict[str, Any] = {}
        for key, value in data.items():
            attr, kind = cls.FILE_KEYS[key]
            try:
                values[attr] = _convert(value, kind)
            except PolicyError as exc:
                raise PolicyError(f"{where} {key}: {exc}") from None
        config = replace(base or cls(), **values)
        try:
            config.validate()
        except PolicyError as exc:
            raise PolicyError(f"{where}: {exc}") from None
        return config

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "yes", "true", "1", "off", "no", "false", "0"):
        return value.lower() in ("on", "yes", "true", "1")
    raise PolicyError(f"expected true/false (or on/off), not {value!r}")


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise PolicyError(f"expected a number, not {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise PolicyError(f"expected a number, not {value!r}")


def _size(value: Any) -> int:
    if isinstance(value, bool):
        raise PolicyError(f"expected a size, not {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise PolicyError("a size must not be negative")
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise PolicyError(str(exc)) from None
    raise PolicyError(f"expected bytes or a size like \"512M\", not {value!r}")


def _convert(value: Any, kind: str) -> Any:
    if kind == "bool":
        return _boolean(value)
    if kind == "size":
        return _size(value)
    if kind == "number":
        return _number(value)
    if kind == "percent":
        return _number(value) / 100.0
    if kind == "number-or-off":
        if value is False or (isinstance(value, str) and value.lower() in ("off", "none")):
            return None
        return _number(value)
    raise AssertionError(kind)  # pragma: no cover


# ====================================================================== output


@dataclass
class VmDecision:
    """One VM's outcome of one interval.

    action: "inflate" (balloon grows: memory back to the host), "deflate"
    (balloon shrinks: memory to the guest), "hold" (considered, unchanged)
    or "skip" (not considered: disabled, not connected, paused or migrating
    per QMP, no RAM known).
    """

    name: str
    action: str
    old_target_bytes: int
    new_target_bytes: int
    reason: str
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.new_target_bytes != self.old_target_bytes

    @property
    def delta_bytes(self) -> int:
        return self.new_target_bytes - self.old_target_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "action": self.action,
            "old_target_bytes": self.old_target_bytes,
            "new_target_bytes": self.new_target_bytes,
            "delta_bytes": self.delta_bytes,
            "reason": self.reason,
            "inputs": dict(self.inputs),
        }


@dataclass
class Decision:
    """One interval's outcome: the host's state, the mode, every VM's decision."""

    at: float
    mode: str  # "reclaim" | "hold" | "give"
    host: dict[str, Any]
    vms: list[VmDecision]

    def targets(self) -> dict[str, int]:
        """New targets of the VMs whose target changes."""
        return {d.name: d.new_target_bytes for d in self.vms if d.changed}

    def vm(self, name: str) -> VmDecision:
        for d in self.vms:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "mode": self.mode, "host": dict(self.host), "vms": [d.to_dict() for d in self.vms]}


# ====================================================================== policy


@dataclass
class _History:
    """The last guest counters seen, to turn them into changes per interval."""

    at: float | None = None  # when the guest took the sample (now - stats_age)
    counters: dict[str, int] = field(default_factory=dict)
    deltas: dict[str, int] = field(default_factory=dict)
    fault_rate: float = 0.0


@dataclass
class _View:
    """One VM as the policy sees it this interval (working state)."""

    sample: VmSample
    settings: VmPolicySettings
    step: int
    hard_max: int  # largest balloon allowed by min_bytes / max_bytes / RAM
    fresh: bool = False
    max_balloon: int = 0  # largest balloon leaving used + headroom (and the hard limits)
    rescue_max: int = 0  # above this balloon the guest has less than headroom/2 free: deflate now
    spare: int = 0  # how much more the balloon may grow: max_balloon - target
    pressure: float = 0.0
    new_target: int = 0
    reason: str = ""
    action: str = "hold"
    done: bool = False  # already decided this interval
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.sample.name

    @property
    def target(self) -> int:
        return self.sample.target_bytes


class Policy:
    """The default policy. Keeps a little history per VM (to turn cumulative
    counters into rates); otherwise every decision depends only on its inputs."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.config.validate()
        self._history: dict[str, _History] = {}
        self._reclaiming = False

    def forget(self, name: str) -> None:
        self._history.pop(name, None)

    # ------------------------------------------------------------------ helpers

    def headroom(self, sample: VmSample, settings: VmPolicySettings) -> int:
        if settings.headroom_bytes is not None:
            return settings.headroom_bytes
        c = self.config
        return int(max(c.headroom_bytes, c.headroom_fraction * sample.guest_ram_bytes))

    def step(self, sample: VmSample) -> int:
        c = self.config
        if c.step_fraction > 0:
            return max(PAGE_SIZE, _align(c.step_fraction * sample.guest_ram_bytes))
        return _align(c.step_bytes)

    def _update_history(self, sample: VmSample, now: float) -> _History:
        h = self._history.setdefault(sample.name, _History())
        if sample.stats_age is None or not sample.stats:
            return h
        taken = now - sample.stats_age
        if h.at is not None and abs(taken - h.at) < 1e-6:
            return h  # the same guest sample as last time: keep the last changes
        counters = {k: int(sample.stats[k]) for k in COUNTERS if k in sample.stats}
        if h.at is None or taken <= h.at:
            h.deltas, h.fault_rate = {}, 0.0
        else:
            elapsed = taken - h.at
            deltas = {}
            for k, v in counters.items():
                before = h.counters.get(k)
                # a counter that went down means the guest rebooted: no change
                deltas[k] = v - before if before is not None and v >= before else 0
            h.deltas = deltas
            h.fault_rate = deltas.get("major_faults", 0) / elapsed if elapsed > 0 else 0.0
        h.at, h.counters = taken, counters
        return h

    def _view(self, sample: VmSample, settings: VmPolicySettings, now: float) -> _View:
        c = self.config
        ram = sample.guest_ram_bytes
        cap = ram if settings.max_bytes is None else min(ram, settings.max_bytes)
        hard_max = _align(max(0, min(cap, ram - settings.min_bytes)))
        v = _View(sample, settings, step=self.step(sample), hard_max=hard_max, new_target=sample.target_bytes)
        v.inputs = {
            "guest_ram_bytes": ram,
            "target_bytes": sample.target_bytes,
            "actual_bytes": sample.actual_bytes,
            "shares": settings.shares,
            "min_bytes": settings.min_bytes,
            "max_bytes": settings.max_bytes,
            "hard_max_balloon_bytes": hard_max,
            "step_bytes": v.step,
            "stats_age": None if sample.stats_age is None else round(sample.stats_age, 1),
        }
        history = self._update_history(sample, now)
        stats = sample.stats
        total = stats.get("total_memory")
        available = stats.get("available_memory")
        if available is None and "free_memory" in stats:
            available = stats["free_memory"] + stats.get("disk_caches", 0)
        v.fresh = (
            sample.stats_age is not None
            and sample.stats_age <= c.stats_max_age
            and total is not None
            and available is not None
            and total > 0
        )
        if not v.fresh:
            return v
        assert total is not None and available is not None
        # Linux takes ballooned pages out of MemTotal unless DEFLATE_ON_OOM is
        # on; then they count as used. What exceeds RAM - MemTotal is balloon.
        balloon_in_total = max(0, sample.actual_bytes - max(0, ram - total))
        used = max(0, total - available - balloon_in_total)
        headroom = self.headroom(sample, settings)
        floor = max(settings.min_bytes, used + headroom)
        v.max_balloon = min(hard_max, _align(ram - floor))
        v.rescue_max = min(hard_max, _align(ram - max(settings.min_bytes, used + headroom // 2)))
        v.spare = max(0, v.max_balloon - sample.target_bytes)
        low = max(0.0, (headroom / 2 - available) / (headroom / 2)) if headroom > 0 else 0.0
        faults = min(4.0, history.fault_rate / c.fault_rate_threshold) if history.fault_rate >= c.fault_rate_threshold else 0.0
        parts = {
            "low_available": round(low, 3),
            "major_faults": round(faults, 3),
            "alloc_stalls": 1.0 if history.deltas.get("alloc_stalls", 0) > 0 else 0.0,
            "direct_reclaims": 1.0 if history.deltas.get("direct_reclaims", 0) > 0 else 0.0,
            "oom_kills": 2.0 if history.deltas.get("oom_kills", 0) > 0 else 0.0,
        }
        v.pressure = round(sum(parts.values()), 3)
        v.inputs.update(
            total_memory=total,
            available_memory=available,
            used_bytes=used,
            headroom_bytes=headroom,
            floor_bytes=floor,
            max_balloon_bytes=v.max_balloon,
            spare_bytes=v.spare,
            major_fault_rate=round(history.fault_rate, 2),
            counter_deltas=dict(history.deltas),
            pressure=v.pressure,
            pressure_parts={k: p for k, p in parts.items() if p},
        )
        return v

    # ------------------------------------------------------------------ decide

    def decide(
        self,
        host: HostSample,
        vms: Sequence[VmSample],
        settings: Mapping[str, VmPolicySettings] | None = None,
        now: float = 0.0,
    ) -> Decision:
        c = self.config
        settings = settings or {}
        views: list[_View] = []
        decisions: dict[str, VmDecision] = {}
        for sample in vms:
            s = settings.get(sample.name) or VmPolicySettings()
            if not s.enabled:
                decisions[sample.name] = _skip(sample, "policy disabled for this VM")
                self.forget(sample.name)
                continue
            if not sample.connected:
                decisions[sample.name] = _skip(sample, "not connected")
                self.forget(sample.name)
                continue
            if sample.run_state is not None and sample.run_state != "running":
                decisions[sample.name] = _skip(sample, f"VM {sample.run_state} (QMP)")
                continue
            if sample.guest_ram_bytes <= 0:
                decisions[sample.name] = _skip(sample, "guest RAM not known yet")
                continue
            views.append(self._view(sample, s, now))

        A, R, H = host.available_bytes, c.reserve_bytes, c.hysteresis_bytes
        psi_short = _at_least(host.psi_full_avg10, c.psi_full_high)
        psi_busy = _at_least(host.psi_some_avg10, c.psi_some_high)
        # Reclaim starts below R and, once started, goes on up to R + H/2 (a
        # Schmitt trigger: noise around R does not start and stop it).
        if A < R or psi_short or (self._reclaiming and A < R + H // 2):
            mode = "reclaim"
        elif A >= R + H and not psi_busy:
            mode = "give"
        else:
            mode = "hold"
        # Inflation asked for but not done yet will free host memory soon;
        # count at most one step per VM, so a stuck guest does not block the rest.
        pending = sum(min(v.step, max(0, v.target - v.sample.actual_bytes)) for v in views)
        host_info: dict[str, Any] = {
            "available_bytes": A,
            "total_bytes": host.total_bytes,
            "reserve_bytes": R,
            "hysteresis_bytes": H,
            "psi_some_avg10": host.psi_some_avg10,
            "psi_full_avg10": host.psi_full_avg10,
            "source": host.source,
            "pending_inflate_bytes": pending,
        }

        # 1. Hard limits and floors, whatever the host's state.
        for v in views:
            if v.target > v.hard_max:
                _set(v, v.hard_max, "deflate", f"above its limit (min_memory {_mib(v.settings.min_bytes)}, "
                     f"max_balloon {_mib(v.settings.max_bytes) if v.settings.max_bytes is not None else '-'})")
                v.inputs["hard_limit"] = True
            elif v.fresh and v.target > v.rescue_max:
                new = max(v.max_balloon, v.target - v.step)
                _set(v, new, "deflate", f"below its floor: uses {_mib(v.inputs['used_bytes'])}, "
                     f"needs {_mib(v.inputs['floor_bytes'])} ({_mib(v.inputs['available_memory'])} available)")
            elif not v.fresh:
                why = "no stats from the guest" if v.sample.stats_age is None else (
                    f"stats {v.sample.stats_age:.0f}s old" if v.sample.stats_age > c.stats_max_age
                    else "stats lack total/available memory")
                v.reason = f"{why}: never inflated"
        rescued = sum(v.target - v.new_target for v in views if v.done)

        if mode == "reclaim":
            need = max(R + H // 2 - A, H // 2 if psi_short else 0) - pending
            host_info["need_bytes"] = max(0, need)
            if A < R:
                cause = f"host {_mib(R - A)} below its reserve"
            elif psi_short:
                cause = f"host memory pressure (PSI full {host.psi_full_avg10:.1f}%)"
            else:
                cause = f"host {_mib(R + H // 2 - A)} short of reserve + half the band"
            # Guests without pressure first, those with the most unused memory
            # (per share) first; guests under pressure only if that is not enough.
            candidates = [v for v in views if v.fresh and not v.done and v.spare > 0]
            for v in list(candidates):
                if v.target - v.sample.actual_bytes >= v.step:  # the last step is not done yet
                    v.reason = f"{cause}; balloon still {_mib(v.target - v.sample.actual_bytes)} behind its target"
                    v.done = True
                    candidates.remove(v)
            candidates.sort(key=lambda v: (v.pressure > 0, -v.spare / v.settings.shares, v.name))
            for v in candidates:
                if need < c.dead_band_bytes:
                    break
                take = _align(min(v.step, v.spare, need))
                if take < c.dead_band_bytes:
                    continue
                _set(v, v.target + take, "inflate",
                     f"{cause}: reclaimed {_mib(take)} of {_mib(v.spare)} unused")
                need -= take
            host_info["unmet_bytes"] = max(0, need) if need >= c.dead_band_bytes else 0
            for v in views:
                if not v.done and v.fresh:
                    v.reason = (f"{cause}; at its floor" if v.spare < c.dead_band_bytes
                                else f"{cause}; reserve met by others" if need < c.dead_band_bytes
                                else f"{cause}; reclaimed from later")
        else:
            budget = A - R - rescued
            host_info["budget_bytes"] = max(0, budget)
            if psi_busy:
                cause = f"host memory pressure (PSI some {host.psi_some_avg10:.1f}%)"
                for v in views:
                    if not v.done and v.fresh:
                        v.reason = f"{cause}: nothing given back"
            else:
                # Guests under pressure first, most pressure (× shares) first.
                pressured = [v for v in views if v.fresh and not v.done and v.pressure > 0]
                pressured.sort(key=lambda v: (-v.pressure * v.settings.shares, v.name))
                for v in pressured:
                    if v.target == 0:
                        v.reason = "under pressure; balloon already empty"
                        continue
                    give = _align(min(v.step, v.target, budget))
                    if give <= 0 or (give < c.dead_band_bytes and give < v.target):
                        v.reason = "under pressure; host cannot spare more now"
                        continue
                    parts = ", ".join(f"{k.replace('_', ' ')}" for k in v.inputs.get("pressure_parts", {}))
                    _set(v, v.target - give, "deflate", f"under pressure ({parts}): given back {_mib(give)}")
                    budget -= give
                # Then guests below their floor (less than their headroom
                # available), which reclaim may leave there while the host is short.
                short = [v for v in views if v.fresh and not v.done and v.target > v.max_balloon]
                short.sort(key=lambda v: (-v.settings.shares, v.name))
                for v in short:
                    give = _align(min(v.step, v.target - v.max_balloon, budget))
                    if give < c.dead_band_bytes:
                        continue
                    _set(v, v.target - give, "deflate",
                         f"below its floor ({_mib(v.inputs['available_memory'])} available, headroom "
                         f"{_mib(v.inputs['headroom_bytes'])}): given back {_mib(give)}")
                    budget -= give
                if mode == "give":
                    idle_budget = min(budget, A - (R + H))
                    host_info["idle_budget_bytes"] = max(0, idle_budget)
                    idle = [v for v in views if not v.done and v.target > 0 and (v.pressure == 0 or not v.fresh)]
                    idle.sort(key=lambda v: (-v.settings.shares, -v.target, v.name))
                    for v in idle:
                        give = _align(min(c.idle_step_bytes, v.target, idle_budget))
                        if give <= 0 or (give < c.dead_band_bytes and give < v.target):
                            continue
                        _set(v, v.target - give, "deflate",
                             f"host has plenty ({_mib(A - R)} above reserve): slowly given back {_mib(give)}")
                        idle_budget -= give
                    for v in views:
                        if not v.done and v.fresh:
                            v.reason = v.reason or ("balloon empty" if v.target == 0 else "host budget spent")
                for v in views:
                    if not v.done and v.fresh and not v.reason:
                        v.reason = (f"host within its band ({_mib(A - R)} above reserve, "
                                    f"gives back above {_mib(H)})")

        # 2. The dead band (hard limits and a final step to 0 are always made).
        for v in views:
            delta = abs(v.new_target - v.target)
            if 0 < delta < c.dead_band_bytes and v.new_target != 0 and not v.inputs.get("hard_limit"):
                v.reason = f"change of {_mib(delta)} is inside the dead band ({_mib(c.dead_band_bytes)}); " + v.reason
                v.new_target, v.action = v.target, "hold"

        for v in views:
            decisions[v.name] = VmDecision(v.name, v.action if v.new_target != v.target else "hold",
                                           v.target, v.new_target, v.reason or "nothing to do", v.inputs)
        host_info["mode"] = mode
        self._reclaiming = mode == "reclaim"
        ordered = [decisions[s.name] for s in vms]
        return Decision(at=now, mode=mode, host=host_info, vms=ordered)


def _at_least(value: float | None, threshold: float | None) -> bool:
    return value is not None and threshold is not None and value >= threshold


def _skip(sample: VmSample, reason: str) -> VmDecision:
    return VmDecision(sample.name, "skip", sample.target_bytes, sample.target_bytes, reason,
                      {"guest_ram_bytes": sample.guest_ram_bytes, "target_bytes": sample.target_bytes})


def _set(v: _View, new: int, action: str, reason: str) -> None:
    v.new_target = _align(max(0, min(new, v.hard_max if action == "inflate" else new)))
    v.action, v.reason, v.done = action, reason, True


# ====================================================================== rendering


def render_policy(snapshot: Mapping[str, Any]) -> str:
    """`balloonctl policy`: the loop's snapshot (GET /v1/policy) as text."""
    lines = []
    state = "on" if snapshot.get("enabled") else "off"
    lines.append(f"policy: {state}, every {snapshot.get('interval', '?')}s")
    last = snapshot.get("last")
    if not last:
        lines.append("no decision yet")
        return "\n".join(lines)
    host = last["host"]
    psi = ""
    if host.get("psi_some_avg10") is not None:
        psi = f", PSI some {host['psi_some_avg10']:.1f}% full {host.get('psi_full_avg10') or 0:.1f}%"
    lines.append(
        f"host: {format_size(host['available_bytes'])} available ({host.get('source', 'proc')}), "
        f"reserve {format_size(host['reserve_bytes'])} + {format_size(host['hysteresis_bytes'])}{psi} "
        f"-> {last['mode']}"
    )
    if host.get("unmet_bytes"):
        lines.append(f"  could not reclaim {format_size(host['unmet_bytes'])}: every guest is at its floor")
    header = ("VM", "ACTION", "TARGET", "NEW", "USED", "FLOOR", "SPARE", "PRESSURE", "REASON")
    rows: list[tuple[str, ...]] = [header]
    for d in last["vms"]:
        i = d.get("inputs", {})
        rows.append((
            d["name"], d["action"], format_size(d["old_target_bytes"]), format_size(d["new_target_bytes"]),
            format_size(i.get("used_bytes")), format_size(i.get("floor_bytes")), format_size(i.get("spare_bytes")),
            f"{i['pressure']:.2f}" if "pressure" in i else "-", d["reason"],
        ))
    widths = [max(len(r[k]) for r in rows) for k in range(len(header) - 1)]
    for r in rows:
        lines.append("  ".join(cell.ljust(w) if k < 2 else cell.rjust(w) for k, (cell, w) in
                               enumerate(zip(r[:-1], widths))) + "  " + r[-1])
    counts = snapshot.get("counts") or {}
    if counts:
        lines.append("decisions: " + "; ".join(
            f"{name} " + " ".join(f"{a}={n}" for a, n in sorted(c.items())) for name, c in sorted(counts.items())))
    return "\n".join(lines)
