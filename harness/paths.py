"""Where the harness finds the repository and its build cache.

Why one module: the build scripts (scripts/*.sh) and the harness must agree on
the cache layout; every location the harness reads is derived here, from the
same environment variables the scripts use.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """The balloond build cache (same rule as scripts/lib/common.sh)."""
    explicit = os.environ.get("BALLOOND_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "balloond"


def kernels_dir() -> Path:
    """Guest kernels unpacked by scripts/build-guest-kit.sh."""
    return cache_dir() / "kernels"


def harness_cache_dir() -> Path:
    """Artifacts the harness itself builds (guest tool, initramfs images)."""
    path = cache_dir() / "harness"
    path.mkdir(parents=True, exist_ok=True)
    return path
