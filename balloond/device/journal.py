"""BalloonJournal: a VM's balloon on disk, so a restarted daemon finds it again.

What must survive a daemon crash is what the guest believes: which frames it
gave to the balloon, and the target the operator set. The journal keeps

  <vm>.snap      a snapshot: header line (JSON) + the ballooned runs, written
                 whole with write, fsync, rename — never half there;
  <vm>.log.<N>   every change since snapshot N, appended one record per batch
                 of buffers (not per page), before those buffers are returned
                 to the guest.

Appends are not fsynced: a killed daemon loses nothing the kernel already
has, and a host crash takes the guest down with it. When the log outgrows
the snapshot it is folded into a new snapshot (generation N+1) and the old
log is removed, so the cost stays bounded by the balloon's size, not by its
history.

Which guest the journal belongs to is told by the identity of the file that
backs its RAM (device and inode of the memfd): the same QEMU reconnecting to
a restarted daemon presents the same file; a new QEMU presents a new one,
and its balloon starts empty.
"""

from __future__ import annotations

import array
import json
import os
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

RECORD = struct.Struct("<BI")  # kind, count of u64 values that follow
INFLATE, DEFLATE, MIGRATE, CLEAR, TARGET = b"I"[0], b"D"[0], b"M"[0], b"C"[0], b"T"[0]
FORMAT = 1


class JournalError(Exception):
    """The state directory cannot be used; the message says why."""


class FrameSet:
    """A sparse set of frame numbers: one bit per frame, in 32768-frame chunks
    allocated on first use (32 KiB per GiB ballooned, like the tracker)."""

    CHUNK = 1 << 15

    def __init__(self) -> None:
        self._chunks: dict[int, bytearray] = {}
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __contains__(self, pfn: int) -> bool:
        chunk = self._chunks.get(pfn // self.CHUNK)
        off = pfn % self.CHUNK
        return chunk is not None and bool(chunk[off >> 3] & (1 << (off & 7)))

    def add(self, pfn: int) -> None:
        c, off = divmod(pfn, self.CHUNK)
        chunk = self._chunks.get(c)
        if chunk is None:
            chunk = self._chunks[c] = bytearray(self.CHUNK // 8)
        bit = 1 << (off & 7)
        if not chunk[off >> 3] & bit:
            chunk[off >> 3] |= bit
            self.count += 1

    def discard(self, pfn: int) -> None:
        c, off = divmod(pfn, self.CHUNK)
        chunk = self._chunks.get(c)
        bit = 1 << (off & 7)
        if chunk is not None and chunk[off >> 3] & bit:
            chunk[off >> 3] &= ~bit & 0xFF
            self.count -= 1

    def update(self, pfns: Iterable[int]) -> None:
        for pfn in pfns:
            self.add(pfn)

    def difference_update(self, pfns: Iterable[int]) -> None:
        for pfn in pfns:
            self.discard(pfn)

    def clear(self) -> None:
        self._chunks.clear()
        self.count = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        for c in sorted(self._chunks):
            chunk = self._chunks[c]
            base = c * self.CHUNK
            for i, byte in enumerate(chunk):
                if byte:
                    for k in range(8):
                        if byte & (1 << k):
                            yield base + i * 8 + k


@dataclass
class BalloonState:
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) of guest RAM's file
    target_pages: int = 0
    frames: FrameSet = field(default_factory=FrameSet)


def _u64s(values: Iterable[int]) -> bytes:
    data = array.array("Q", values)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tobytes()


class BalloonJournal:
    def __init__(self, directory: str, vm: str, *, compact_min_bytes: int = 1 << 20) -> None:
        self.directory = directory
        self.vm = vm
        self.compact_min_bytes = compact_min_bytes
        self.state = BalloonState()
        self.generation = 0
        self._log_fd: int | None = None
        self._log_bytes = 0
        self._snap_bytes = 0
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"state directory {directory}: {exc.strerror}") from None
        if not os.access(directory, os.W_OK | os.X_OK):
            raise JournalError(f"state directory {directory} is not writable")
        self._load()
        self._open_log()

    # ------------------------------------------------------------ paths

    @property
    def snap_path(self) -> str:
        return os.path.join(self.directory, f"{self.vm}.snap")

    def log_path(self, generation: int) -> str:
        return os.path.join(self.directory, f"{self.vm}.log.{generation}")

    # ------------------------------------------------------------ loading

    def _load(self) -> None:
        try:
            with open(self.snap_path, "rb") as f:
                header = json.loads(f.readline())
                body = f.read()
        except FileNotFoundError:
            header, body = None, b""
        except (OSError, ValueError) as exc:
            raise JournalError(f"{self.snap_path} is unreadable ({exc}); move it away to start afresh") from None
        if header is not None:
            if header.get("format") != FORMAT:
                raise JournalError(f"{self.snap_path}: unknown format {header.get('format')!r}")
            self.generation = int(header["generation"])
            identity = header.get("identity")
            self.state.identity = tuple(identity) if identity else None  # type: ignore[assignment]
            self.state.target_pages = int(header.get("target_pages", 0))
            runs = array.array("Q", body[: len(body) - len(body) % 16])
            if sys.byteorder != "little":
                runs.byteswap()
            for i in range(0, len(runs), 2):
                self.state.frames.update(range(runs[i], runs[i] + runs[i + 1]))
            self._snap_bytes = len(body)
        self._replay(self.log_path(self.generation))

    def _replay(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        pos = 0
        frames = self.state.frames
        while pos + RECORD.size <= len(data):
            kind, count = RECORD.unpack_from(data, pos)
            end = pos + RECORD.size + 8 * count
            if end > len(data):
                break  # a record torn by the crash: it was never acknowledged
            values = array.array("Q", data[pos + RECORD.size : end])
            if sys.byteorder != "little":
                values.byteswap()
            if kind == INFLATE:
                frames.update(values)
            elif kind == DEFLATE:
                frames.difference_update(values)
            elif kind == MIGRATE:
                for i in range(0, len(values) - 1, 2):
                    frames.discard(values[i])
                    frames.add(values[i + 1])
            elif kind == CLEAR:
                frames.clear()
                if len(values) >= 2:
                    self.state.identity = (values[0], values[1])
            elif kind == TARGET and values:
                self.state.target_pages = values[0]
            else:
                break  # not ours past this point
            pos = end
        if pos != len(data):
            with open(path, "r+b") as f:
                f.truncate(pos)
        self._log_bytes = pos

    def _open_log(self) -> None:
        try:
            self._log_fd = os.open(self.log_path(self.generation), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot open {self.log_path(self.generation)}: {exc.strerror}") from None

    # ------------------------------------------------------------ recording

    def _append(self, kind: int, values: list[int] | tuple[int, ...]) -> None:
        if self._log_fd is None:
            return
        record = RECORD.pack(kind, len(values)) + _u64s(values)
        os.write(self._log_fd, record)
        self._log_bytes += len(record)
        if self._log_bytes > max(self.compact_min_bytes, 2 * self._snap_bytes):
            self.compact()

    def inflated(self, pfns: list[int]) -> None:
        if pfns:
            self.state.frames.update(pfns)
            self._append(INFLATE, pfns)

    def deflated(self, pfns: list[int]) -> None:
        if pfns:
            self.state.frames.difference_update(pfns)
            self._append(DEFLATE, pfns)

    def migrated(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            flat: list[int] = []
            for old, new in pairs:
                self.state.frames.discard(old)
                self.state.frames.add(new)
                flat += (old, new)
            self._append(MIGRATE, flat)

    def target(self, pages: int) -> None:
        if pages != self.state.target_pages:
            self.state.target_pages = pages
            self._append(TARGET, (pages,))

    def adopt(self, identity: tuple[int, int]) -> list[int]:
        """A frontend connected with guest RAM `identity`: return the frames
        to restore (the same guest, reconnecting) or start afresh (another)."""
        if identity == self.state.identity:
            return list(self.state.frames)
        self.state.identity = identity
        self.state.frames.clear()
        self._append(CLEAR, identity)
        return []

    def cleared(self) -> None:
        """The driver was reset: its balloon is empty."""
        if len(self.state.frames):
            self.state.frames.clear()
            self._append(CLEAR, self.state.identity or ())

    # ------------------------------------------------------------ compaction

    def compact(self) -> None:
        """Fold the log into a new snapshot; remove the old log."""
        runs: list[int] = []
        for pfn in self.state.frames:
            if runs and runs[-2] + runs[-1] == pfn:
                runs[-1] += 1
            else:
                runs += (pfn, 1)
        body = _u64s(runs)
        header: dict[str, Any] = {
            "format": FORMAT,
            "vm": self.vm,
            "generation": self.generation + 1,
            "identity": list(self.state.identity) if self.state.identity else None,
            "target_pages": self.state.target_pages,
            "frames": len(self.state.frames),
        }
        tmp = self.snap_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(header).encode() + b"\n" + body)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.snap_path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        old = self.log_path(self.generation)
        self.generation += 1
        if self._log_fd is not None:
            os.close(self._log_fd)
        self._snap_bytes = len(body)
        self._log_bytes = 0
        self._open_log()
        try:
            os.unlink(old)
        except OSError:
            pass

    def close(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
