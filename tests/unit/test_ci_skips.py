"""The session rule of tests/conftest.py: under CI a skip fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = '''
import pytest

def test_skips_at_run_time():
    pytest.skip("no widget on this machine")

@pytest.mark.skipif(True, reason="marked away")
def test_skipped_by_marker():
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_known_bug():
    assert False

def test_runs():
    pass
'''

MODULE_SKIP = '''
import pytest
pytest.skip("whole module away", allow_module_level=True)
'''


def run_probe(tmp_path: Path, ci: str, module: str = PROBE) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_runtest_makereport, "
                                          "pytest_make_collect_report  # noqa: F401\n")
    (tmp_path / "test_probe.py").write_text(module)
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                           str(tmp_path), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)


def test_skips_fail_under_ci(tmp_path: Path) -> None:
    out = run_probe(tmp_path, "true")
    assert out.returncode == 1, out.stdout + out.stderr
    tail = out.stdout.strip().splitlines()[-1]
    # a run-time skip fails its call; a skipif marker fails its setup (an error)
    assert "1 failed" in tail and "1 error" in tail and "1 passed" in tail and "1 xfailed" in tail, out.stdout
    assert "skipped" not in tail
    assert out.stdout.count("skipped under CI, where every test must run") >= 2
    assert "no widget on this machine" in out.stdout and "marked away" in out.stdout


def test_module_skip_fails_collection_under_ci(tmp_path: Path) -> None:
    out = run_probe(tmp_path, "true", MODULE_SKIP)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "skipped under CI, where every test must run: Skipped: whole module away" in out.stdout
    assert run_probe(tmp_path, "", MODULE_SKIP).returncode == 5  # outside CI: skipped, nothing ran


@pytest.mark.parametrize("ci", ["", "false"])
def test_skips_stay_skips_outside_ci(tmp_path: Path, ci: str) -> None:
    out = run_probe(tmp_path, ci)
    assert out.returncode == 0, out.stdout + out.stderr
    tail = out.stdout.strip().splitlines()[-1]
    assert "2 skipped" in tail and "1 passed" in tail and "1 xfailed" in tail, out.stdout


def test_allow_list_is_explained() -> None:
    from tests.conftest import CI_SKIP_ALLOWED

    for nodeid, why in CI_SKIP_ALLOWED.items():
        assert nodeid.startswith("tests/") and len(why) > 20, (nodeid, why)
