"""Session-wide rules for every test directory.

Under CI (the environment variable CI set to anything but "" or "false") a
skipped test is a failed test: CI is where the project proves itself, and a
test that silently did not run proves nothing. The few tests that truly
cannot run there are named in `CI_SKIP_ALLOWED`, each with the reason; a
skip not on that list fails with the reason the test gave.

Outside CI skips stay skips, so a developer without, say, huge pages still
gets a useful run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

#: nodeid prefix -> why it may skip under CI. Keep this empty unless a test
#: depends on something CI's machine cannot have; say what, not "flaky".
CI_SKIP_ALLOWED: dict[str, str] = {}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_allowed_in_ci(nodeid: str) -> bool:
    return any(nodeid == prefix or nodeid.startswith(prefix + "[") or nodeid.startswith(prefix + "::")
               for prefix in CI_SKIP_ALLOWED)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not in_ci():
        return
    if skip_allowed_in_ci(item.nodeid):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = _ci_skip_message(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """A whole module skipped at import (`allow_module_level=True`) counts too."""
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if report.skipped and in_ci() and not skip_allowed_in_ci(report.nodeid):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = _ci_skip_message(reason)


def _ci_skip_message(reason: str) -> str:
    return (f"skipped under CI, where every test must run: {reason}\n"
            "(install what it needs in scripts/setup.sh, or add it to CI_SKIP_ALLOWED in "
            "tests/conftest.py with the reason it cannot run in CI)")
