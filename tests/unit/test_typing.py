"""The typed layers stay typed: mypy over protocol/, the engine and the
supervisor-worker channel, as configured in pyproject.toml ([tool.mypy]).
A function left without annotations there, or a value used as the wrong
type, fails the suite, not a later review."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_typed_layers_pass_mypy():
    out = run_mypy()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success" in out.stdout


def test_mypy_finds_a_type_error_in_the_typed_layers(tmp_path):
    """The check can fail: the same configuration on a copy of protocol/
    with one untyped function and one wrong return type reports both."""
    bad = tmp_path / "protocol"
    bad.mkdir()
    (bad / "__init__.py").write_text("")
    (bad / "broken.py").write_text("def untyped(x):\n    return x\n\n\ndef wrong() -> int:\n    return 'no'\n")
    out = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--config-file", str(REPO / "pyproject.toml"),
                          "protocol"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "untyped" in out.stdout and "Incompatible return value type" in out.stdout
