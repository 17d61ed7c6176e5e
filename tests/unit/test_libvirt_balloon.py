"""LibvirtBalloonVm (a libvirt domain's built-in balloon, through libvirt's
API) against a fake binding that plays libvirtd: what it sends, when, and
what it makes of what libvirt says, hostile answers included. The real
thing runs in tests/e2e/test_libvirt.py; the config and balloonctl sides
are here too."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import structlog

from balloond.services import config
from balloond.services.cli import render_libvirt_xml
from balloond.services.libvirt_balloon import LibvirtBalloonVm, convert_stats, parse_target
from balloond.vm import NotSupported, TargetError

MiB = 1 << 20
KiB = 1024
RAM = 512 * MiB
log = structlog.get_logger()


class FakeError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code

    def get_error_code(self) -> int:
        return self.code


class FakeDomain:
    """One domain: its state, balloon (logical KiB) and what was asked of it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self.id = -1
        self.state_code = 5  # shut off
        self.max_kib = RAM // KiB
        self.current_kib = RAM // KiB  # <currentMemory>: the balloon at start
        self.logical_kib = self.max_kib
        self.stats: dict[str, int] = {}
        self.calls: list[tuple[str, Any, ...]] = []
        self.refuse: str | None = None
        self.memory_stats_reply: Any = None  # hostile replies
        self.stop_before_stats = False

    def start(self, run_id: int) -> None:
        self.id, self.state_code, self.logical_kib = run_id, 1, self.current_kib

    def destroy(self) -> None:
        self.id, self.state_code = -1, 5

    # the binding's virDomain
    def name(self) -> str:
        return self._name

    def state(self) -> list[int]:
        return [self.state_code, 0]

    def maxMemory(self) -> int:  # noqa: N802 - libvirt's names
        return self.max_kib

    def isActive(self) -> int:  # noqa: N802
        return int(self.id >= 0)

    def ID(self) -> int:  # noqa: N802
        return self.id

    def memoryStats(self) -> Any:  # noqa: N802
        if self.stop_before_stats:  # shuts down between the look's state() and memoryStats()
            self.stop_before_stats = False
            self.destroy()
        if self.id < 0:
            raise FakeError("domain is not running", 55)
        if self.memory_stats_reply is not None:
            return self.memory_stats_reply
        return {"actual": self.logical_kib, "rss": 300 * 1024, **self.stats}

    def setMemoryStatsPeriod(self, period: int, flags: int) -> int:  # noqa: N802
        self._record("period", period, flags)
        return 0

    def setMemoryFlags(self, kib: int, flags: int) -> int:  # noqa: N802
        self._record("setmem", kib, flags)
        self.logical_kib = kib
        return 0

    def _record(self, *call: Any) -> None:
        if self.refuse:
            raise FakeError(self.refuse)
        self.calls.append(call)


class FakeConn:
    def __init__(self, binding: FakeBinding) -> None:
        self.binding = binding
        self.closed = False
        self.callbacks: dict[int, tuple[int, Callable[..., None]]] = {}
        self.close_callback: Callable[..., None] | None = None

    def _check(self) -> None:
        if self.closed or self.binding.down:
            raise FakeError("connection closed", 38)
        if self.binding.hang is not None:
            self.binding.hang.wait()

    def setKeepAlive(self, interval: int, count: int) -> None:  # noqa: N802
        pass

    def lookupByName(self, name: str) -> FakeDomain:  # noqa: N802
        self._check()
        dom = self.binding.domains.get(name)
        if dom is None:
            raise FakeError(f"Domain not found: {name}", self.binding.VIR_ERR_NO_DOMAIN)
        return dom

    def registerCloseCallback(self, cb: Callable[..., None], opaque: Any) -> None:  # noqa: N802
        self.close_callback = cb

    def unregisterCloseCallback(self) -> None:  # noqa: N802
        self.close_callback = None

    def domainEventRegisterAny(self, dom: Any, event: int, cb: Callable[..., None], opaque: Any) -> int:  # noqa: N802
        ident = len(self.callbacks) + 1
        self.callbacks[ident] = (event, cb)
        return ident

    def domainEventDeregisterAny(self, ident: int) -> None:  # noqa: N802
        self.callbacks.pop(ident, None)

    def close(self) -> None:
        self.closed = True


class FakeBinding:
    VIR_ERR_NO_DOMAIN = 42
    VIR_ERR_OPERATION_INVALID = 55
    VIR_DOMAIN_AFFECT_LIVE = 1
    VIR_DOMAIN_EVENT_ID_LIFECYCLE = 0
    VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE = 13

    def __init__(self) -> None:
        self.domains: dict[str, FakeDomain] = {}
        self.conns: list[FakeConn] = []
        self.down = False
        self.hang: threading.Event | None = None

    def open(self, uri: str) -> FakeConn:
        if self.down:
            raise FakeError("Failed to connect socket", 38)
        conn = FakeConn(self)
        self.conns.append(conn)
        return conn

    def fire(self, event: int, dom: FakeDomain, *args: Any) -> None:
        for conn in self.conns:
            if not conn.closed:
                for kind, cb in list(conn.callbacks.values()):
                    if kind == event:
                        cb(conn, dom, *args, None)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def scenario(body: Callable[[FakeBinding, FakeDomain, LibvirtBalloonVm], Awaitable[None]], *,
             running: bool = True, poll_interval: float = 0.02, stats_interval: float = 0.0,
             events: bool = False) -> None:
    async def main() -> None:
        binding = FakeBinding()
        dom = binding.domains.setdefault("web1", FakeDomain("web1"))
        if running:
            dom.start(1)
        vm = LibvirtBalloonVm("w", "qemu:///system", "web1", binding=binding, poll_interval=poll_interval,
                              stats_interval=stats_interval, log=log, backoff_initial=0.01, backoff_max=0.05,
                              events=events)
        vm.start()
        try:
            await body(binding, dom, vm)
        finally:
            await vm.stop()

    asyncio.run(main())


def setmems(dom: FakeDomain) -> list[int]:
    return [c[1] for c in dom.calls if c[0] == "setmem"]


# ----------------------------------------------------------------- parsing


@pytest.mark.parametrize("where,uri,domain", [
    ("qemu:///system/web1", "qemu:///system", "web1"),
    ("qemu:///system?socket=/run/x/libvirt-sock/db.2", "qemu:///system?socket=/run/x/libvirt-sock", "db.2"),
    ("qemu+ssh://root@host/system/web1", "qemu+ssh://root@host/system", "web1"),
    ("qemu:///web1", "qemu:///", "web1"),
])
def test_parse_target(where, uri, domain):
    assert parse_target(where) == (uri, domain)


@pytest.mark.parametrize("where", ["web1", "qemu:///system/", "/web1", ""])
def test_parse_target_refuses_what_names_no_domain(where):
    with pytest.raises(ValueError):
        parse_target(where)


def test_config_libvirt_kind_from_flags_and_toml(tmp_path):
    s, _ = config.load(["--vm", "a=libvirt:qemu:///system/dom-a,headroom=64M"])
    (vm,) = s.vms
    assert (vm.libvirt, vm.domain, vm.socket, vm.qmp) == ("qemu:///system", "dom-a", None, None)
    assert not vm.uses_qemu_balloon and vm.policy.headroom_bytes == 64 * MiB
    toml = tmp_path / "c.toml"
    toml.write_text('[[vm]]\nname = "b"\nlibvirt = "qemu:///system"\n\n'
                    '[[vm]]\nname = "c"\nlibvirt = "qemu:///system"\ndomain = "other"\nshares = 2\n')
    s, _ = config.load(["--config", str(toml)])
    assert [(v.name, v.libvirt, v.domain) for v in s.vms] == [("b", "qemu:///system", "b"),
                                                              ("c", "qemu:///system", "other")]


@pytest.mark.parametrize("argv,toml,message", [
    (["--vm", "a=libvirt:web1"], None, "not URI/DOMAIN"),
    (["--vm", "a=libvirt:qemu:///system/web1,qmp=/x.qmp"], None, "not a QMP socket"),
    (["--vm", "a=libvirt:qemu:///system/d", "--vm", "b=libvirt:qemu:///system/d"], None, "one libvirt domain"),
    ([], '[[vm]]\nname = "a"\nlibvirt = "qemu:///system"\nsocket = "/x.sock"\n', "takes no socket"),
    ([], '[[vm]]\nname = "a"\nlibvirt = 3\n', "connection URI"),
    ([], '[[vm]]\nname = "a"\nlibvirt = "qemu:///system"\ndomain = "a/b"\n', "domain name"),
    ([], '[[vm]]\nname = "a"\ndomain = "a"\n', "connection URI"),
])
def test_config_refuses_bad_libvirt_vms(tmp_path, argv, toml, message):
    if toml is not None:
        path = tmp_path / "c.toml"
        path.write_text(toml)
        argv = [*argv, "--config", str(path)]
    with pytest.raises(config.ConfigError, match=message):
        config.load(argv)


def test_convert_stats_scales_kib_and_drops_what_is_not_a_count():
    out = convert_stats({"unused": 100, "available": 400, "usable": 200, "disk_caches": 10, "major_fault": 3,
                         "swap_in": 1, "actual": 999, "rss": 5, "last_update": 7, "minor_fault": -1,
                         "hugetlb_pgalloc": True, "hugetlb_pgfail": "x"})
    assert out == {"free_memory": 100 * KiB, "total_memory": 400 * KiB, "available_memory": 200 * KiB,
                   "disk_caches": 10 * KiB, "major_faults": 3, "swap_in": 1 * KiB}


def test_libvirt_xml_fragment_escapes_commas_and_quotes():
    xml = render_libvirt_xml("w", "/run/b,x/w'.sock", "/run/b/w.qmp", config_cache=False)
    assert "path=/run/b,,x/w'.sock" in xml and "config-cache" not in xml
    assert "<qemu:arg value=\"socket,id=balloond0,path=/run/b,,x/w'.sock\"/>" in xml
    assert "unix:/run/b/w.qmp,server=on,wait=off" in xml
    assert "-qmp" not in render_libvirt_xml("w", "/s", None)


# ----------------------------------------------------------------- the VM


def test_takes_over_the_domains_balloon_and_reports_it():
    async def body(binding, dom, vm):
        dom.stats = {"unused": 100 * 1024, "usable": 150 * 1024, "available": 500 * 1024, "last_update": 1234}
        await until(lambda: vm.connected)
        s = vm.status()
        assert (s.kind, s.qmp, s.socket, s.guest_ram_bytes, s.target_bytes) == ("libvirt", None, None, RAM, 0)
        assert s.run_state == "running" and s.running and s.resident_bytes == 300 * MiB
        assert s.stats["available_memory"] == 150 * MiB and s.stats_updated_at == 1234.0
        assert s.actual_bytes == 0 and s.host_freed_bytes is None and s.migrations is None
        assert setmems(dom) == []  # a balloon taken over is not sent back
        with pytest.raises(NotSupported):
            vm.pfn_ranges()

    scenario(body)


def test_a_balloon_found_becomes_the_target():
    async def body(binding, dom, vm):
        dom.logical_kib = (RAM - 100 * MiB) // KiB
        await until(lambda: vm.connected)
        assert vm.target_bytes == 100 * MiB and vm.status().actual_bytes == 100 * MiB

    scenario(body)


def test_a_target_is_sent_as_the_live_logical_size_once():
    async def body(binding, dom, vm):
        await until(lambda: vm.connected)
        vm.set_target_bytes(200 * MiB)
        await until(lambda: setmems(dom))
        await asyncio.sleep(0.1)  # several looks
        assert [c for c in dom.calls if c[0] == "setmem"] == [("setmem", (RAM - 200 * MiB) // KiB, 1)]
        await until(lambda: vm.status().actual_bytes == 200 * MiB)
        assert vm.status().counters == {"targets_sent": 1}

    scenario(body)


def test_targets_the_balloon_cannot_take_are_refused():
    async def body(binding, dom, vm):
        await until(lambda: vm.connected)
        for bad in (RAM, RAM + 1, -1, 1.5, True, "1G"):
            with pytest.raises(TargetError):
                vm.set_target_bytes(bad)
        assert vm.target_bytes == 0

    scenario(body)


def test_a_restarted_domain_gets_the_target_again_and_a_stopped_one_is_left_alone():
    async def body(binding, dom, vm):
        await until(lambda: vm.connected)
        vm.set_target_bytes(128 * MiB)
        await until(lambda: len(setmems(dom)) == 1)
        dom.destroy()
        await until(lambda: not vm.connected and vm.status().run_state == "shutoff")
        s = vm.status()
        assert s.actual_bytes == 0 and not s.running and s.target_bytes == 128 * MiB
        vm.set_target_bytes(64 * MiB)  # set while the domain is off: nothing to send to
        await asyncio.sleep(0.1)
        assert len(setmems(dom)) == 1
        dom.start(2)  # its balloon starts at <currentMemory>
        await until(lambda: len(setmems(dom)) == 2)
        assert setmems(dom)[-1] == (RAM - 64 * MiB) // KiB
        await until(lambda: vm.connected and vm.status().actual_bytes == 64 * MiB)

    scenario(body)


def test_the_stats_period_is_set_once_per_run_and_when_changed():
    async def body(binding, dom, vm):
        await until(lambda: vm.connected)
        await until(lambda: [c for c in dom.calls if c[0] == "period"])
        await asyncio.sleep(0.1)
        assert [c for c in dom.calls if c[0] == "period"] == [("period", 3, 1)]  # 2.5 s: whole seconds
        vm.set_stats_interval(0)
        await until(lambda: dom.calls[-1] == ("period", 0, 1))
        dom.destroy()
        await until(lambda: not vm.connected)
        dom.start(2)
        await until(lambda: len([c for c in dom.calls if c[0] == "period"]) == 3)

    scenario(body, stats_interval=2.5)


def test_a_missing_domain_is_reported_and_found_when_defined():
    async def body(binding, dom, vm):
        await until(lambda: vm.last_error and "no domain" in vm.last_error)
        s = vm.status()
        assert not s.connected and s.run_state is None and s.guest_ram_bytes == 0
        binding.domains["web1"] = dom
        await until(lambda: vm.connected)
        assert vm.last_error is None

    async def run(binding, dom, vm):
        del binding.domains["web1"]
        await body(binding, dom, vm)

    scenario(run)


def test_libvirtd_going_away_and_back():
    async def body(binding, dom, vm):
        await until(lambda: vm.connected)
        vm.set_target_bytes(64 * MiB)
        await until(lambda: setmems(dom))
        binding.down = True
        await until(lambda: not vm.status().connected and vm.status().run_state is None)
        assert vm.last_error and ("connection closed" in vm.last_error or "Failed to connect" in vm.last_error)
        binding.down = False
        await until(lambda: vm.connected)
        assert vm.connects >= 2 and vm.target_bytes == 64 * MiB
        # what was set is not known to hold across libvirtd's restart: sent once more (the same size)
        await until(lambda: len(setmems(dom)) == 2)
        await asyncio.sleep(0.1)
        assert setmems(dom) == [(RAM - 64 * MiB) // KiB] * 2

    scenario(body)


def test_a_hung_libvirtd_stalls_only_its_vm():
    async def body(binding, dom, vm):
        await until(lambda: vm.connected)
        binding.hang = threading.Event()
        await asyncio.sleep(0.1)  # the VM's thread is stuck in a call
        t0 = time.monotonic()
        s = vm.status()  # the loop and the VM's status are not
        vm.set_target_bytes(32 * MiB)
        assert time.monotonic() - t0 < 0.5 and s.connected
        binding.hang.set()
        binding.hang = None
        await until(lambda: setmems(dom))

    scenario(body)


def test_hostile_replies_are_refused_and_the_vm_carries_on():
    async def body(binding, dom, vm):
        await until(lambda: vm.connected)
        for reply in ("nonsense", [], {"actual": "lots"}, {"actual": -5}, {"actual": True}, {"rss": 1}):
            dom.memory_stats_reply = reply
            await until(lambda: not vm.connected)
            s = vm.status()
            assert s.actual_bytes == 0 and s.stats == {}
        dom.memory_stats_reply = None
        await until(lambda: vm.connected)

    scenario(body)


def test_events_wake_a_look_at_once():
    async def body(binding, dom, vm):
        await until(lambda: vm.connected)
        dom.logical_kib = (RAM - 50 * MiB) // KiB
        binding.fire(binding.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, dom, dom.logical_kib)
        await until(lambda: vm.status().actual_bytes == 50 * MiB, timeout=1.0)
        dom.destroy()
        binding.fire(binding.VIR_DOMAIN_EVENT_ID_LIFECYCLE, dom, 5, 0)
        await until(lambda: not vm.connected, timeout=1.0)

    scenario(body, poll_interval=60, events=True)


def test_a_domain_stopping_mid_look_keeps_the_connection():
    async def body(binding, dom, vm):
        await until(lambda: vm.connected)
        dom.stop_before_stats = True
        await until(lambda: not vm.connected and vm.status().run_state == "shutoff")
        assert len(binding.conns) == 1 and vm.connects == 1 and vm.last_error is None
        dom.start(2)
        await until(lambda: vm.connected)
        assert len(binding.conns) == 1

    scenario(body)


def test_stopping_does_not_wait_for_a_hung_libvirtd():
    async def body(binding, dom, vm):
        await until(lambda: vm.connected)
        binding.hang = threading.Event()
        await asyncio.sleep(0.1)  # the VM's thread is stuck in a call
        t0 = time.monotonic()
        await vm.stop(timeout=0.3)
        assert time.monotonic() - t0 < 1.0
        binding.hang.set()

    scenario(body)
