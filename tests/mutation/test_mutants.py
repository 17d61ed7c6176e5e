"""The suite kills every hand-written mutant (tests/mutation/mutants.py).

`test_mutant_applies` is quick and keeps the mutants in step with the code;
`test_mutant_is_killed` puts each bug into a scratch copy of the tree and
runs the tests named for it there, which must fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from tests.daemon.test_daemon_restart_journal import gone
from tests.mutation.mutants import (
    MUTANTS,
    REPO,
    Mutant,
    check_applies,
    check_selection,
    failing_nodeid,
    run_in_own_group,
    run_mutant,
)

ids = [m.name for m in MUTANTS]


@pytest.mark.parametrize("mutant", MUTANTS, ids=ids)
def test_mutant_applies(mutant: Mutant) -> None:
    check_applies(mutant, (REPO / mutant.path).read_text())
    check_selection(mutant)


def test_failing_nodeid_keeps_spaces_of_parameter_ids() -> None:
    line = "FAILED tests/unit/test_journal.py::test_drop[other5-rings5-inflate ring is at 0] - assert 1 == 0"
    assert failing_nodeid(line) == "tests/unit/test_journal.py::test_drop[other5-rings5-inflate ring is at 0]"
    assert failing_nodeid("ERROR tests/x.py::test_y") == "tests/x.py::test_y"
    assert failing_nodeid("1 failed in 2.0s") is None


def test_a_run_past_its_timeout_leaves_no_process_behind(tmp_path) -> None:
    """A mutant's tests start daemons; a run stopped at its timeout must
    not leave them running beside the tests that come after it."""
    pidfile = tmp_path / "child"
    outcome: list[str] = []

    def run() -> None:
        try:
            run_in_own_group(["sh", "-c", f"sleep 3600 & echo $! > {pidfile}; wait"], cwd=tmp_path,
                             env=dict(os.environ), timeout=1)
            outcome.append("returned")
        except subprocess.TimeoutExpired:
            outcome.append("timed out")

    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(10)  # a run that waited for its children would still be here
    pid = int(pidfile.read_text())
    try:
        assert outcome == ["timed out"]
        gone(pid, 5.0)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # only if it outlived the run (a zombie takes it harmlessly)
        except ProcessLookupError:
            pass
    done = run_in_own_group(["sh", "-c", "echo out; exit 3"], cwd=tmp_path, env=dict(os.environ), timeout=5)
    assert (done.returncode, done.stdout) == (3, "out\n")


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS, ids=ids)
def test_mutant_is_killed(mutant: Mutant) -> None:
    outcome = run_mutant(mutant)
    assert outcome.killed, f"{mutant.name} ({mutant.why}) survived: {outcome.detail}"
