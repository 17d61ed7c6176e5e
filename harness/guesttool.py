"""Building the static guest tool (harness/guest-tools/guesttool.c).

Why built here and not by a script: the binary goes into every guest image,
so the harness compiles it on demand (gcc -static -O2) and caches it keyed by
the source's hash; editing the C file is enough to get a new binary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .errors import SetupError
from .paths import REPO_ROOT, harness_cache_dir

SOURCE = REPO_ROOT / "harness" / "guest-tools" / "guesttool.c"
CFLAGS = ["-static", "-O2", "-Wall", "-Wextra"]


def guesttool_binary() -> Path:
    """Path to the compiled guest tool, building it if the source changed."""
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join(CFLAGS).encode()).hexdigest()[:16]
    out = harness_cache_dir() / f"guesttool-{key}"
    if out.exists():
        return out
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise SetupError(f"{cc} not found; run as root: scripts/setup.sh (installs gcc, libc6-dev)")
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".guesttool-")
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SetupError(f"building {SOURCE.name} failed:\n{proc.stderr}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
