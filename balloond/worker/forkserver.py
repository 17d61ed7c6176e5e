"""Where workers come from: a forkserver that has imported the worker's code.

A worker forked from an already-imported process shares that code and data
with its siblings, so an idle one costs a few MiB of its own memory rather
than a fresh interpreter's (and starts in milliseconds). The forkserver is
exec'd, not forked from the supervisor, so it holds none of the
supervisor's sockets, threads or QMP state; it is started before the event
loop. When the supervisor dies the forkserver exits (its end of a pipe
closes) and the workers, whose parent it is, get SIGKILL (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import tempfile
from multiprocessing.context import BaseContext


#: Imported once in the forkserver; every worker inherits it.
PRELOAD = ["balloond.worker.process"]


def start_forkserver(fallback_dir: str | None = None) -> BaseContext:
    """Start the forkserver; its socket goes in a private directory made under
    $TMPDIR or /tmp, or, in a sandbox with no writable temporary directory
    (ProtectSystem=strict without PrivateTmp), under `fallback_dir` (the
    runtime directory that holds our sockets)."""
    try:
        tempfile.gettempdir()
    except FileNotFoundError:
        if fallback_dir is None:
            raise
        tempfile.tempdir = fallback_dir
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return context
