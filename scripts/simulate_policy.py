#!/usr/bin/env python3
"""Run balloond's balloon policy against a simple model of a host and its
guests, and plot what happens (docs/policy-simulation.png).

    .venv/bin/pip install -e '.[sim]'        # matplotlib, only for the plot
    .venv/bin/python scripts/simulate_policy.py [--out docs/policy-simulation.png]
    .venv/bin/python scripts/simulate_policy.py --no-plot    # a text summary only

The model, one step per policy interval (10 s):

* a guest has RAM, a working set (`used`, anonymous memory that the scenario
  sets over time), a page cache that grows while memory is free, and a
  balloon that reaches its target within the interval (Linux inflates
  about 1 GiB/s) but cannot take pages the working set needs: past that the
  working set is swapped out, and the guest faults in proportion;
* the guest reports stats as Linux with DEFLATE_ON_OOM does: MemTotal is
  RAM less the kernel, MemAvailable is what is neither used nor ballooned
  (the cache counts as available), cumulative major faults, allocation
  stalls and direct reclaim;
* the host holds each guest's touched memory (pages the guest has used
  since they were last ballooned), and MemAvailable is its size less its
  own use less all of that.

The scenario: 4 guests of 4 GiB on a 12 GiB host running 1 GiB itself, so
16 GiB of guest RAM on 11 GiB. Their caches grow until the host is short;
from 400 s to 900 s something on the host takes 2.5 GiB more; from 1200 s
to 1700 s the "db" guest's working set grows from 2 GiB to 3.4 GiB.
`simulate()` returns the series and is also used by tests/unit/test_policy_simulation.py.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from balloond.services.policy import (
    GiB,
    HostSample,
    MiB,
    Policy,
    PolicyConfig,
    VmPolicySettings,
    VmSample,
)

KERNEL = 96 * MiB
CACHE_GROWTH = 2 * MiB  # per second, while the guest has free memory
PAGE = 4096


@dataclass
class ModelGuest:
    name: str
    ram: int
    used_at: list[tuple[float, int]]  # (from time, working set); the last one before t applies
    cache_max: int
    shares: float = 1.0
    cache: int = 0
    balloon: int = 0
    touched: int = 0
    faults: int = 0
    stalls: int = 0
    reclaims: int = 0
    fault_rate: float = 0.0
    swapped: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)

    def used(self, t: float) -> int:
        value = self.used_at[0][1]
        for start, v in self.used_at:
            if t >= start:
                value = v
        return value

    def step(self, t: float, dt: float, target: int) -> None:
        used = self.used(t)
        usable = self.ram - KERNEL
        self.balloon = target
        room = usable - self.balloon  # what the guest may hold
        self.swapped = max(0, used - room)
        resident_used = used - self.swapped
        # the cache gives way first; grows into free memory otherwise
        self.cache = max(0, min(self.cache, room - resident_used))
        free = room - resident_used - self.cache
        self.cache += min(free, int(CACHE_GROWTH * dt), max(0, self.cache_max - self.cache))
        free = room - resident_used - self.cache
        # pages in the balloon are given back to the host; the rest stays touched
        self.touched = min(max(self.touched, KERNEL + resident_used + self.cache), self.ram - self.balloon)
        # faults: swapped pages come back in; a squeezed cache refaults too
        thrash = self.swapped / MiB * 20
        if free + self.cache < 0.05 * self.ram:
            thrash += 50
        self.fault_rate = thrash
        self.faults += int(thrash * dt)
        if self.swapped or free + self.cache < 0.02 * self.ram:  # kswapd keeps up otherwise
            self.stalls += 1
            self.reclaims += max(1, self.swapped // PAGE)

    def sample(self, t: float) -> VmSample:
        used = self.used(t)
        total = self.ram - KERNEL
        available = max(0, total - self.balloon - (used - self.swapped))
        stats = {
            "total_memory": total,
            "available_memory": available,
            "free_memory": max(0, available - self.cache),
            "disk_caches": self.cache,
            "major_faults": self.faults,
            "alloc_stalls": self.stalls,
            "direct_reclaims": self.reclaims,
            "oom_kills": 0,
        }
        return VmSample(self.name, self.ram, self.balloon, self.balloon, stats, 1.0, True)


def scenario() -> tuple[list[ModelGuest], dict[str, VmPolicySettings]]:
    guests = [
        ModelGuest("web", 4 * GiB, [(0, 1536 * MiB)], cache_max=2 * GiB, shares=2),
        ModelGuest("db", 4 * GiB, [(0, 2 * GiB), (1200, 2600 * MiB), (1230, 3 * GiB), (1260, 3400 * MiB),
                                   (1700, 2 * GiB)], cache_max=1536 * MiB),
        ModelGuest("batch", 4 * GiB, [(0, 1 * GiB)], cache_max=2560 * MiB, shares=0.5),
        ModelGuest("idle", 4 * GiB, [(0, 512 * MiB)], cache_max=1 * GiB),
    ]
    for g in guests:
        g.touched = KERNEL + g.used(0)
    settings = {g.name: VmPolicySettings(shares=g.shares) for g in guests}
    settings["web"].min_bytes = 2 * GiB
    return guests, settings


def host_other(t: float) -> int:
    return 1 * GiB + (2560 * MiB if 400 <= t < 900 else 0)


def simulate(duration: float = 2400.0, interval: float = 10.0, config: PolicyConfig | None = None,
             host_total: int = 12 * GiB) -> dict[str, object]:
    """Run the scenario; returns times, host series and per-guest series."""
    guests, settings = scenario()
    policy = Policy(config or PolicyConfig(enabled=True, interval=interval))
    times: list[float] = []
    host_avail: list[int] = []
    modes: list[str] = []
    series: dict[str, dict[str, list[float]]] = {
        g.name: {"target": [], "available": [], "fault_rate": [], "swapped": [], "floor": []} for g in guests
    }
    decisions = []
    t = 0.0
    while t <= duration:
        for g in guests:
            g.step(t, interval, g.balloon)
        avail = host_total - host_other(t) - sum(g.touched for g in guests)
        samples = [g.sample(t) for g in guests]
        d = policy.decide(HostSample(avail, host_total), samples, settings, now=t)
        decisions.append(d)
        for g, v in zip(guests, d.vms):
            g.balloon = v.new_target_bytes
        times.append(t)
        host_avail.append(avail)
        modes.append(d.mode)
        for g, s, v in zip(guests, samples, d.vms):
            series[g.name]["target"].append(v.new_target_bytes)
            series[g.name]["available"].append(s.stats["available_memory"])
            series[g.name]["fault_rate"].append(g.fault_rate)
            series[g.name]["swapped"].append(g.swapped)
            series[g.name]["floor"].append(v.inputs.get("floor_bytes", 0))
        t += interval
    return {"times": times, "host_available": host_avail, "modes": modes, "guests": series,
            "decisions": decisions, "config": policy.config, "host_total": host_total}


def summary(result: dict[str, object]) -> str:
    times = result["times"]
    avail = result["host_available"]
    cfg: PolicyConfig = result["config"]  # type: ignore[assignment]
    below = sum(1 for a in avail if a < cfg.reserve_bytes)  # type: ignore[union-attr]
    lines = [(f"{len(times)} intervals; host below its reserve in {below}; "  # type: ignore[arg-type]
              f"lowest MemAvailable {min(avail) / GiB:.2f} GiB")]  # type: ignore[type-var, operator]
    for name, s in result["guests"].items():  # type: ignore[union-attr]
        moves = sum(1 for a, b in zip(s["target"], s["target"][1:]) if a != b)
        lines.append(f"  {name:6} max balloon {max(s['target']) / GiB:.2f} GiB, {moves} changes, "
                     f"max fault rate {max(s['fault_rate']):.0f}/s, max swapped {max(s['swapped']) / MiB:.0f} MiB")
    return "\n".join(lines)


def plot(result: dict[str, object], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = result["times"]
    cfg: PolicyConfig = result["config"]  # type: ignore[assignment]
    colors = {"web": "tab:blue", "db": "tab:red", "batch": "tab:green", "idle": "tab:purple"}
    fig, axes = plt.subplots(3, 1, figsize=(11, 10), sharex=True, gridspec_kw={"height_ratios": [1.1, 1.3, 1]})
    ax = axes[0]
    avail_gib = [a / GiB for a in result["host_available"]]  # type: ignore[union-attr]
    r = cfg.reserve_bytes / GiB
    ax.axhspan(r, r + cfg.hysteresis_bytes / GiB, color="gold", alpha=0.25, label="hysteresis band (hold)")
    ax.axhline(r, color="darkorange", lw=1.5, ls="--", label=f"reserve {r:.0f} GiB")
    ax.plot(times, avail_gib, color="black", lw=1.8, label="host MemAvailable")
    ax.set_ylabel("GiB")
    ax.set_title("Host: MemAvailable against the reserve")
    ax.set_ylim(bottom=min(0, min(avail_gib)))

    ax = axes[1]
    for name, s in result["guests"].items():  # type: ignore[union-attr]
        ax.plot(times, [v / GiB for v in s["target"]], color=colors.get(name), lw=1.8,
                label=f"{name} balloon target")
    ax.set_ylabel("GiB")
    ax.set_title("Balloon targets set by the policy (memory taken back from each guest)")

    ax = axes[2]
    for name, s in result["guests"].items():  # type: ignore[union-attr]
        ax.plot(times, [v / GiB for v in s["available"]], color=colors.get(name), lw=1.5,
                label=f"{name} MemAvailable")
    ax.set_ylabel("GiB")
    ax.set_title("Guests: MemAvailable (db's dips are its working set growing)")
    ax2 = ax.twinx()
    ax2.plot(times, result["guests"]["db"]["fault_rate"], color="tab:red", lw=1, ls=":",  # type: ignore[index]
             label="db major faults/s")
    ax2.set_ylabel("faults/s")
    ax.set_xlabel("seconds (one policy decision every 10 s)")

    for a in axes:
        a.axvspan(400, 900, color="grey", alpha=0.12)
        a.axvspan(1200, 1700, color="tab:red", alpha=0.07)
        a.grid(alpha=0.3)
    axes[0].text(650, axes[0].get_ylim()[1] * 0.92, "host job +2.5 GiB", ha="center", va="top", fontsize=9)
    axes[0].text(1450, axes[0].get_ylim()[1] * 0.92, "db working set 2 → 3.4 GiB", ha="center", va="top",
                 fontsize=9)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[1].legend(loc="upper left", fontsize=8, ncol=2)
    lines, labels = axes[2].get_legend_handles_labels()
    l2, lb2 = ax2.get_legend_handles_labels()
    axes[2].legend(lines + l2, labels + lb2, loc="upper left", fontsize=8, ncol=3)
    fig.suptitle("balloond policy simulation: 4 guests × 4 GiB on a 12 GiB host (defaults: reserve 1 GiB, "
                 "band 512 MiB, step 100 MiB)", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "docs" / "policy-simulation.png")
    p.add_argument("--duration", type=float, default=2400.0)
    p.add_argument("--no-plot", action="store_true", help="print the summary only (no matplotlib needed)")
    args = p.parse_args(argv)
    result = simulate(args.duration)
    print(summary(result))
    if not args.no_plot:
        try:
            plot(result, args.out)
        except ImportError:
            print("matplotlib is missing: pip install -e '.[sim]' (or use --no-plot)", file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
