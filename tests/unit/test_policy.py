"""The balloon policy on synthetic guests and hosts (no VM, no I/O).

`World` is a small closed loop: guests whose working set the test sets, a
host whose MemAvailable is its size minus what it runs itself minus the
guests' memory outside their balloons, and balloons that reach their
targets at once. Guests whose working set does not fit fault in proportion
to the shortfall.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloond.services.policy import (
    PAGE_SIZE,
    GiB,
    HostSample,
    MiB,
    Policy,
    PolicyConfig,
    PolicyError,
    VmPolicySettings,
    VmSample,
    render_policy,
)

KERNEL = 64 * MiB  # RAM the guest kernel keeps out of MemTotal


def guest_sample(name="g", *, ram=4 * GiB, target=0, actual=None, used=1 * GiB, counters=None, age=1.0,
                 deflate_on_oom=True, connected=True, stats=True, extra=None):
    """A VmSample as Linux's virtio_balloon would report it."""
    actual = target if actual is None else actual
    if deflate_on_oom:  # ballooned pages stay in MemTotal and count as used
        total = ram - KERNEL
        available = total - used - actual
    else:  # ballooned pages leave MemTotal
        total = ram - KERNEL - actual
        available = total - used
    values = {"total_memory": total, "available_memory": max(0, available),
              "free_memory": max(0, available - 128 * MiB), "major_faults": 0, "oom_kills": 0}
    values.update(counters or {})
    values.update(extra or {})
    return VmSample(name, ram, target, actual, values if stats else {}, age if stats else None, connected)


def host(available, **kw):
    return HostSample(available_bytes=available, total_bytes=32 * GiB, **kw)


@dataclass
class Guest:
    ram: int = 4 * GiB
    used: int = 1 * GiB
    target: int = 0
    faults: int = 0
    stalls: int = 0
    reclaims: int = 0
    ooms: int = 0


class World:
    """Guests and a host over time; `run(n)` lets the policy act n intervals."""

    def __init__(self, guests, *, host_total=16 * GiB, host_other=1 * GiB, config=None, settings=None,
                 interval=10.0):
        self.guests: dict[str, Guest] = guests
        self.host_total = host_total
        self.host_other = host_other
        self.policy = Policy(config or PolicyConfig())
        self.settings = settings or {}
        self.interval = interval
        self.now = 1000.0
        self.decisions = []
        self.host_noise = 0
        self.used_noise = {}

    def available(self):
        guest_mem = sum(g.ram - g.target for g in self.guests.values())
        return self.host_total - self.host_other - guest_mem + self.host_noise

    def samples(self):
        out = []
        for name, g in self.guests.items():
            used = g.used + self.used_noise.get(name, 0)
            fits = g.ram - KERNEL - g.target
            short = max(0, used - fits)
            g.faults += short // (4 * MiB)  # pages it cannot keep fault back in
            if short:
                g.stalls += 1
                g.reclaims += short // PAGE_SIZE
            out.append(guest_sample(name, ram=g.ram, target=g.target, used=min(used, fits),
                                    counters={"major_faults": g.faults, "alloc_stalls": g.stalls,
                                              "direct_reclaims": g.reclaims, "oom_kills": g.ooms}, age=0.5))
        return out

    def step(self):
        self.now += self.interval
        d = self.policy.decide(host(self.available()), self.samples(), self.settings, self.now)
        for v in d.vms:
            self.guests[v.name].target = v.new_target_bytes
        self.decisions.append(d)
        return d

    def run(self, n):
        for _ in range(n):
            self.step()
        return self.decisions[-1]

    def memory(self, name):
        g = self.guests[name]
        return g.ram - g.target


# ------------------------------------------------------------------ single decisions


def test_idle_guests_and_plenty_of_host_memory_change_nothing():
    p = Policy()
    d = p.decide(host(20 * GiB), [guest_sample("a"), guest_sample("b")], {}, 0)
    assert d.mode == "give"
    assert d.targets() == {}
    assert all(v.action == "hold" for v in d.vms)
    json.dumps(d.to_dict())  # the API serves it


def test_host_short_reclaims_first_from_the_guest_with_most_unused_memory():
    p = Policy()
    vms = [guest_sample("small", used=3 * GiB), guest_sample("big", used=512 * MiB), guest_sample("mid", used=2 * GiB)]
    # 150 MiB under the reserve: need = 150 MiB + half the band = 406 MiB
    d = p.decide(host(1 * GiB - 150 * MiB), vms, {}, 0)
    assert d.mode == "reclaim"
    assert d.host["need_bytes"] == 150 * MiB + 256 * MiB
    t = d.targets()
    assert t["big"] == 100 * MiB and t["mid"] == 100 * MiB  # a step each, most unused first
    assert t["small"] == 100 * MiB  # still short: the third gives too
    assert d.vm("big").action == "inflate" and "reclaimed" in d.vm("big").reason
    assert d.vm("big").inputs["spare_bytes"] > d.vm("mid").inputs["spare_bytes"] > d.vm("small").inputs["spare_bytes"]


def test_order_of_reclaim_when_one_step_is_enough():
    p = Policy(PolicyConfig(hysteresis_bytes=0))
    vms = [guest_sample("small", used=3 * GiB), guest_sample("big", used=512 * MiB)]
    d = p.decide(host(1 * GiB - 80 * MiB), vms, {}, 0)
    assert d.targets() == {"big": 80 * MiB}
    assert "reserve met by others" in d.vm("small").reason


def test_step_bound_per_vm_and_percentage_steps():
    p = Policy()
    d = p.decide(host(100 * MiB), [guest_sample("a", ram=8 * GiB)], {}, 0)
    assert d.targets() == {"a": 100 * MiB}
    p = Policy(PolicyConfig(step_fraction=0.05))  # MoM-style: 5 % of guest RAM
    d = p.decide(host(100 * MiB), [guest_sample("a", ram=8 * GiB)], {}, 0)
    assert d.targets() == {"a": (8 * GiB * 5 // 100) // PAGE_SIZE * PAGE_SIZE}


def test_targets_are_whole_pages():
    p = Policy(PolicyConfig(step_bytes=100 * MiB + 123))
    d = p.decide(host(1 * GiB - 33 * MiB - 7), [guest_sample("a", ram=8 * GiB)], {}, 0)
    assert d.targets()["a"] % PAGE_SIZE == 0


def test_floor_is_used_plus_headroom_and_min_memory():
    p = Policy()
    ram, used = 4 * GiB, 3 * GiB
    headroom = int(0.10 * ram)  # 10 % of RAM beats 256 MiB
    d = p.decide(host(0), [guest_sample("a", ram=ram, used=used)], {}, 0)
    inputs = d.vm("a").inputs
    assert inputs["headroom_bytes"] == headroom
    assert inputs["floor_bytes"] == used + headroom
    assert inputs["used_bytes"] == used
    # with min_memory above used + headroom, min_memory is the floor
    d = p.decide(host(0), [guest_sample("a", ram=ram, used=used)], {"a": VmPolicySettings(min_bytes=4 * GiB)}, 0)
    assert d.vm("a").inputs["floor_bytes"] == 4 * GiB
    assert d.vm("a").inputs["spare_bytes"] == 0
    assert d.targets() == {}
    assert "at its floor" in d.vm("a").reason


def test_used_memory_with_and_without_deflate_on_oom():
    """Ballooned pages count as used only while they stay in MemTotal."""
    p = Policy()
    for doo in (True, False):
        d = p.decide(host(8 * GiB), [guest_sample("a", target=1 * GiB, used=1 * GiB, deflate_on_oom=doo)], {}, 0)
        used = d.vm("a").inputs["used_bytes"]
        assert 1 * GiB <= used <= 1 * GiB + KERNEL, (doo, used)


def test_guest_below_its_floor_gets_memory_back_even_when_the_host_is_short():
    p = Policy()
    # 3 GiB balloon in a 4 GiB guest that now uses 900 MiB: 60 MiB available,
    # less than half its 409 MiB headroom: one step back at once.
    s = guest_sample("a", target=3 * GiB, used=900 * MiB, deflate_on_oom=False)
    d = p.decide(host(100 * MiB), [s], {}, 0)
    assert d.mode == "reclaim"
    assert d.targets() == {"a": 3 * GiB - 100 * MiB}
    assert "below its floor" in d.vm("a").reason


def test_hard_limits_apply_at_once_and_without_stats():
    p = Policy()
    s = guest_sample("a", ram=4 * GiB, target=3 * GiB, stats=False)
    d = p.decide(host(0), [s], {"a": VmPolicySettings(max_bytes=1 * GiB)}, 0)
    assert d.targets() == {"a": 1 * GiB}
    d = p.decide(host(0), [s], {"a": VmPolicySettings(min_bytes=2 * GiB)}, 0)
    assert d.targets() == {"a": 2 * GiB}
    assert "above its limit" in d.vm("a").reason


def test_max_balloon_caps_reclaim():
    p = Policy()
    d = p.decide(host(0), [guest_sample("a", target=200 * MiB, used=256 * MiB)], {"a": VmPolicySettings(max_bytes=250 * MiB)}, 0)
    assert d.targets() == {"a": 250 * MiB}


def test_disabled_vm_is_untouched():
    p = Policy()
    s = guest_sample("a", ram=4 * GiB, target=4 * GiB, used=3 * GiB)  # far beyond any limit
    d = p.decide(host(0), [s], {"a": VmPolicySettings(enabled=False, max_bytes=0)}, 0)
    assert d.targets() == {}
    assert d.vm("a").action == "skip" and "disabled" in d.vm("a").reason


def test_disconnected_vm_is_skipped():
    p = Policy()
    d = p.decide(host(0), [guest_sample("a", connected=False)], {}, 0)
    assert d.vm("a").action == "skip" and d.targets() == {}


@pytest.mark.parametrize("why", ["none", "stale", "incomplete"])
def test_vm_without_fresh_stats_is_never_inflated_but_may_be_deflated(why):
    p = Policy()
    if why == "none":
        s = guest_sample("a", target=1 * GiB, stats=False)
    elif why == "stale":
        s = guest_sample("a", target=1 * GiB, age=300)
    else:
        s = VmSample("a", 4 * GiB, 1 * GiB, 1 * GiB, {"major_faults": 3}, 1.0)
    d = p.decide(host(0), [s], {}, 0)
    assert d.mode == "reclaim" and d.targets() == {}
    assert "never inflated" in d.vm("a").reason
    d = p.decide(host(20 * GiB), [s], {}, 10)
    assert d.mode == "give"
    assert d.targets() == {"a": 1 * GiB - 25 * MiB}  # the slow give-back


def test_available_falls_back_to_free_plus_caches():
    p = Policy()
    s = VmSample("a", 4 * GiB, 0, 0, {"total_memory": 4 * GiB - KERNEL, "free_memory": 1 * GiB,
                                      "disk_caches": 1 * GiB}, 1.0)
    d = p.decide(host(8 * GiB), [s], {}, 0)
    assert d.vm("a").inputs["available_memory"] == 2 * GiB


def test_dead_band_ignores_small_needs():
    p = Policy(PolicyConfig(hysteresis_bytes=0))
    d = p.decide(host(1 * GiB - 5 * MiB), [guest_sample("a")], {}, 0)
    assert d.mode == "reclaim" and d.targets() == {}
    # a guest with 6 MiB of spare left is not asked for it
    s = guest_sample("a", used=1 * GiB)
    spare = p.decide(host(0), [s], {}, 0).vm("a").inputs["spare_bytes"]
    s = guest_sample("a", target=spare - 6 * MiB, used=1 * GiB)
    d = p.decide(host(0), [s], {}, 1)
    assert d.targets() == {}


def test_final_step_to_zero_is_allowed_inside_the_dead_band():
    p = Policy()
    d = p.decide(host(20 * GiB), [guest_sample("a", target=4 * MiB)], {}, 0)
    assert d.targets() == {"a": 0}


def test_inflation_in_flight_counts_and_a_lagging_balloon_is_not_pushed():
    p = Policy()
    # "a" was asked for 300 MiB and holds 0 yet: one step of it counts as coming
    vms = [guest_sample("a", target=300 * MiB, actual=0), guest_sample("b")]
    d = p.decide(host(1 * GiB - 50 * MiB), vms, {}, 0)
    assert d.host["pending_inflate_bytes"] == 100 * MiB
    assert d.host["need_bytes"] == 50 * MiB + 256 * MiB - 100 * MiB
    assert "a" not in d.targets() and "behind its target" in d.vm("a").reason
    assert d.targets() == {"b": 100 * MiB}


def test_psi_full_makes_the_host_short_and_psi_some_stops_giving_back():
    p = Policy()
    d = p.decide(host(4 * GiB, psi_some_avg10=30.0, psi_full_avg10=12.0), [guest_sample("a")], {}, 0)
    assert d.mode == "reclaim" and d.targets() == {"a": 100 * MiB}
    assert "PSI full" in d.vm("a").reason
    d = p.decide(host(20 * GiB, psi_some_avg10=25.0, psi_full_avg10=1.0), [guest_sample("a", target=1 * GiB)], {}, 1)
    assert d.mode == "hold" and d.targets() == {}
    assert "PSI some" in d.vm("a").reason
    # no PSI on this kernel: MemAvailable alone decides
    d = p.decide(host(20 * GiB), [guest_sample("a", target=1 * GiB)], {}, 2)
    assert d.mode == "give" and d.targets()


def test_pressure_from_counters_needs_two_samples_and_survives_reboots():
    p = Policy()
    base = {"major_faults": 1000, "alloc_stalls": 5, "direct_reclaims": 100, "oom_kills": 0}

    def s(t_age, **counters):
        return guest_sample("a", target=1 * GiB, counters={**base, **counters}, age=t_age)

    d = p.decide(host(1.2 * GiB), [s(1.0)], {}, 100.0)
    assert d.vm("a").inputs["pressure"] == 0  # first sample: no rate yet
    d = p.decide(host(1.2 * GiB), [s(1.0, major_faults=3000)], {}, 110.0)  # 200 faults/s
    assert d.vm("a").inputs["major_fault_rate"] == pytest.approx(200.0)
    assert d.vm("a").inputs["pressure_parts"]["major_faults"] == 4.0
    assert d.targets() == {"a": 1 * GiB - 100 * MiB}
    # the same guest sample again (stats not refreshed): the evidence stands
    d = p.decide(host(1.2 * GiB), [s(11.0, major_faults=3000)], {}, 120.0)
    assert d.vm("a").inputs["major_fault_rate"] == pytest.approx(200.0)
    # the guest rebooted: counters went down, no pressure
    d = p.decide(host(1.2 * GiB), [s(1.0, major_faults=10, alloc_stalls=0, direct_reclaims=0)], {}, 130.0)
    assert d.vm("a").inputs["pressure"] == 0
    d = p.decide(host(1.2 * GiB), [s(1.0, major_faults=10, alloc_stalls=0, direct_reclaims=0, oom_kills=1)], {}, 140.0)
    assert d.vm("a").inputs["pressure_parts"] == {"oom_kills": 2.0}


def test_6_12_counters_may_be_absent():
    p = Policy()
    s = VmSample("a", 4 * GiB, 0, 0, {"total_memory": 4 * GiB, "available_memory": 3 * GiB, "major_faults": 5}, 1.0)
    p.decide(host(1 * GiB), [s], {}, 0)
    d = p.decide(host(1 * GiB), [s], {}, 10)
    assert d.vm("a").inputs["pressure"] == 0


def test_render_policy():
    p = Policy()
    d = p.decide(host(1 * GiB - 200 * MiB), [guest_sample("web"), guest_sample("db", stats=False)], {}, 0)
    text = render_policy({"enabled": True, "interval": 10, "last": d.to_dict(),
                          "counts": {"web": {"inflate": 1}}})
    assert "reclaim" in text and "web" in text and "db" in text and "inflate=1" in text
    assert render_policy({"enabled": False, "interval": 10, "last": None}).endswith("no decision yet")


# ------------------------------------------------------------------ scenarios over time


def test_host_pressure_rising_and_falling():
    w = World({"a": Guest(used=1 * GiB), "b": Guest(used=2 * GiB), "c": Guest(used=512 * MiB)},
              host_total=16 * GiB, host_other=1 * GiB)
    d = w.run(5)
    assert d.mode == "give" and all(g.target == 0 for g in w.guests.values())
    w.host_other = 3 * GiB + 500 * MiB  # something on the host grows: 500 MiB below the reserve
    first = w.step()
    assert first.mode == "reclaim"
    assert all(abs(v.delta_bytes) <= 100 * MiB for v in first.vms)
    assert first.vm("c").action == "inflate"  # most unused memory
    w.run(10)
    avail = w.available()
    assert 1 * GiB <= avail < 1 * GiB + 512 * MiB  # back inside the band, not beyond it
    reclaimed = {n: g.target for n, g in w.guests.items()}
    assert reclaimed["c"] >= reclaimed["a"] >= reclaimed["b"]
    assert w.decisions[-1].mode == "hold"
    w.host_other = 1 * GiB  # the host load goes away: balloons shrink slowly
    d = w.step()
    assert d.mode == "give"
    assert all(0 < -v.delta_bytes <= 25 * MiB for v in d.vms if v.changed)
    w.run(100)
    assert all(g.target == 0 for g in w.guests.values())


def test_spiking_guest_gets_memory_first():
    guests = {"idle1": Guest(used=1 * GiB), "idle2": Guest(used=1 * GiB), "spike": Guest(used=1 * GiB)}
    w = World(guests, host_total=10 * GiB, host_other=1 * GiB)
    w.run(30)  # 12 GiB of guests on 9 GiB: balloons grow until the host is in its band
    assert w.decisions[-1].mode == "hold"
    before = {n: g.target for n, g in guests.items()}
    assert before["spike"] > 1 * GiB
    guests["spike"].used = 3 * GiB  # its working set grows past what it has
    d = w.step()
    assert d.vm("spike").action == "deflate"
    assert d.vm("spike").inputs["pressure"] > 0
    assert all(d.vm(n).action != "deflate" for n in ("idle1", "idle2"))
    w.run(40)
    # the spiking guest got its memory, the idle ones paid for it, the host is fine
    spike_mem = w.memory("spike")
    assert spike_mem >= 3 * GiB + KERNEL
    assert guests["idle1"].target > before["idle1"] and guests["idle2"].target > before["idle2"]
    assert w.available() >= 1 * GiB - 100 * MiB
    # each guest keeps its floor: used + headroom
    for n in ("idle1", "idle2"):
        assert w.memory(n) >= guests[n].used + 409 * MiB


def test_floors_hold_when_the_host_stays_short_forever():
    guests = {"a": Guest(used=2 * GiB), "b": Guest(used=3 * GiB)}
    w = World(guests, host_total=6 * GiB, host_other=2 * GiB,
              settings={"b": VmPolicySettings(min_bytes=3700 * MiB)})
    for _ in range(200):
        d = w.step()
        for name, g in guests.items():
            floor = max(w.settings.get(name, VmPolicySettings()).min_bytes, g.used + int(0.1 * g.ram))
            assert w.memory(name) >= floor - PAGE_SIZE
    assert d.mode == "reclaim" and d.host["unmet_bytes"] > 0
    assert d.targets() == {}  # at the floors: nothing moves


def test_no_flapping_with_noise():
    rng = random.Random(7)
    guests = {f"g{i}": Guest(used=(1 + i % 3) * GiB) for i in range(5)}
    w = World(guests, host_total=14 * GiB, host_other=1 * GiB)
    w.run(40)  # settle
    start = len(w.decisions)
    for _ in range(500):
        w.host_noise = rng.randint(-60, 60) * MiB
        w.used_noise = {n: rng.randint(-8, 8) * MiB for n in guests}
        w.step()
    moves = [v for d in w.decisions[start:] for v in d.vms if v.changed]
    assert moves == [], f"{len(moves)} target changes from noise alone, e.g. {moves[:3]}"


def test_no_flapping_at_the_floor_with_noisy_use():
    rng = random.Random(3)
    w = World({"a": Guest(used=2 * GiB)}, host_total=3 * GiB, host_other=1 * GiB)
    w.run(60)
    start = len(w.decisions)
    for _ in range(300):
        w.used_noise = {"a": rng.randint(-60, 60) * MiB}
        w.step()
    directions = [v.action for d in w.decisions[start:] for v in d.vms if v.changed]
    # the balloon may follow the lowest use seen a little (a few inflates), but
    # never goes back and forth
    assert "deflate" not in directions and len(directions) <= 5, directions


def test_shares_decide_who_gives_first_and_who_gets_back_first():
    guests = {"low": Guest(used=1 * GiB), "high": Guest(used=1 * GiB)}
    cfg = PolicyConfig(hysteresis_bytes=0)
    w = World(guests, host_total=10 * GiB - 80 * MiB, host_other=1 * GiB, config=cfg,
              settings={"high": VmPolicySettings(shares=2)})
    d = w.step()  # 80 MiB short: the low-share guest gives all of it
    assert d.targets() == {"low": 80 * MiB}
    w.run(5)
    assert guests["low"].target > guests["high"].target
    # both at a balloon now; plenty again: the high-share guest is given back first
    guests["low"].target = guests["high"].target = 1 * GiB
    w.host_other = 0
    w.host_total = 1 * GiB + 2 * 3 * GiB + 20 * MiB  # 20 MiB above the reserve (no band here)
    d = w.step()
    assert d.mode == "give"
    assert d.targets() == {"high": 1 * GiB - 20 * MiB}


def test_pressure_ordering_uses_shares():
    p = Policy()
    base = {"major_faults": 0}
    vms = [guest_sample("a", target=1 * GiB, counters=base), guest_sample("b", target=1 * GiB, counters=base)]
    p.decide(host(1 * GiB + 300 * MiB), vms, {}, 0)
    faulting = {"major_faults": 2000}  # 200/s each
    vms = [guest_sample("a", target=1 * GiB, counters=faulting), guest_sample("b", target=1 * GiB, counters=faulting)]
    d = p.decide(host(1 * GiB + 150 * MiB), vms, {"b": VmPolicySettings(shares=3)}, 10)
    assert d.mode == "hold"
    assert d.targets() == {"b": 1 * GiB - 100 * MiB, "a": 1 * GiB - 50 * MiB}


# ------------------------------------------------------------------ settings


def test_policy_config_from_a_toml_table():
    c = PolicyConfig.from_mapping({"enabled": True, "interval": 5, "host_reserve": "2G", "hysteresis": 268435456,
                                   "step": "64M", "step_percent": 5, "dead_band": "8M", "headroom": "300M",
                                   "headroom_percent": 15, "psi_full_high": "off"})
    assert c.enabled and c.interval == 5 and c.reserve_bytes == 2 * GiB and c.hysteresis_bytes == 256 * MiB
    assert c.step_bytes == 64 * MiB and c.step_fraction == 0.05 and c.dead_band_bytes == 8 * MiB
    assert c.headroom_fraction == 0.15 and c.psi_full_high is None


@pytest.mark.parametrize("table, message", [
    ({"bogus": 1}, "unknown keys"),
    ({"host_reserve": "lots"}, "not a size"),
    ({"host_reserve": -1}, "negative"),
    ({"step": True}, "expected a size"),
    ({"interval": 0}, "interval"),
    ({"dead_band": "200M"}, "dead_band"),
    ({"step_percent": 150}, "step_percent"),
    ({"psi_some_high": 0}, "percentage"),
    ({"enabled": "maybe"}, "true/false"),
])
def test_policy_config_errors(table, message):
    with pytest.raises(PolicyError, match=message):
        PolicyConfig.from_mapping(table)


def test_vm_settings_from_a_vm_table_and_from_the_api():
    s = VmPolicySettings.from_mapping({"name": "web", "socket": "/x", "policy": "off", "min_memory": "1G",
                                       "max_balloon": 3 << 30, "shares": 2, "headroom": "512M"})
    assert s == VmPolicySettings(enabled=False, min_bytes=1 * GiB, max_bytes=3 * GiB, shares=2.0,
                                 headroom_bytes=512 * MiB)
    for bad, message in [({"shares": 0}, "shares"), ({"min_memory": "x"}, "min_memory"), ({"policy": 3}, "policy")]:
        with pytest.raises(PolicyError, match=message):
            VmPolicySettings.from_mapping(bad, where="[[vm]] web")
    t = s.updated({"enabled": True, "max_bytes": None, "shares": 1})
    assert t.enabled and t.max_bytes is None and t.shares == 1.0 and t.min_bytes == 1 * GiB
    for bad in ({"enabled": 1}, {"min_bytes": -1}, {"min_bytes": 1.5}, {"shares": "2"}, {"colour": 1}):
        with pytest.raises(PolicyError):
            s.updated(bad)


# ------------------------------------------------------------------ properties

_sizes = st.integers(min_value=0, max_value=8 * GiB)


@st.composite
def _vm(draw, name):
    ram = draw(st.sampled_from([512 * MiB, 1 * GiB, 4 * GiB, 16 * GiB]))
    target = draw(st.integers(0, ram // PAGE_SIZE)) * PAGE_SIZE
    actual = draw(st.integers(0, ram // PAGE_SIZE)) * PAGE_SIZE
    stats = draw(st.dictionaries(
        st.sampled_from(["total_memory", "available_memory", "free_memory", "major_faults", "oom_kills",
                         "alloc_stalls", "direct_reclaims", "disk_caches"]),
        st.integers(0, 32 * GiB)))
    age = draw(st.none() | st.floats(0, 100))
    s = VmPolicySettings(
        enabled=draw(st.booleans()), min_bytes=draw(_sizes), max_bytes=draw(st.none() | _sizes),
        shares=draw(st.floats(0.1, 10)), headroom_bytes=draw(st.none() | _sizes))
    return VmSample(name, ram, target, actual, stats, age, draw(st.booleans())), s


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True).flatmap(
    lambda ids: st.tuples(*[_vm(f"vm{i}") for i in ids])),
    st.integers(0, 64 * GiB), st.none() | st.floats(0, 100), st.none() | st.floats(0, 100))
def test_decisions_respect_the_bounds(vms, available, psi_some, psi_full):
    p = Policy()
    samples = [s for s, _ in vms]
    settings_ = {s.name: cfg for s, cfg in vms}
    for round_ in range(2):
        d = p.decide(HostSample(available, 64 * GiB, psi_some, psi_full), samples, settings_, 100.0 + round_)
        for v, (s, cfg) in zip(d.vms, vms):
            assert v.name == s.name
            if not cfg.enabled or not s.connected:
                assert not v.changed
                continue
            assert 0 <= v.new_target_bytes <= s.guest_ram_bytes
            assert v.new_target_bytes % PAGE_SIZE == 0 or not v.changed
            hard_max = max(0, min(s.guest_ram_bytes if cfg.max_bytes is None else min(cfg.max_bytes, s.guest_ram_bytes),
                                  s.guest_ram_bytes - cfg.min_bytes))
            if v.action == "inflate":
                assert v.new_target_bytes <= hard_max
                assert v.delta_bytes <= p.step(s)
                assert s.stats_age is not None and s.stats_age <= p.config.stats_max_age
                assert v.new_target_bytes <= v.inputs["max_balloon_bytes"]
            elif v.action == "deflate" and s.target_bytes <= hard_max:
                assert -v.delta_bytes <= p.step(s)
        json.dumps(d.to_dict())


def test_reclaim_goes_on_to_the_middle_of_the_band_once_started():
    p = Policy()
    vm = [guest_sample("a")]
    assert p.decide(host(1 * GiB + 100 * MiB), vm, {}, 0).mode == "hold"  # inside the band: nothing starts
    assert p.decide(host(1 * GiB - 10 * MiB), vm, {}, 1).mode == "reclaim"
    d = p.decide(host(1 * GiB + 100 * MiB), [guest_sample("a", target=100 * MiB)], {}, 2)
    # still short of reserve + half the band by 156 MiB: one more step
    assert d.mode == "reclaim" and d.targets() == {"a": 200 * MiB}
    assert p.decide(host(1 * GiB + 256 * MiB), vm, {}, 3).mode == "hold"


def test_a_guest_left_below_its_floor_gets_memory_when_the_host_can_spare_it():
    p = Policy()
    # 1750 MiB used + 409 MiB headroom: the floor allows a 1936 MiB balloon; it has
    # 2 GiB, so 234 MiB available: short of its headroom, not below half of it
    s = guest_sample("a", target=2 * GiB, used=1750 * MiB, deflate_on_oom=False)
    d = p.decide(host(1 * GiB - 1), [s], {}, 0)
    assert d.mode == "reclaim" and d.targets() == {}  # the host is short: it stays
    d = p.decide(host(1 * GiB + 100 * MiB), [s], {}, 1)  # in the band, 100 MiB to spare
    assert d.mode == "reclaim"  # still reclaiming up to the middle of the band
    p = Policy()
    d = p.decide(host(1 * GiB + 100 * MiB), [s], {}, 1)
    assert d.mode == "hold"
    assert d.targets() == {"a": 2 * GiB - 100 * MiB} and "below its floor" in d.vm("a").reason
