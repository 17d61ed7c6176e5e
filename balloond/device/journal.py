"""BalloonJournal: a VM's balloon on disk, so a restarted daemon finds it again.

What must survive a daemon crash is what the guest believes: which frames it
gave to the balloon, the target the operator set, and what the driver wrote
only once (poison_val, at probe). The journal keeps

  <vm>.snap      a snapshot: header line (JSON, with a checksum of the body)
                 + the ballooned runs, written whole with write, fsync,
                 rename — never half there;
  <vm>.log.<N>   every change since snapshot N, appended one record per batch
                 of buffers (not per page), before those buffers are returned
                 to the guest.

Each log record carries its kind, its length and a CRC32, so a record torn by
a crash, a short write or a corrupt block is recognised: replay stops at the
first bad record (one log line) and the file is cut back there, so that
nothing is ever appended behind garbage. A short write is completed; a write
that fails (ENOSPC, EFBIG, EIO) turns persistence off for the VM (one warning,
`write_errors`), and the balloon keeps working in memory: the guest is never
kept waiting for a disk.

Replaying a prefix of the history is safe because restoring is not decided
here but by the device (see `adopt`): each batch also records the index its
ring reached, and the restored frames are used only when the same driver
instance comes back — the same QEMU process (pid and start time, same host
boot), the same guest RAM files and layout, the same features, and every
ring resuming exactly where the journal says. A journal that lags behind the
ring (a lost record, persistence turned off) does not match and is dropped:
dropping forgets frames (their memory stays as it is); restoring wrongly
would discard pages a guest is using.

Appends are not fsynced: a killed daemon loses nothing the kernel already
has, and a host crash takes the guest down with it (and the new boot id
makes its journal unusable anyway). When the log outgrows the snapshot it is
folded into a new snapshot (generation N+1) and the old log is removed, so
the cost stays bounded by the balloon's size, not by its history.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import struct
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog

from .tracker import FrameBitmap, runs_of

#: kind, payload length in bytes, CRC32 of kind + length + payload.
RECORD = struct.Struct("<BII")
INFLATE, DEFLATE, MIGRATE, CLEAR, TARGET = b"I"[0], b"D"[0], b"M"[0], b"C"[0], b"T"[0]
#: A migrate batch holding split migrations: (old, new) pairs as MIGRATE's,
#: where NO_FRAME stands for the half a departure or an arrival lacks. Its own
#: kind, so a daemon that predates it stops replaying there (its journal then
#: lags behind the rings and is dropped) rather than adopt a marker as a frame.
SPLIT_MIGRATE = b"S"[0]
NO_FRAME = 0xFFFF_FFFF_FFFF_FFFF
IDENTITY, POISON = b"G"[0], b"P"[0]
#: A record longer than this is garbage, not a batch (a batch is at most a
#: queue of 4 KiB buffers; an identity a few hundred bytes).
MAX_PAYLOAD = 16 << 20
FORMAT = 2


class JournalError(Exception):
    """The state directory cannot be used; the message says why."""


class FrameSet:
    """A sparse set of frame numbers: one bit per frame in the tracker's
    `FrameBitmap`, chunks allocated on first use (32 KiB per GiB ballooned,
    like the tracker). Every batch the device journals passes through
    `update` or `difference_update`, and a driver's buffers are nearly
    always a run or a few (`runs_of`): those are set or cleared a byte at a
    time, counted at C speed, not frame by frame. So are the runs of a
    snapshot (`add_run`)."""

    #: The frame numbers a set holds: every 4 KiB frame of a 64-bit space.
    #: Others (only a corrupt or hostile record has them) are left out:
    #: leaving a frame out of the balloon forgets it, which is always safe.
    SPACE = 1 << 52

    def __init__(self) -> None:
        self._bits = FrameBitmap(self.SPACE)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __contains__(self, pfn: int) -> bool:
        return 0 <= pfn < self.SPACE and self._bits.get(pfn)

    def add(self, pfn: int) -> None:
        if 0 <= pfn < self.SPACE and not self._bits.get(pfn):
            self._bits.set(pfn)
            self.count += 1

    def discard(self, pfn: int) -> None:
        if 0 <= pfn < self.SPACE and self._bits.get(pfn):
            self._bits.clear(pfn)
            self.count -= 1

    def add_run(self, first: int, count: int) -> None:
        first, end = max(0, first), min(self.SPACE, first + count)
        if first < end:
            self._fill(first, end - first, True)

    def _runs(self, pfns: list[int]) -> list[tuple[int, int]] | None:
        runs = runs_of(pfns)
        if runs is None or runs[0][0] < 0 or runs[-1][0] + runs[-1][1] > self.SPACE:
            return None
        return runs

    def _fill(self, first: int, count: int, value: bool) -> None:
        end = first + count
        present = self._bits.count_set(first, end)
        self._bits.fill(first, end, value)
        self.count += count - present if value else -present

    def update(self, pfns: Iterable[int]) -> None:
        pfns = list(pfns)
        runs = self._runs(pfns)
        if runs is None:
            for pfn in pfns:
                self.add(pfn)
            return
        for first, count in runs:
            self._fill(first, count, True)

    def difference_update(self, pfns: Iterable[int]) -> None:
        pfns = list(pfns)
        runs = self._runs(pfns)
        if runs is None:
            for pfn in pfns:
                self.discard(pfn)
            return
        for first, count in runs:
            self._fill(first, count, False)

    def clear(self) -> None:
        self._bits = FrameBitmap(self.SPACE)
        self.count = 0

    def __iter__(self) -> Iterator[int]:
        return self._bits.iter_set()


@dataclass(frozen=True)
class GuestIdentity:
    """What tells one driver instance from every other: the QEMU process
    (pid + its start time, on this boot of the host), the files and layout
    of guest RAM, and the features the driver negotiated. Two connections
    with equal identities may be the same guest; different ones never are."""

    peer_pid: int
    peer_start: int  # /proc/PID/stat field 22, clock ticks since host boot
    boot_id: str
    features: int
    #: (gpa, size, st_dev, st_ino, file offset) of every RAM region, sorted.
    layout: tuple[tuple[int, int, int, int, int], ...]

    def as_json(self) -> dict[str, Any]:
        return {
            "peer": [self.peer_pid, self.peer_start],
            "boot_id": self.boot_id,
            "features": self.features,
            "layout": [list(r) for r in self.layout],
        }

    @classmethod
    def from_json(cls, data: Any) -> GuestIdentity | None:
        try:
            pid, start = data["peer"]
            return cls(
                int(pid), int(start), str(data["boot_id"]), int(data["features"]),
                tuple(tuple(int(x) for x in r) for r in data["layout"]),  # type: ignore[misc]
            )
        except (TypeError, KeyError, ValueError):
            return None

    def differs_from(self, other: GuestIdentity) -> str | None:
        """Why `other` is not this guest (None: it may be)."""
        if (self.boot_id, self.peer_pid, self.peer_start) != (other.boot_id, other.peer_pid, other.peer_start):
            return "another QEMU process"
        if self.layout != other.layout:
            return "another guest RAM file or layout"
        if self.features != other.features:
            return "other negotiated features"
        return None


@dataclass
class BalloonState:
    identity: GuestIdentity | None = None
    target_pages: int = 0
    frames: FrameSet = field(default_factory=FrameSet)
    #: Per ring role, the ring index after its last recorded batch.
    rings: dict[str, int] = field(default_factory=dict)
    #: (role, index before) of the very last batch recorded: the one batch
    #: that may not have been returned to the guest when the daemon died.
    last_batch: tuple[str, int] | None = None
    #: The driver's poison_val (None: never seen).
    poison: int | None = None


@dataclass(frozen=True)
class Adoption:
    """What `adopt` decided: the frames to restore (empty: start afresh),
    why the journal was dropped (None: it was not, or it held nothing), and
    the driver's poison_val when the journal knows it."""

    frames: list[int]
    dropped: str | None
    poison: int | None
    #: The same driver instance: its balloon (maybe empty) and poison_val carry on.
    adopted: bool = False


def _u64s(values: Iterable[int]) -> bytes:
    data = array.array("Q", values)
    if sys.byteorder != "little":
        data.byteswap()
    return data.tobytes()


def _values(payload: bytes) -> array.array:
    values = array.array("Q", payload[: len(payload) - len(payload) % 8])
    if sys.byteorder != "little":
        values.byteswap()
    return values


def check_state_dir(directory: str) -> None:
    """Make the state directory (0700) and check it can be written, or raise
    JournalError with one line. Also called by a supervisor at start, whose
    workers open the journals themselves, so a bad directory fails at once."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise JournalError(f"state directory {directory}: {exc.strerror}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise JournalError(f"state directory {directory} is not writable")


class JournalLock:
    """`<vm>.lock` in the state directory, held (flock, exclusive) by the one
    process that may read or write the VM's journal.

    A worker outlives a killed supervisor by the milliseconds its
    PR_SET_PDEATHSIG takes, and the next daemon's worker for the same VM may
    start in that time: without the lock both would replay, append and
    compact the same files. The kernel drops a flock when its holder exits,
    however it ends, so a lock is never left behind. The holder writes its
    pid into the file, for the log line of the process that waits.
    """

    def __init__(self, directory: str, vm: str) -> None:
        self.path = os.path.join(directory, f"{vm}.lock")
        self.held = False
        check_state_dir(directory)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(f"state lock {self.path}: {exc.strerror}") from None

    def try_acquire(self) -> bool:
        """Take the lock if no other process has it; never waits."""
        if self.held:
            return True
        assert self._fd is not None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise JournalError(f"state lock {self.path}: {exc.strerror}") from None
        self.held = True
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for a log line
        return True

    def holder(self) -> int | None:
        """The pid the holder wrote (it may have ended since), or None."""
        try:
            with open(self.path, "rb") as f:
                return int(f.read(32).strip() or b"0") or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None
        self.held = False


def pack_record(kind: int, payload: bytes) -> bytes:
    """One log record: header (kind, length, CRC32) + payload."""
    head = struct.pack("<BI", kind, len(payload))
    return head + struct.pack("<I", zlib.crc32(payload, zlib.crc32(head))) + payload


class BalloonJournal:
    """`lock`: a held JournalLock, given by a worker (which waited for it
    before it read anything); closed with the journal."""

    def __init__(self, directory: str, vm: str, *, compact_min_bytes: int = 1 << 20, log: Any = None,
                 lock: JournalLock | None = None) -> None:
        if lock is not None and not lock.held:
            raise JournalError(f"state lock {lock.path} is not held")
        self.lock = lock
        self.directory = directory
        self.vm = vm
        self.compact_min_bytes = compact_min_bytes
        self.log = log or structlog.get_logger().bind(vm=vm)
        self.state = BalloonState()
        self.generation = 0
        #: Writes that failed; after the first, nothing more is written.
        self.write_errors = 0
        self.persisting = True
        self._log_fd: int | None = None
        self._log_bytes = 0
        self._snap_bytes = 0
        check_state_dir(directory)
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
            self._load_snapshot()
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # This VM starts empty (dropping forgets frames, it never zeroes
            # a page); the others are not concerned. The bad file is kept
            # aside for a post-mortem and no longer in the way.
            self.log.error("state snapshot unusable: this VM starts with an empty balloon",
                           path=self.snap_path, reason=str(exc))
            self.state = BalloonState()
            self._snap_bytes = 0
            try:
                os.replace(self.snap_path, self.snap_path + ".bad")
            except OSError:
                pass
            # Its log continues a history we no longer have.
            for name in os.listdir(self.directory):
                if name.startswith(f"{self.vm}.log."):
                    try:
                        os.unlink(os.path.join(self.directory, name))
                    except OSError:
                        pass
            self.generation = 0
            return
        self._replay(self.log_path(self.generation))

    def _load_snapshot(self) -> None:
        with open(self.snap_path, "rb") as f:
            line = f.readline()
            body = f.read()
        if not line.endswith(b"\n"):
            raise ValueError("truncated header")
        header = json.loads(line)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        if header.get("format") != FORMAT:
            raise ValueError(f"unknown format {header.get('format')!r}")
        if len(body) != int(header["body_bytes"]) or zlib.crc32(body) != int(header["body_crc32"]):
            raise ValueError("body truncated or corrupt (length or checksum differs)")
        state = BalloonState()
        state.identity = GuestIdentity.from_json(header["identity"]) if header.get("identity") else None
        state.target_pages = int(header.get("target_pages", 0))
        state.rings = {str(k): int(v) for k, v in dict(header.get("rings") or {}).items()}
        poison = header.get("poison")
        state.poison = None if poison is None else int(poison)
        runs = _values(body)
        for i in range(0, len(runs) - 1, 2):
            state.frames.add_run(runs[i], runs[i + 1])
        self.generation = int(header["generation"])
        self.state = state
        self._snap_bytes = len(body)

    def _replay(self, path: str) -> None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as exc:
            self.log.error("state log unreadable: replay stops at the snapshot", path=path, reason=exc.strerror)
            data = b""
        pos = 0
        bad: str | None = None
        while pos < len(data):
            if pos + RECORD.size > len(data):
                bad = "torn record header"
                break
            kind, length, crc = RECORD.unpack_from(data, pos)
            end = pos + RECORD.size + length
            if length > MAX_PAYLOAD or end > len(data):
                bad = "torn or oversized record"
                break
            payload = data[pos + RECORD.size : end]
            if zlib.crc32(payload, zlib.crc32(data[pos : pos + 5])) != crc:
                bad = "checksum mismatch"
                break
            if not self._apply(kind, payload):
                bad = f"unknown record kind {kind}"
                break
            pos = end
        if bad is not None:
            # Everything after the first bad record is unreachable: cut it off,
            # or new records appended behind it would be lost at the next replay.
            self.log.warning("state log: replay stopped at a bad record", path=path, offset=pos,
                             reason=bad, dropped_bytes=len(data) - pos)
            try:
                with open(path, "r+b") as f:
                    f.truncate(pos)
            except OSError:
                pass
        self._log_bytes = pos

    def _apply(self, kind: int, payload: bytes) -> bool:
        """One record's effect on the state; False for a kind we do not know."""
        state = self.state
        if kind in (INFLATE, DEFLATE, MIGRATE, SPLIT_MIGRATE):
            values = _values(payload)
            if not values:
                return False
            role = {INFLATE: "inflate", DEFLATE: "deflate", MIGRATE: "migrate", SPLIT_MIGRATE: "migrate"}[kind]
            self._moved(role, values[0])
            pfns = values[1:]
            if kind == INFLATE:
                state.frames.update(pfns)
            elif kind == DEFLATE:
                state.frames.difference_update(pfns)
            else:
                for i in range(0, len(pfns) - 1, 2):
                    if pfns[i] != NO_FRAME:
                        state.frames.discard(pfns[i])
                    if pfns[i + 1] != NO_FRAME:
                        state.frames.add(pfns[i + 1])
        elif kind == CLEAR:
            state.frames.clear()
            state.last_batch = None
        elif kind == TARGET and len(payload) == 8:
            state.target_pages = _values(payload)[0]
        elif kind == POISON and len(payload) == 8:
            state.poison = _values(payload)[0]
        elif kind == IDENTITY:
            try:
                data = json.loads(payload)
                identity = GuestIdentity.from_json(data["identity"])
                rings = {str(k): int(v) for k, v in dict(data["rings"]).items()}
            except (ValueError, KeyError, TypeError):
                return False
            if identity is None:
                return False
            if identity != state.identity:
                state.poison = None  # another driver: it writes its own
            state.identity, state.rings, state.last_batch = identity, rings, None
        else:
            return False
        return True

    def _moved(self, role: str, index: int) -> None:
        self.state.last_batch = (role, self.state.rings.get(role, 0))
        self.state.rings[role] = index

    def _open_log(self) -> None:
        try:
            self._log_fd = os.open(self.log_path(self.generation), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot open {self.log_path(self.generation)}: {exc.strerror}") from None

    # ------------------------------------------------------------ recording

    def _append(self, kind: int, payload: bytes) -> None:
        """Append one record whole, or turn persistence off (never raises:
        the guest's buffer must be returned whatever the disk says)."""
        if self._log_fd is None:
            return
        record = pack_record(kind, payload)
        try:
            done = 0
            while done < len(record):
                n = os.write(self._log_fd, record[done:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, "write returned 0")
                done += n
        except OSError as exc:
            self._fail(exc, cut_back=True)
            return
        self._log_bytes += len(record)
        if self._log_bytes > max(self.compact_min_bytes, 2 * self._snap_bytes):
            try:
                self.compact()
            except (OSError, JournalError) as exc:
                self._fail(exc if isinstance(exc, OSError) else OSError(errno.EIO, str(exc)), cut_back=False)

    def _fail(self, exc: OSError, *, cut_back: bool) -> None:
        """A write failed: stop persisting this VM. The files left behind lag
        behind the rings, so they can never be adopted (see the module
        docstring); they are removed all the same where the disk lets us."""
        self.write_errors += 1
        if cut_back and self._log_fd is not None:
            try:
                os.ftruncate(self._log_fd, self._log_bytes)  # no half record behind the good ones
            except OSError:
                pass
        self.close()
        self.persisting = False
        for path in (self.log_path(self.generation), self.snap_path, self.snap_path + ".tmp"):
            try:
                os.unlink(path)
            except OSError:
                pass
        self.log.warning("state directory write failed: this VM's balloon is no longer persisted",
                         reason=os.strerror(exc.errno) if exc.errno else str(exc))

    def _batch(self, kind: int, role: str, index: int, values: list[int]) -> None:
        if not values and self.state.rings.get(role) == index:
            return
        self._moved(role, index)
        self._append(kind, _u64s([index, *values]))

    def inflated(self, pfns: list[int], ring_index: int) -> None:
        """A batch of inflate buffers, the ring at `ring_index` after it."""
        self.state.frames.update(pfns)
        self._batch(INFLATE, "inflate", ring_index, pfns)

    def deflated(self, pfns: list[int], ring_index: int) -> None:
        self.state.frames.difference_update(pfns)
        self._batch(DEFLATE, "deflate", ring_index, pfns)

    def migrated(self, pairs: list[tuple[int, int]], ring_index: int) -> None:
        """A batch of migrate buffers: (old, new) moves in order, NO_FRAME
        for the missing half of a departure (old, NO_FRAME) or an arrival
        (NO_FRAME, new)."""
        flat: list[int] = []
        split = False
        for old, new in pairs:
            if old != NO_FRAME:
                self.state.frames.discard(old)
            else:
                split = True
            if new != NO_FRAME:
                self.state.frames.add(new)
            else:
                split = True
            flat += (old, new)
        self._batch(SPLIT_MIGRATE if split else MIGRATE, "migrate", ring_index, flat)

    def target(self, pages: int) -> None:
        if pages != self.state.target_pages:
            self.state.target_pages = pages
            self._append(TARGET, _u64s((pages,)))

    def poison(self, value: int) -> None:
        """The driver wrote poison_val (it does so once, at probe)."""
        if value != self.state.poison:
            self.state.poison = value
            self._append(POISON, _u64s((value,)))

    def _record_identity(self, identity: GuestIdentity, rings: dict[str, int]) -> None:
        if identity != self.state.identity:
            self.state.poison = None
        self.state.identity, self.state.rings, self.state.last_batch = identity, dict(rings), None
        self._append(IDENTITY, json.dumps({"identity": identity.as_json(), "rings": rings}).encode())

    def adopt(self, identity: GuestIdentity | None, rings: dict[str, int]) -> Adoption:
        """A driver started, its rings at `rings` (role → avail index):
        return the frames to restore if it is the very driver instance the
        journal describes, else start afresh (and say why, if that drops
        frames). `identity` None (unknown peer) never matches."""
        state = self.state
        reason: str | None = None
        if state.identity is None or identity is None:
            reason = "the guest's identity is unknown"
        else:
            reason = state.identity.differs_from(identity)
        if reason is None:
            reason = self._rings_differ(rings)
        if reason is None:
            frames = list(state.frames)
            self._record_identity(identity, rings)  # type: ignore[arg-type]
            return Adoption(frames, None, state.poison, adopted=True)
        had = len(state.frames)
        state.frames.clear()
        self._append(CLEAR, b"")
        state.poison = None
        if identity is not None:
            self._record_identity(identity, rings)
        else:
            state.identity, state.rings, state.last_batch = None, dict(rings), None
        return Adoption([], reason if had else None, None)

    def _rings_differ(self, rings: dict[str, int]) -> str | None:
        recorded = self.state.rings
        if set(recorded) - set(rings):
            return "a ring of the journal is not running"
        last = self.state.last_batch
        for role, index in rings.items():
            want = recorded.get(role, 0)
            if index == want:
                continue
            if last is not None and last[0] == role and index == last[1]:
                continue  # the last batch was recorded but not returned: it comes again
            return f"the {role} ring is at {index}, the journal at {want} (a reset or another driver)"
        return None

    def started(self, identity: GuestIdentity | None, rings: dict[str, int]) -> None:
        """The adopted driver started again (resume, new features after a
        reset, memory hotplug): keep what identifies it up to date."""
        if identity is None:
            return
        if identity != self.state.identity or rings != self.state.rings:
            self._record_identity(identity, rings)

    def cleared(self) -> None:
        """The driver was reset: its balloon is empty."""
        if len(self.state.frames):
            self.state.frames.clear()
            self._append(CLEAR, b"")

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
        state = self.state
        header: dict[str, Any] = {
            "format": FORMAT,
            "vm": self.vm,
            "generation": self.generation + 1,
            "identity": state.identity.as_json() if state.identity else None,
            "rings": state.rings,
            "poison": state.poison,
            "target_pages": state.target_pages,
            "frames": len(state.frames),
            "body_bytes": len(body),
            "body_crc32": zlib.crc32(body),
        }
        data = json.dumps(header).encode() + b"\n" + body
        tmp = self.snap_path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            done = 0
            while done < len(data):
                n = os.write(fd, data[done:])
                if n <= 0:
                    raise OSError(errno.ENOSPC, "write returned 0")
                done += n
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
            self._log_fd = None
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
        if self.lock is not None:
            self.lock.release()


@dataclass(frozen=True)
class PeerProcess:
    """The frontend process at the other end of a vhost-user socket: its pid
    and start time (a reused pid has another start time) on this host boot."""

    pid: int
    start: int
    boot_id: str

    @classmethod
    def of_socket(cls, sock: Any) -> PeerProcess | None:
        """SO_PEERCRED of a connected Unix socket, or None if not knowable
        (then no journal is ever restored for that connection)."""
        import socket as _socket

        try:
            pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12))
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot_id = f.read().strip()
            # Field 22 (starttime); the name in field 2 may hold spaces and ')'.
            start = int(stat[stat.rindex(b")") + 2 :].split()[19])
        except (OSError, ValueError, IndexError, struct.error):
            return None
        if pid <= 0:
            return None
        return cls(pid, start, boot_id)
