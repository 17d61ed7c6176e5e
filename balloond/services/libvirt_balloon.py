"""LibvirtBalloonVm: a VM whose balloon is QEMU's built-in virtio-balloon,
steered through libvirt's API (`--vm NAME=libvirt:URI/DOMAIN`).

On a host where libvirt starts QEMU, libvirt owns the VM's monitor: QEMU
serves one client per `-qmp` socket, and the domain's XML, not the operator,
decides QEMU's command line. So for a domain that keeps its own
`<memballoon model='virtio'>`, the daemon asks libvirt, like `virsh setmem`
and `virsh dommemstat` do, and opens no QMP of its own:

- the guest's RAM is the domain's maximum memory (`virDomainGetMaxMemory`);
- the balloon and the guest's statistics come from `virDomainMemoryStats`
  ("actual" is the guest's *logical* size, RAM minus balloon, in KiB;
  "rss" is QEMU's resident set as libvirt reads it);
- the statistics period is `virDomainSetMemoryStatsPeriod` (live), set to
  the daemon's stats interval;
- targets go out with `virDomainSetMemoryFlags(..., AFFECT_LIVE)` (again a
  logical size), so the domain's persistent definition is never changed;
- lifecycle and balloon-change events make the daemon look at once; it also
  looks every second, so a lost event costs at most that.

Every libvirt call is blocking (a round trip to libvirtd), so each VM makes
its calls on a thread of its own: a libvirtd that hangs stalls that VM's
looks, never the daemon's event loop, its API or another VM. libvirt's
events are delivered on the daemon's loop (libvirtaio, from the Python
binding), and only wake the VM's next look.

A domain that stops and starts again is a new QEMU whose balloon starts at
the domain's `<currentMemory>`: the daemon sends its target again. A daemon
that starts takes over the balloon the domain has (the first target is the
balloon found), as with QEMU's balloon over QMP (qemu_balloon.py). What
libvirt does not say is left as None: which frames are ballooned, how much
host memory the discards freed (QEMU's own device discards).
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from protocol.balloon import PAGE_SIZE

from ..status import VmStatus
from .builtin_balloon import BuiltinBalloonControl

T = TypeVar("T")

KIB = 1024

#: libvirt's names in virDomainMemoryStats → (our stats key, multiplier to our unit).
#: Our keys and units are those of the virtio stats the device itself decodes
#: (bytes for sizes, counts for faults); libvirt gives sizes in KiB.
LIBVIRT_STAT_NAMES: dict[str, tuple[str, int]] = {
    "swap_in": ("swap_in", KIB),
    "swap_out": ("swap_out", KIB),
    "major_fault": ("major_faults", 1),
    "minor_fault": ("minor_faults", 1),
    "unused": ("free_memory", KIB),
    "available": ("total_memory", KIB),
    "usable": ("available_memory", KIB),
    "disk_caches": ("disk_caches", KIB),
    "hugetlb_pgalloc": ("hugetlb_allocations", 1),
    "hugetlb_pgfail": ("hugetlb_failures", 1),
}

#: virDomainState → the run state the API and the policy see ("running" is
#: the only one the policy steers; the others are libvirt's words).
_STATES = {0: "nostate", 1: "running", 2: "blocked", 3: "paused", 4: "shutdown", 5: "shutoff",
           6: "crashed", 7: "pmsuspended"}
_RUNNING, _PAUSED = 1, 3
#: libvirt's VIR_DOMAIN_AFFECT_LIVE, the error code of a domain that does not
#: exist, and of an operation not valid now (a domain that stopped meanwhile).
_AFFECT_LIVE = 1
_ERR_NO_DOMAIN = 42
_ERR_OPERATION_INVALID = 55
#: virDomainEventID: lifecycle and balloon change.
_EVENT_LIFECYCLE, _EVENT_BALLOON_CHANGE = 0, 13


def parse_target(where: str) -> tuple[str, str]:
    """`URI/DOMAIN` (what follows `libvirt:` in --vm) → (URI, domain name).

    The domain is what follows the last '/' (libvirt forbids '/' in domain
    names), so a URI with a path or a socket=... query keeps its slashes:
    `qemu:///system/web1`, `qemu:///system?socket=/run/x/libvirt-sock/web1`.
    """
    uri, sep, domain = where.rpartition("/")
    if not sep or not domain or not uri:
        raise ValueError(f"{where!r} is not URI/DOMAIN (e.g. qemu:///system/web1)")
    if uri.endswith("://"):  # "qemu:///web1" means the default path-less URI "qemu:///" and domain web1
        uri += "/"
    return uri, domain


def _count(value: Any) -> int | None:
    """A whole, non-negative number from libvirt, or None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def convert_stats(stats: dict[str, Any]) -> dict[str, int]:
    """virDomainMemoryStats → {our stats key: value}; what is not a whole number is left out."""
    out: dict[str, int] = {}
    for name, (key, scale) in LIBVIRT_STAT_NAMES.items():
        value = _count(stats.get(name))
        if value is not None:
            out[key] = value * scale
    return out


class _CallThread:
    """One daemon thread that runs a VM's blocking libvirt calls in turn.

    Not a ThreadPoolExecutor: Python joins those threads at exit, so a call
    stuck on a libvirtd that stopped answering would hold up the daemon's
    exit until libvirt's keepalive gave up on it."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            loop, future, fn, args = item
            outcome: tuple[Any, BaseException | None]
            try:
                outcome = (fn(*args), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(_settle, future, *outcome)
            except RuntimeError:  # the loop is closed: a call that outlived the daemon's stop
                pass

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((loop, future, fn, args))
        return future

    def close(self) -> None:
        self._queue.put(None)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


@dataclass
class DomainLook:
    """What one look at the domain found (made on the VM's libvirt thread)."""

    found: bool = False
    #: libvirt's id of the running domain (a new one each start); None while inactive.
    run_id: int | None = None
    state: str | None = None
    ram_bytes: int = 0
    logical_bytes: int | None = None
    resident_bytes: int | None = None
    stats: dict[str, int] = field(default_factory=dict)
    stats_updated_at: float | None = None


def _load_binding() -> Any:
    import libvirt  # Debian's python3-libvirt or PyPI's libvirt-python (scripts/lib/libvirt.sh)

    # libvirt prints every error to stderr by default ("Domain not found" at
    # each look); the daemon reports them itself, once per change.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


_events_loop: asyncio.AbstractEventLoop | None = None


def _register_events(loop: asyncio.AbstractEventLoop) -> bool:
    """libvirt's events on this asyncio loop (once per process: libvirt keeps
    the first event implementation it is given). False: no events here, the
    VM relies on its looks."""
    global _events_loop
    if _events_loop is None:
        try:
            import libvirtaio
        except ImportError:
            return False
        libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
        _events_loop = loop
    return _events_loop is loop


class LibvirtBalloonVm(BuiltinBalloonControl):
    kind = "libvirt"
    #: No QMP link: libvirt owns the monitor.
    qmp: Any = None

    def __init__(self, name: str, uri: str, domain: str, *, stats_interval: float = 5.0, log: Any = None,
                 poll_interval: float = 1.0, binding: Any = None, events: bool = True,
                 backoff_initial: float = 0.2, backoff_max: float = 5.0) -> None:
        self.name = name
        self.uri = uri
        self.domain = domain
        self.log = (log or structlog.get_logger()).bind(vm=name, libvirt_uri=uri, domain=domain)
        self.stats_interval = stats_interval
        self.poll_interval = poll_interval
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._binding = binding
        self._use_events = events
        #: A binding given by the caller (tests) delivers its events itself;
        #: the real one needs libvirt's event loop on ours (libvirtaio).
        self._needs_event_impl = binding is None
        #: The balloon asked for (bytes); None until set or taken over.
        self.target_bytes: int | None = None
        self.look = DomainLook()
        self.libvirt_connected = False
        self.connects = 0
        self.last_error: str | None = None
        self.targets_sent = 0
        self._sent: int | None = None  # the target this run of the domain has
        self._period_set: int | None = None  # stats period set on this run of the domain
        self._conn: Any = None
        self._callbacks: list[int] = []
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One thread per VM: its blocking calls wait for libvirtd, nobody else does.
        self._calls: _CallThread | None = None

    # ------------------------------------------------------------- the task

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"balloond-libvirt-{self.name}")
        return self._task

    async def stop(self, timeout: float = 2.0) -> None:
        """End the task; a call stuck on a libvirtd that does not answer is
        left behind on its (daemon) thread after `timeout` seconds."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=timeout)
        if self._calls is not None:
            self._calls.close()
            self._calls = None

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._calls is None:
            self._calls = _CallThread(f"balloond-libvirt-{self.name}")
        return await self._calls.call(fn, *args)

    async def run(self) -> None:
        delay = self.backoff_initial
        while True:
            had = False
            try:
                had = await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - libvirtd not there, refused, dropped, a bad reply...
                self._problem(f"{type(exc).__name__}: {exc}")
            finally:
                await self._close()
            if had:
                delay = self.backoff_initial
            await asyncio.sleep(delay)
            delay = min(self.backoff_max, delay * 2)

    def _open(self) -> Any:
        binding = self._binding
        conn = binding.open(self.uri)
        try:
            conn.setKeepAlive(5, 3)  # a libvirtd that stops answering closes the connection
        except Exception:  # noqa: BLE001 - keepalive needs an event loop; without one, looks find out
            pass
        return conn

    async def _session(self) -> bool:
        """One connection to libvirtd, until it drops; True if a look succeeded."""
        if self._binding is None:
            self._binding = _load_binding()
        loop = asyncio.get_running_loop()
        events = self._use_events and (not self._needs_event_impl or _register_events(loop))
        self._closed.clear()
        self._conn = conn = await self._call(self._open)
        if events:
            await self._call(self._subscribe, conn, loop)
        self.libvirt_connected = True
        self.connects += 1
        self.log.info("libvirt connected", events=events)
        looked = False
        while not self._closed.is_set():
            self._wake.clear()
            await self._refresh()
            looked = True
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except TimeoutError:
                pass
        self.log.info("libvirt connection closed")
        return looked

    def _subscribe(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        """Lifecycle and balloon events of this domain, delivered on `loop` (libvirtaio)."""
        b = self._binding

        def wake(*_: Any) -> None:
            loop.call_soon_threadsafe(self._wake.set)

        def lifecycle(_conn: Any, dom: Any, *_: Any) -> None:
            if dom.name() == self.domain:
                wake()

        def balloon(_conn: Any, dom: Any, actual: int, _opaque: Any) -> None:
            if dom.name() == self.domain and self.look.found and self.look.run_id is not None:
                loop.call_soon_threadsafe(self._balloon_changed, actual)

        def closed(*_: Any) -> None:
            loop.call_soon_threadsafe(self._closed.set)
            wake()

        conn.registerCloseCallback(closed, None)
        # All domains, filtered by name: a domain defined (or re-created) later is followed too.
        self._callbacks = [
            conn.domainEventRegisterAny(None, getattr(b, "VIR_DOMAIN_EVENT_ID_LIFECYCLE", _EVENT_LIFECYCLE),
                                        lifecycle, None),
            conn.domainEventRegisterAny(None, getattr(b, "VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE",
                                                      _EVENT_BALLOON_CHANGE), balloon, None),
        ]

    def _balloon_changed(self, actual_kib: int) -> None:
        if isinstance(actual_kib, int) and actual_kib > 0:
            self.look.logical_bytes = actual_kib * KIB

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        callbacks, self._callbacks = self._callbacks, []
        was = self.libvirt_connected
        self.libvirt_connected = False
        self._forget_run()
        self.look = DomainLook()
        if conn is None:
            return

        def close() -> None:
            for cb in callbacks:
                try:
                    conn.domainEventDeregisterAny(cb)
                except Exception:  # noqa: BLE001 - the connection may be gone already
                    pass
            try:
                conn.unregisterCloseCallback()
            except Exception:  # noqa: BLE001
                pass
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

        await self._call(close)
        if was:
            self.log.info("libvirt disconnected")

    def _forget_run(self) -> None:
        """The domain's QEMU is gone (or unknown): what was set on it no longer holds."""
        self._sent = None
        self._period_set = None

    # ------------------------------------------------------------- looking

    def _look(self, conn: Any) -> DomainLook:
        b = self._binding
        try:
            dom = conn.lookupByName(self.domain)
        except Exception as exc:
            if _error_code(exc) == getattr(b, "VIR_ERR_NO_DOMAIN", _ERR_NO_DOMAIN):
                return DomainLook(found=False)
            raise
        state, _reason = dom.state()
        look = DomainLook(found=True, state=_STATES.get(state, f"state-{state}"))
        look.ram_bytes = (_count(dom.maxMemory()) or 0) * KIB
        if state not in (_RUNNING, _PAUSED) and not dom.isActive():
            return look
        run_id = dom.ID()
        try:
            stats = dom.memoryStats()
        except Exception as exc:
            if self._stopped_meanwhile(exc):
                return look  # shut down between two calls: looked at again on its event
            raise
        look.run_id = run_id if isinstance(run_id, int) and run_id >= 0 else None
        if not isinstance(stats, dict):
            stats = {}
        actual = _count(stats.get("actual"))
        look.logical_bytes = actual * KIB if actual else None
        rss = _count(stats.get("rss"))
        look.resident_bytes = rss * KIB if rss is not None else None
        look.stats = convert_stats(stats)
        updated = _count(stats.get("last_update"))
        if updated and look.stats:
            look.stats_updated_at = float(updated)
        return look

    def _apply(self, conn: Any, run_id: int | None, period: int | None, logical_kib: int | None) -> None:
        """Set this run's stats period and balloon (a logical size in KiB); None: leave as is."""
        dom = conn.lookupByName(self.domain)
        if run_id is not None and dom.ID() != run_id:
            raise _DomainRestarted()
        live = getattr(self._binding, "VIR_DOMAIN_AFFECT_LIVE", _AFFECT_LIVE)
        if period is not None:
            dom.setMemoryStatsPeriod(period, live)
        if logical_kib is not None:
            dom.setMemoryFlags(logical_kib, live)

    async def _refresh(self) -> None:
        conn = self._conn
        if conn is None:
            return
        look = await self._call(self._look, conn)
        previous = self.look
        if look.run_id is None or look.run_id != previous.run_id:
            self._forget_run()  # stopped, or a new QEMU: its balloon starts at <currentMemory>
        if look.state != previous.state:
            self.log.info("domain state", run_state=look.state if look.found else "undefined")
        self.look = look
        if not look.found:
            self._problem(f"no domain {self.domain!r} at {self.uri}")
            return
        if look.run_id is not None and look.logical_bytes is None:
            self._problem("libvirt reports no balloon size for the domain")
            return
        self.last_error = None  # before any wait: whoever sees it connected sees no old problem
        if look.run_id is None:
            return
        self._take_over()
        await self._push()

    def _wanted(self) -> tuple[int | None, int | None, int | None]:
        """What this run of the domain still needs: (stats period, logical KiB, target bytes)."""
        period = math.ceil(self.stats_interval) if self.stats_interval > 0 else 0
        ram = self.look.ram_bytes
        target = None
        if self.target_bytes is not None and ram:
            target = min(self.target_bytes, ram - PAGE_SIZE)  # QEMU refuses a logical size of 0
        return (period if period != self._period_set else None,
                (ram - target) // KIB if target is not None and target != self._sent else None,
                target)

    async def _push(self) -> None:
        conn, run_id = self._conn, self.look.run_id
        if conn is None or run_id is None:
            return
        period, logical_kib, target = self._wanted()
        if period is None and logical_kib is None:
            return
        try:
            await self._call(self._apply, conn, run_id, period, logical_kib)
        except _DomainRestarted:
            self._wake.set()  # look again: the new run gets everything
            return
        except Exception as exc:
            if not self._stopped_meanwhile(exc):
                raise
            self._wake.set()  # stopped since the look: the next look says so
            return
        if period is not None:
            self._period_set = period
        if logical_kib is not None:
            self._sent = target
            self.targets_sent += 1
            self.log.info("target sent to libvirt", target_bytes=target, logical_bytes=logical_kib * KIB)

    def _stopped_meanwhile(self, exc: BaseException) -> bool:
        """libvirt refused because the domain is no longer running (not a
        broken connection: no reason to drop it)."""
        return _error_code(exc) == getattr(self._binding, "VIR_ERR_OPERATION_INVALID", _ERR_OPERATION_INVALID)

    def _take_over(self) -> None:
        """No target yet (a daemon that just started): keep the balloon the domain has."""
        if self.target_bytes is None and self.look.logical_bytes is not None and self.look.ram_bytes:
            self.target_bytes = max(0, self.look.ram_bytes - self.look.logical_bytes) // PAGE_SIZE * PAGE_SIZE
            self.log.info("took over the domain's balloon", target_bytes=self.target_bytes)
            self._sent = self.target_bytes

    def _problem(self, message: str) -> None:
        if message != self.last_error:
            self.log.warning("libvirt balloon unavailable", error=message)
        self.last_error = message

    def _schedule_push(self) -> None:
        """A changed setting: wake the VM's task, which looks and sends it."""
        self._wake.set()

    # ------------------------------------------------------------- control

    @property
    def guest_ram_bytes(self) -> int:
        return self.look.ram_bytes

    @property
    def connected(self) -> bool:
        return self.libvirt_connected and self.look.run_id is not None and self.look.logical_bytes is not None

    # ------------------------------------------------------------- reading

    def ballooned_bytes(self) -> int:
        look = self.look
        if look.logical_bytes is None or not look.ram_bytes or look.run_id is None:
            return 0
        return max(0, look.ram_bytes - look.logical_bytes)

    def status(self) -> VmStatus:
        ballooned = self.ballooned_bytes()
        look = self.look
        return VmStatus(
            name=self.name,
            kind=self.kind,
            socket=None,
            qmp=None,
            connected=self.connected,
            connections=self.connects,
            guest_ram_bytes=look.ram_bytes,
            target_bytes=self.target_bytes or 0,
            stats_interval=self.stats_interval,
            last_disconnect=None,
            qmp_connected=False,
            run_state=look.state if self.libvirt_connected and look.found else None,
            discard_inhibited=None,  # QEMU's own device enforces its inhibit
            discard_guard=None,
            device=f"{self.uri}/{self.domain}",
            last_error=self.last_error,
            actual_bytes=ballooned,
            ballooned_bytes=ballooned,
            host_freed_bytes=None,
            reported_freed_bytes=None,
            resident_bytes=look.resident_bytes,
            features=[],
            stats=dict(look.stats),
            stats_updated_at=look.stats_updated_at,
            migrations=None,
            running=self.connected and look.state == "running",
            counters={"targets_sent": self.targets_sent},
            updated_at=time.time(),
        )


class _DomainRestarted(Exception):
    """The domain was started again between a look and a change meant for its previous run."""


def _error_code(exc: BaseException) -> int | None:
    get = getattr(exc, "get_error_code", None)
    try:
        return get() if callable(get) else None
    except Exception:  # noqa: BLE001
        return None
