"""Fixtures for daemon-level tests: a real balloond per test module, driven
through its vhost-user sockets by `tests.frontend.TestFrontend` and watched
through its control API.

Modules override `daemon_options` to change the daemon's command line.
After every test the daemon must still be running and its log must hold no
exception (a device bug is caught and logged by the engine, so a test could
otherwise pass over one).

Every test that uses the `daemon` fixture runs twice, once per discard mode
(`discard_mode`): `immediate` (--discard-delay-ms 0: each inflate buffer's
discards are done before it is returned) and `deferred` (the daemon's
default delay, so the default is what is tested: with MUST_TELL_HOST the
discards wait to be coalesced and a deflate cancels them). A test that
looks at host memory right after an inflate waits for the deferred discards
first (`settled`). A test that only makes sense in one mode says so with
`@pytest.mark.only_discard_mode("immediate", reason="...")`.

A module whose tests are about the device's behaviour, not one engine's,
sets `DAEMON_ENGINES = ENGINES`: its daemon then runs once per vhost-user
engine (`engine`: the pure one and libvhost-user, --engine), so that every
difference between the two shows up as a failing test.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.daemon.discards import DISCARD_MODES, SETTLE_TIMEOUT
from tests.daemon.harness import DaemonProcess
from tests.frontend import TestFrontend

#: The vhost-user engines (balloond --engine); modules opt in with DAEMON_ENGINES.
ENGINES = ("pure", "libvhost-user")

#: Logged when the daemon's periodic look served buffers that came without a kick.
LOST_KICK_EVENT = "buffers waited without a kick; serving them"

#: Log events that mean the daemon hit a bug of its own.
BUG_EVENTS = {"device error", "internal error handling request", "API handler failed"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "only_discard_mode(mode, reason): run this daemon-level test in that discard mode only",
    )
    config.addinivalue_line(
        "markers", "lost_kick_expected: the test withholds a kick on purpose (no warning for the daemon finding it)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (visibly) the runs of a test in a discard mode it opted out of."""
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("only_discard_mode")
        callspec = getattr(item, "callspec", None)
        if marker is None or callspec is None or "discard_mode" not in callspec.params:
            keep.append(item)
            continue
        mode = marker.args[0] if marker.args else marker.kwargs.get("mode")
        if mode not in DISCARD_MODES or not marker.kwargs.get("reason"):
            raise pytest.UsageError(f"{item.nodeid}: only_discard_mode needs one of {sorted(DISCARD_MODES)} and a reason")
        (keep if callspec.params["discard_mode"] == mode else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`engine`: each of the module's DAEMON_ENGINES."""
    engines = getattr(metafunc.module, "DAEMON_ENGINES", None)
    if engines is not None and "engine" in metafunc.fixturenames:
        metafunc.parametrize("engine", list(engines), scope="module")


@pytest.fixture(scope="module")
def engine() -> str:
    """The engine of a module that does not set DAEMON_ENGINES."""
    return "pure"


def engine_args(engine: str) -> list[str]:
    return [] if engine == "pure" else ["--engine", engine]


@pytest.fixture(scope="module")
def daemon_options() -> dict[str, Any]:
    return {}


@pytest.fixture(scope="module", params=list(DISCARD_MODES))
def discard_mode(request: pytest.FixtureRequest) -> str:
    """`immediate` or `deferred`: how the module's daemon discards (see above)."""
    return str(request.param)


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, daemon_options: dict[str, Any], discard_mode: str, engine: str
) -> Iterator[DaemonProcess]:
    options = {"vms": ("vm0", "vm1"), "stats_interval": 0.2, **daemon_options}
    options["extra_args"] = [*DISCARD_MODES[discard_mode], *engine_args(engine), *options.get("extra_args", ())]
    proc = DaemonProcess(tmp_path_factory.mktemp(f"balloond-{discard_mode}"), **options)
    proc.start()
    yield proc
    alive = proc.alive
    code = proc.stop()
    assert alive, f"balloond died during the module:\n{proc.log_tail()}"
    assert code == 0, f"balloond exited with {code} on SIGTERM:\n{proc.log_tail()}"


@pytest.fixture
def stateful(tmp_path: Any, discard_mode: str, engine: str) -> Iterator[DaemonProcess]:
    """A daemon of the test's own with --state-dir (one VM), for tests that kill it."""
    args = [*DISCARD_MODES[discard_mode], *engine_args(engine), "--state-dir", str(tmp_path / "state")]
    d = DaemonProcess(tmp_path / "d", vms=("vm0",), extra_args=args)
    d.start()
    yield d
    d.stop()


def bug_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "exception" in r or r.get("event") in BUG_EVENTS or "Traceback" in r.get("raw", "")]


@pytest.fixture(autouse=True)
def daemon_health(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test after which the daemon is dead or logged an exception."""
    if "daemon" not in request.fixturenames:
        yield
        return
    proc: DaemonProcess = request.getfixturevalue("daemon")
    start = proc.log_size()
    proc.test_log_start = start  # type: ignore[attr-defined]
    yield
    if not proc.alive:
        pytest.fail(f"balloond died:\n{proc.log_tail()}")
    records = proc.log_records(start)
    # Some tests end workers on purpose; for one that fails, a worker that
    # ended is often the reason (its frontend then waits for nothing).
    for r in records:
        if r.get("event") == "worker ended; starting another":
            print(f"during this test vm {r.get('vm')}'s worker ended: {r.get('reason')} ({r.get('timestamp')})")
        elif r.get("event") == LOST_KICK_EVENT and request.node.get_closest_marker("lost_kick_expected") is None:
            # Served late, so the test may pass; a lost kick is still news (the summary shows it).
            warnings.warn(f"balloond found buffers waiting without a kick during {request.node.nodeid}: {r}",
                          stacklevel=1)
    bugs = bug_records(records)
    if bugs:
        pytest.fail(f"balloond logged {len(bugs)} internal error(s); first: {bugs[0]}")


@pytest.fixture
def connect(daemon: DaemonProcess) -> Iterator[Callable[..., TestFrontend]]:
    """connect(vm="vm0", start=True, features=None, **TestFrontend kwargs).

    Every frontend is closed after the test, the daemon is seen to notice,
    and the VM's target goes back to 0.
    """
    made: list[tuple[str, TestFrontend]] = []

    def make(vm: str = "vm0", *, start: bool = True, features: Any = None, **kw: Any) -> TestFrontend:
        fe = TestFrontend(daemon.sockets[vm], connect=False, **kw)
        made.append((vm, fe))
        fe.connect()
        if start:
            fe.start(features)
        return fe

    yield make
    for _, fe in made:
        fe.close()
    for vm in sorted({vm for vm, _ in made}):
        daemon.wait_disconnected(vm)
        daemon.api.set_target(vm, 0)



@pytest.fixture
def settled(daemon: DaemonProcess) -> Callable[..., dict[str, Any]]:
    """settled(vm="vm0") -> the VM's API state once no discard is pending.

    In the deferred mode an acknowledged inflate's memory may still be
    allocated for up to the delay; a test that measures host memory calls
    this first. Bounded: a discard that never comes fails the test.
    """

    def wait(vm: str = "vm0") -> dict[str, Any]:
        return daemon.wait_vm(vm, lambda s: s["pending_discard_bytes"] == 0, SETTLE_TIMEOUT, "pending discards")

    return wait
