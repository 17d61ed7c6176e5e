"""Fixtures for daemon-level tests: a real balloond per test module, driven
through its vhost-user sockets by `tests.frontend.TestFrontend` and watched
through its control API.

Modules override `daemon_options` to change the daemon's command line.
After every test the daemon must still be running and its log must hold no
exception (a device bug is caught and logged by the engine, so a test could
otherwise pass over one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.daemon.harness import DaemonProcess
from tests.frontend import TestFrontend

#: Log events that mean the daemon hit a bug of its own.
BUG_EVENTS = {"device error", "internal error handling request", "API handler failed"}


@pytest.fixture(scope="module")
def daemon_options() -> dict[str, Any]:
    return {}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, daemon_options: dict[str, Any]) -> Iterator[DaemonProcess]:
    # Discards happen before each buffer is returned, so memory can be checked
    # right after an inflate; a module that tests deferred discards passes its
    # own --discard-delay-ms, which comes later and wins.
    options = {"vms": ("vm0", "vm1"), "stats_interval": 0.2, **daemon_options}
    options["extra_args"] = ["--discard-delay-ms", "0", *options.get("extra_args", ())]
    proc = DaemonProcess(tmp_path_factory.mktemp("balloond"), **options)
    proc.start()
    yield proc
    alive = proc.alive
    code = proc.stop()
    assert alive, f"balloond died during the module:\n{proc.log_tail()}"
    assert code == 0, f"balloond exited with {code} on SIGTERM:\n{proc.log_tail()}"


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
    bugs = bug_records(proc.log_records(start))
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

