"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def sock(tmp_path) -> Iterator[str]:
    """A Unix socket path that fits sun_path (108 bytes) even under a deep basetemp."""
    path = str(tmp_path / "qmp.sock")
    if len(path.encode()) < 100:
        yield path
        return
    short = tempfile.mkdtemp(prefix="bd-sock-")
    try:
        yield os.path.join(short, "qmp.sock")
    finally:
        shutil.rmtree(short, ignore_errors=True)
