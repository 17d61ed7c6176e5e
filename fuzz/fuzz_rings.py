#!/usr/bin/env python3
"""Coverage-guided fuzzing of the balloon device's ring and buffer handling.

    python fuzz/fuzz_rings.py -atheris_runs=100000 [corpus_dir] [libFuzzer flags]

Each input is one hostile-guest session (see fuzz/rings.py): descriptor
tables, chains, indirect tables, avail/used indices, PFN arrays, stats
buffers, free-page reports and migrate records, written into a memfd-backed
guest RAM and kicked through the real BalloonDevice. A broken invariant
(exception, hang, stray discard or write, miscounted buffer) raises and
libFuzzer saves the input as crash-*. Progress: fuzz/out/rings-progress.json.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["balloond", "protocol", "fuzz"]):
    from fuzz import rings
    from fuzz._entry import Progress, run_atheris

progress = Progress("rings")


def test_one_input(data: bytes) -> None:
    stats = rings.run(data)
    progress.add(
        kicks=stats.kicks,
        chains=stats.chains,
        predicted_kicks=stats.predicted_kicks,
        with_guest_errors=stats.guest_errors > 0,
        with_discards=stats.discarded_pages > 0,
        with_reporting=stats.reporting,
        stray_discards=stats.stray_discards,
        max_call_seconds=stats.max_call_seconds,
    )


if __name__ == "__main__":
    run_atheris("rings", test_one_input, rings.seeds())
