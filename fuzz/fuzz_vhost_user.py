#!/usr/bin/env python3
"""Coverage-guided fuzzing of the vhost-user parser and connection state machine.

    python fuzz/fuzz_vhost_user.py -atheris_runs=100000 [corpus_dir] [libFuzzer flags]

Each input is used twice (see fuzz/vhost.py): as a raw byte stream for
MessageReader + decode_request, and as a script of frontend actions (well
formed and malformed requests in any order, real fds of every kind, split
sends, kicks, guest writes) against a real VhostUserConnection and
BalloonDevice on a long-lived event loop with a bystander connection. A
broken invariant (exception, internal error, fd leak, hang, bystander not
served) raises and libFuzzer saves the input. Progress:
fuzz/out/vhost_user-progress.json.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["balloond", "protocol", "fuzz"]):
    from fuzz import vhost
    from fuzz._entry import Progress, run_atheris

progress = Progress("vhost_user")
fuzzer: vhost.ConnectionFuzzer | None = None


def test_one_input(data: bytes) -> None:
    global fuzzer
    if fuzzer is None:
        fuzzer = vhost.ConnectionFuzzer()
    counts = vhost.parse(data)
    stats = fuzzer.run(data)
    progress.add(
        parsed_messages=counts["messages"],
        parsed_decoded=counts["decoded"],
        messages_sent=stats.messages_sent,
        messages_seen=stats.messages_seen,
        with_protocol_violation=stats.protocol_violation,
        device_started=stats.started,
        with_live_rings=stats.max_live_rings > 0,
        fds_sent=stats.fds_sent,
        max_input_seconds=stats.seconds,
        bystander_checks=1,
    )


if __name__ == "__main__":
    run_atheris("vhost_user", test_one_input, vhost.seeds())
