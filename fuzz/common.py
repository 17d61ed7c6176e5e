"""Pieces both fuzz harnesses share: an input decoder that never runs dry, a
logger that records what the daemon code logs, and the fd census.

The harnesses take raw bytes (what atheris and the mutation loop produce)
and decode them with `Input`: every read succeeds, past the end it yields
zeros, so any byte string is a valid test case and a short one is a small
test case.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class Input:
    """Structured reads from fuzzer bytes; zeros once the bytes run out."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk + bytes(n - len(chunk))

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def bool(self) -> bool:
        return bool(self.u8() & 1)

    def below(self, n: int) -> int:
        """A number in [0, n) (one byte while n <= 256)."""
        if n <= 1:
            self.u8()
            return 0
        return (self.u8() if n <= 256 else self.u16()) % n

    def choice(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]


class CapturingLog:
    """A structlog stand-in that records (level, event, fields) tuples.

    `bind` returns a child sharing the same record list, as structlog's
    bound loggers share their sink. `exception` records the active
    exception's type name too, so a harness can tell a caught bug from an
    ordinary log line.
    """

    def __init__(self, records: list[tuple[str, str, dict[str, Any]]] | None = None, **bound: Any) -> None:
        self.records = records if records is not None else []
        self.bound = bound

    def bind(self, **kw: Any) -> CapturingLog:
        return CapturingLog(self.records, **{**self.bound, **kw})

    def _log(self, level: str, event: str, **kw: Any) -> None:
        self.records.append((level, event, {**self.bound, **kw}))

    def debug(self, event: str, **kw: Any) -> None:
        pass  # debug lines carry repr()s of every request: skipping them keeps fuzzing fast

    def info(self, event: str, **kw: Any) -> None:
        self._log("info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._log("warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._log("error", event, **kw)

    def exception(self, event: str, **kw: Any) -> None:
        import sys
        import traceback

        exc = sys.exc_info()[1]
        kw["exc_type"] = type(exc).__name__ if exc is not None else None
        kw["traceback"] = traceback.format_exc()
        self._log("exception", event, **kw)

    def events(self, level: str | None = None) -> list[str]:
        return [e for lv, e, _ in self.records if level is None or lv == level]


def open_fds() -> set[int]:
    """The fds this process has open right now (/proc/self/fd)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fds.add(int(name))
    return fds


def fd_targets(fds: set[int]) -> dict[int, str]:
    out = {}
    for fd in fds:
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            out[fd] = "?"
    return out


class FuzzFailure(AssertionError):
    """An invariant the harness checks did not hold: a daemon bug (or a harness bug)."""
