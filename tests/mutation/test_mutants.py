"""The suite kills every hand-written mutant (tests/mutation/mutants.py).

`test_mutant_applies` is quick and keeps the mutants in step with the code;
`test_mutant_is_killed` puts each bug into a scratch copy of the tree and
runs the tests named for it there, which must fail.
"""

from __future__ import annotations

import pytest

from tests.mutation.mutants import MUTANTS, REPO, Mutant, check_applies, check_selection, failing_nodeid, run_mutant

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


@pytest.mark.slow
@pytest.mark.parametrize("mutant", MUTANTS, ids=ids)
def test_mutant_is_killed(mutant: Mutant) -> None:
    outcome = run_mutant(mutant)
    assert outcome.killed, f"{mutant.name} ({mutant.why}) survived: {outcome.detail}"
