"""Shared fixtures for the end-to-end tests that boot real guests.

Tests marked ``vm`` need the cached QEMU build and guest kernels
(``scripts/setup.sh`` as root).  When those are missing the tests are skipped
with the command to run, except under CI (CI=true) where that is an error:
CI must have run the setup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import SetupError, Vm, available_kernels, find_qemu
from harness.daemon import DaemonProcess

#: Debian's bookworm kernel, bookworm-backports' 6.12 and trixie-backports'
#: 7.3 (the series scripts/build-guest-kit.sh provides).
KERNEL_SERIES = ("6.1", "6.12", "7.3")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots real QEMU guests (needs scripts/setup.sh; slow)"
    )


def _setup_problem() -> str | None:
    try:
        find_qemu()
        have = {k.series for k in available_kernels()}
    except SetupError as exc:
        return str(exc)
    missing = [s for s in KERNEL_SERIES if s not in have]
    if missing:
        return f"guest kernels {missing} missing; run as root: scripts/build-guest-kit.sh"
    return None


@pytest.fixture(scope="session")
def vm_environment() -> None:
    """Skip when the VM prerequisites are missing (under CI a skip is a
    failure: tests/conftest.py)."""
    problem = _setup_problem()
    if problem:
        pytest.skip(f"VM test prerequisites missing: {problem}")


@pytest.fixture(params=KERNEL_SERIES, ids=lambda s: f"linux-{s}")
def kernel(request: pytest.FixtureRequest) -> str:
    """Each guest kernel series in turn."""
    return request.param


@pytest.fixture(params=KERNEL_SERIES[1:], ids=lambda s: f"linux-{s}")
def recent_kernel(request: pytest.FixtureRequest) -> str:
    """The series with the newer driver features (free page reporting, the
    6.12 stats tags), for tests that 6.1's driver cannot pass."""
    return request.param


@pytest.fixture
def make_vm(
    vm_environment: None, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Vm]]:
    """Factory: ``make_vm(kernel, **Vm kwargs)`` boots a guest (logs under
    the test's tmp_path) and shuts it down after the test."""
    vms: list[Vm] = []

    def factory(kernel: str, **kwargs: object) -> Vm:
        name = kwargs.pop("name", f"vm{len(vms)}")
        kwargs.setdefault("log_dir", tmp_path / str(name))
        vm = Vm(kernel, name=str(name), **kwargs)  # type: ignore[arg-type]
        vms.append(vm)
        vm.start()
        vm.wait_boot()
        return vm

    yield factory
    failed = getattr(request.node, "rep_call", None)
    for vm in vms:
        if failed is not None and failed.failed:
            vm.kill()
            print(f"\nVM logs kept in {vm.log_dir}")
        else:
            vm.close()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Expose each phase's report on the item (used to keep failed VMs' logs)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


#: The vhost-user engines (balloond --engine). A module whose tests hold for
#: any engine sets E2E_ENGINES = ENGINES: its `daemon` then runs once per engine.
ENGINES = ("pure", "libvhost-user")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`engine`: the module's E2E_ENGINES (default: the pure engine only)."""
    engines = getattr(metafunc.module, "E2E_ENGINES", None)
    if engines is not None and "engine" in metafunc.fixturenames:
        metafunc.parametrize("engine", list(engines), ids=lambda e: f"engine-{e}")


@pytest.fixture
def engine() -> str:
    """The engine of a module that does not set E2E_ENGINES."""
    return "pure"


@pytest.fixture
def daemon(tmp_path: Path, request: pytest.FixtureRequest, engine: str) -> Iterator[DaemonProcess]:
    """balloond serving one VM named "guest" on `engine`; a test marked
    `daemon_args(...)` passes extra options. The test fails if a frontend
    was served by another engine than the one it is parametrized with."""
    marker = request.node.get_closest_marker("daemon_args")
    args = list(marker.args) if marker else []
    if engine != "pure":
        args = ["--engine", engine, *args]
    d = DaemonProcess(tmp_path / "daemon", vms=("guest",), extra_args=args, log_level="info")
    d.start()
    yield d
    d.stop()
    print(f"\nballoond log: {d.log_path}")
    assert_served_by(d, engine, every=False)


def assert_served_by(daemon: DaemonProcess, engine: str, every: bool = True) -> None:
    """Every frontend `daemon` logged was served by `engine` (and, with
    `every`, at least one was): a test that starts its own DaemonProcess
    checks with this that its --engine took effect."""
    served = {r.get("engine", "pure") for r in daemon.log_records() if r.get("event") == "frontend connected"}
    assert served <= {engine}, f"a frontend was served by {served - {engine}}, not {engine}"
    assert served or not every, "no frontend connected"
