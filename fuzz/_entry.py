"""What both atheris entry points share: argv defaults, seeds, progress lines."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent


def prepare_argv(argv: list[str], target: str, seeds: Iterable[bytes]) -> list[str]:
    """Default corpus directory (fuzz/corpus/<target>, seeded) and timeout."""
    argv = list(argv)
    positional = [a for a in argv[1:] if not a.startswith("-")]
    if not positional:
        corpus = FUZZ_DIR / "corpus" / target
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds):
            path = corpus / f"seed-{i}"
            if not path.exists():
                path.write_bytes(seed)
        argv.append(str(corpus))
    if not any(a.startswith("-timeout=") for a in argv):
        argv.append("-timeout=10")  # libFuzzer reports an input that runs longer as a hang
    if not any(a.startswith("-rss_limit_mb=") for a in argv):
        argv.append("-rss_limit_mb=4096")
    return argv


class Progress:
    """Counts inputs and what they did; a line to stderr and a JSON file now and then."""

    def __init__(self, target: str, every: int = 10000) -> None:
        self.target = target
        self.every = every
        self.started = time.monotonic()
        self.counts: dict[str, Any] = {"inputs": 0}
        self.path = FUZZ_DIR / "out" / f"{target}-progress.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, **values: Any) -> None:
        c = self.counts
        c["inputs"] += 1
        for key, value in values.items():
            if isinstance(value, bool):
                c[key] = c.get(key, 0) + int(value)
            elif isinstance(value, float):
                c[key] = max(c.get(key, 0.0), value)
            else:
                c[key] = c.get(key, 0) + value
        if c["inputs"] % self.every == 0:
            self.flush()

    def flush(self) -> None:
        c = dict(self.counts, seconds=round(time.monotonic() - self.started, 1), pid=os.getpid())
        print(f"[{self.target}] " + json.dumps(c, sort_keys=True), file=sys.stderr, flush=True)
        self.path.write_text(json.dumps(c, sort_keys=True, indent=1) + "\n")


def run_atheris(target: str, one_input: Callable[[bytes], None], seeds: Iterable[bytes]) -> None:
    import atheris

    atheris.Setup(prepare_argv(sys.argv, target, seeds), one_input)
    atheris.Fuzz()
