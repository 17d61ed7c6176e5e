"""Hand-written mutants of the code that guards guest data, and a runner
that shows the suite kills each one.

A mutant is one exact text replacement in one product file: a bug of the
kind that would hurt a guest (a lost interrupt, a kick never asked for again,
a discard that outlives the guest's reuse of a page, a flipped bit in a ring
layout, a tracker that misjudges a frame) written down so that it can be put
back into the code on demand. The runner copies the tracked tree to a
scratch directory, applies one mutant there, runs the tests named for it and
expects them to fail. A mutant whose tests pass "survived": the suite would
not have noticed that bug.

Each replacement must match exactly once in today's code; when the code
changes under a mutant, `check_applies` says so (tests/mutation/test_mutants.py),
and the mutant is rewritten for the new code rather than dropped.

    python -m tests.mutation.mutants                # every mutant, a table and the kill rate
    python -m tests.mutation.mutants call-never-written kicks-never-rearmed
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Exit codes of pytest: 0 all passed, 1 some failed; anything else means the
#: mutant's run did not test anything (collection error, usage, no tests).
PYTEST_PASSED, PYTEST_FAILED = 0, 1

DAEMON_BALLOON = "tests/daemon/test_daemon_balloon.py"
DAEMON_QUEUES = "tests/daemon/test_daemon_queues.py"
DAEMON_RESTART = "tests/daemon/test_daemon_restart.py"
GOLDEN = "tests/unit/test_wire_golden.py"
SPLIT_MIGRATION = "tests/daemon/test_daemon_split_migration.py"
FUZZ_RINGS = "tests/unit/test_fuzz_rings.py"
# Selections name files, never a folder that holds one of them: pytest merges
# overlapping arguments and runs the folder in its own order, so the test
# meant to kill could come after an unrelated one (the sandboxed systemd test
# cannot run from a scratch copy at all).
RING_UNITS = (GOLDEN, "tests/unit/test_virtqueue.py", "tests/unit/test_frontend_rings.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository
    old: str  # exact text, found exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments (paths or node ids), in the order most likely to kill first
    why: str  # the bug it stands for

    def apply(self, root: Path) -> None:
        file = root / self.path
        text = file.read_text()
        check_applies(self, text)
        file.write_text(text.replace(self.old, self.new, 1))


class StaleMutant(Exception):
    """The code changed: the mutant's text is not found exactly once."""


def check_applies(mutant: Mutant, text: str) -> None:
    count = text.count(mutant.old)
    if count != 1:
        raise StaleMutant(f"{mutant.name}: the text to replace occurs {count} times in {mutant.path}")


MUTANTS: tuple[Mutant, ...] = (
    # ---- the engine's notifications
    Mutant(
        "call-never-written",
        "balloond/engine/vring.py",
        "            if not eventfd_signal(self.call_fd):\n",
        "            if True:  # mutant: the interrupt is never raised\n",
        (DAEMON_BALLOON,),
        "buffers are used but the guest is never interrupted",
    ),
    Mutant(
        "kicks-never-rearmed",
        "balloond/engine/polling.py",
        "        self._set_kicks(vring, True)\n        if self._ring_pending(vring):",
        "        pass  # mutant: kicks stay off after polling\n        if self._ring_pending(vring):",
        # The lost-kick look serves the unkicked buffers a second or two
        # late, so traffic tests pass, slowly; what tells is the order of
        # steps before sleeping, and the look counting a buffer the driver
        # did not kick because it was never asked to.
        ("tests/unit/test_engine_sleep.py",
         "tests/daemon/test_daemon_polling.py::test_a_buffer_left_waiting_without_a_kick_is_served_and_counted"),
        "after polling, the device never asks the guest to kick again",
    ),
    Mutant(
        "no-look-after-rearm",
        "balloond/engine/polling.py",
        "        self._set_kicks(vring, True)\n        if self._ring_pending(vring):",
        "        self._set_kicks(vring, True)\n        if False:  # mutant: the race window is not closed",
        # The window is a few instructions wide: the daemon tests hit it only
        # now and then, so the unit test of the engine's order of steps leads.
        ("tests/unit/test_engine_sleep.py", DAEMON_QUEUES, DAEMON_BALLOON),
        "a buffer added while kicks were off waits for a kick that never comes",
    ),
    # ---- discards and the guest's reuse of pages
    Mutant(
        "deferred-without-must-tell-host",
        "balloond/device/balloon.py",
        "        return vb.has(self.acked, Feature.MUST_TELL_HOST)\n",
        "        return True  # mutant: deferral whatever the driver negotiated\n",
        ("tests/unit/test_discard_inhibit.py", DAEMON_BALLOON),
        "a driver without MUST_TELL_HOST reuses a page whose discard is still pending",
    ),
    Mutant(
        "deflate-keeps-pending-discard",
        "balloond/device/balloon.py",
        "            self._pending.difference_update(pfns)\n",
        "            pass  # mutant: a deflate does not cancel the pending discard\n",
        ("tests/unit/test_discard_inhibit.py", DAEMON_BALLOON),
        "a deflated page the guest writes at once is discarded afterwards",
    ),
    Mutant(
        "departure-keeps-pending-discard",
        "balloond/device/balloon.py",
        '                left = record.old_pfn if kind in ("move", "depart") else ext.PFN_NONE\n',
        '                left = record.old_pfn if kind == "move" else ext.PFN_NONE  # mutant: departures not forgotten\n',
        (SPLIT_MIGRATION, "tests/unit/test_split_migration.py"),
        "a page that departed in a split migration, freed and reused by the guest, is discarded afterwards",
    ),
    Mutant(
        "departures-not-replayed",
        "balloond/device/journal.py",
        "                    if pfns[i] != NO_FRAME:\n",
        "                    if pfns[i] != NO_FRAME and kind == MIGRATE:  # mutant: split departures not replayed\n",
        ("tests/unit/test_split_migration.py", SPLIT_MIGRATION),
        "a restarted daemon restores, and discards again, frames that departed before it was killed",
    ),
    # ---- ring layouts (protocol/virtqueue.py)
    Mutant(
        "desc-next-bit-flipped",
        "protocol/virtqueue.py",
        "VRING_DESC_F_NEXT = 1\n",
        "VRING_DESC_F_NEXT = 3  # mutant: bit 1 flipped on\n",
        RING_UNITS,
        "chains are walked with the wrong NEXT flag",
    ),
    Mutant(
        "used-no-notify-bit-moved",
        "protocol/virtqueue.py",
        "VRING_USED_F_NO_NOTIFY = 1\n",
        "VRING_USED_F_NO_NOTIFY = 2  # mutant: the wrong bit\n",
        RING_UNITS,
        "the device suppresses kicks with a bit the driver does not read",
    ),
    Mutant(
        "need-event-off-by-one",
        "protocol/virtqueue.py",
        "    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF\n",
        "    return (new_idx - event_idx) & 0xFFFF < (new_idx - old_idx) & 0xFFFF  # mutant\n",
        RING_UNITS,
        "EVENT_IDX interrupts decided one entry off",
    ),
    Mutant(
        "avail-event-misplaced",
        "protocol/virtqueue.py",
        "            U16.pack_into(self.used, 4 + 8 * self.num, self.last_avail)\n",
        "            U16.pack_into(self.used, 2 + 8 * self.num, self.last_avail)  # mutant\n",
        (*RING_UNITS, DAEMON_QUEUES),
        "avail_event written two bytes early, into the last used element",
    ),
    # ---- the tracker (balloond/device/tracker.py)
    Mutant(
        "tracker-accepts-frame-past-ram",
        "balloond/device/tracker.py",
        "        if off >= r.count:\n            return None\n",
        "        if off > r.count:  # mutant: one frame past each range counts as RAM\n            return None\n",
        ("tests/unit/test_tracker.py", FUZZ_RINGS),
        "a frame just past guest RAM is accepted and discarded",
    ),
    Mutant(
        "tracker-fast-path-fills-wrong",
        "balloond/device/tracker.py",
        "                r.bits.fill(o, o + c, entering)\n",
        "                r.bits.fill(o, o + c, True)  # mutant: a fast-path deflate leaves the frames ballooned\n",
        ("tests/unit/test_tracker.py", FUZZ_RINGS),
        "deflated frames stay in the balloon and are discarded again later",
    ),
    Mutant(
        "tracker-migrate-keeps-old-frame",
        "balloond/device/tracker.py",
        "        ro.bits.clear(oo)\n",
        "        pass  # mutant: the old frame stays ballooned\n",
        ("tests/unit/test_tracker.py", FUZZ_RINGS),
        "after a compaction migration the page the guest now uses is still tracked as ballooned",
    ),
    # ---- the releaser (balloond/device/releaser.py)
    Mutant(
        "coalesce-last-run-one-long",
        "balloond/device/releaser.py",
        "    if first >= 0:\n        runs.append((first, prev - first + 1))\n    return runs\n",
        "    if first >= 0:\n        runs.append((first, prev - first + 2))  # mutant\n    return runs\n",
        ("tests/unit/test_releaser.py", "tests/unit/test_discard_inhibit.py", FUZZ_RINGS, DAEMON_BALLOON),
        "the page after the last ballooned run is discarded too",
    ),
    Mutant(
        "bridge-over-unballooned-gap",
        "balloond/device/releaser.py",
        "                    and ballooned(gap_start, first)\n",
        "                    and True  # mutant: bridges gaps the guest still uses\n",
        ("tests/unit/test_releaser.py", "tests/unit/test_discard_inhibit.py", FUZZ_RINGS, DAEMON_BALLOON),
        "frames between two inflated runs are discarded although the guest owns them",
    ),
    # ---- reset detection and reporting
    Mutant(
        "reset-never-detected",
        "balloond/device/balloon.py",
        "        return base != self._inflate_stop_base\n",
        "        return False  # mutant: a rebooted driver passes for the paused one\n",
        (DAEMON_BALLOON,),
        "a guest rebooted under the same QEMU keeps its old balloon: frames it uses are tracked as ballooned",
    ),
    Mutant(
        "reports-ignore-poison",
        "balloond/device/balloon.py",
        "        poisoned = vb.has(self.acked, Feature.PAGE_POISON) and (self.config.poison_val != 0 "
        "or not self._poison_known)\n",
        "        poisoned = False  # mutant: poisoned free pages are discarded\n",
        ("tests/daemon/test_daemon_stats.py", FUZZ_RINGS, DAEMON_BALLOON),
        "reported free pages are discarded although the guest relies on their poison pattern",
    ),
    # ---- the journal (balloond/device/journal.py)
    Mutant(
        "journal-rings-not-compared",
        "balloond/device/journal.py",
        "        if reason is None:\n            reason = self._rings_differ(rings)\n",
        "        if reason is None:\n            reason = None  # mutant: a reset driver passes for the old one\n",
        ("tests/unit/test_journal.py", DAEMON_RESTART),
        "a guest rebooted while the daemon was down gets its old balloon discarded under it",
    ),
    Mutant(
        "journal-identity-ignored",
        "balloond/device/journal.py",
        "            reason = state.identity.differs_from(identity)\n",
        "            reason = None  # mutant: any QEMU passes for the one that ballooned\n",
        ("tests/unit/test_journal.py", DAEMON_RESTART),
        "a new QEMU on the same RAM file gets the old balloon discarded under its guest",
    ),
    Mutant(
        "journal-short-write-ignored",
        "balloond/device/journal.py",
        "                n = os.write(self._log_fd, record[done:])\n"
        "                if n <= 0:\n"
        "                    raise OSError(errno.ENOSPC, \"write returned 0\")\n"
        "                done += n\n",
        "                os.write(self._log_fd, record[done:])\n"
        "                done = len(record)  # mutant: a short write counts as whole\n",
        ("tests/unit/test_journal.py", DAEMON_RESTART),
        "a torn record swallows the records after it: deflated pages discarded after a restart",
    ),
)
BY_NAME = {m.name: m for m in MUTANTS}


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    killed: bool
    returncode: int
    seconds: float
    detail: str  # the first failing test, or why the run tested nothing


def tracked_files(repo: Path = REPO) -> list[str]:
    """Tracked files, and new ones git does not ignore (work not yet committed)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=repo, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p]


def copy_tree(dest: Path, repo: Path = REPO, *, commit: str | None = None) -> None:
    """The working tree's files as they are now, edits included; or, with
    `commit`, the tree of that commit (a measurement not disturbed by work
    in progress)."""
    if commit is not None:
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=repo, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
        return
    for rel in tracked_files(repo):
        src = repo / rel
        if not src.is_file():
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def failing_nodeid(summary_line: str) -> str | None:
    """The node id of a short summary line `FAILED <id> - <message>`; ids
    of parametrized tests may hold spaces, messages follow ' - '."""
    for word in ("FAILED ", "ERROR "):
        if summary_line.startswith(word):
            return summary_line[len(word):].split(" - ", 1)[0].strip() or None
    return None


def check_selection(mutant: Mutant) -> None:
    for arg in mutant.tests:
        path = arg.split("::")[0]
        if (REPO / path).is_dir():
            raise ValueError(f"{mutant.name}: select test files, not the folder {path}")


def run_in_own_group(argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run pytest in a process group of its own, and end the whole group
    however the run ends: a run stopped at its timeout would otherwise
    leave the daemons its tests started running, beside every later test."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if proc.returncode is None:
            proc.communicate()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def run_mutant(mutant: Mutant, *, timeout: float = 900.0, python: str = sys.executable,
               commit: str | None = None) -> Outcome:
    check_selection(mutant)
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
        root = Path(tmp) / "tree"
        copy_tree(root, commit=commit)
        mutant.apply(root)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        # Skips stay skips here: a mutant is killed by a failing assertion,
        # not by the CI rule that turns a skip into a failure.
        env["CI"] = ""
        env["PYTHONPATH"] = str(root)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        where = subprocess.run([python, "-c", "import balloond, protocol; print(balloond.__file__, protocol.__file__)"],
                               cwd=root, env=env, capture_output=True, text=True)
        if str(root) not in where.stdout or where.stdout.count(str(root)) != 2:
            raise RuntimeError(f"the mutant's tree is not the one imported: {where.stdout or where.stderr}")
        argv = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--basetemp", str(Path(tmp) / "pt"),
                "-o", "addopts=--strict-markers", *mutant.tests]
        start = time.monotonic()
        try:
            proc = run_in_own_group(argv, cwd=root, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Outcome(mutant, False, -1, time.monotonic() - start, f"no verdict within {timeout:.0f}s")
        seconds = time.monotonic() - start
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == PYTEST_FAILED:
            failed = next((ln for ln in lines if ln.startswith(("FAILED", "ERROR"))), lines[-1] if lines else "")
            # A kill counts only if the test that failed passes without the
            # mutant: a test broken (or flaky) on its own kills nothing.
            nodeid = failing_nodeid(failed)
            if nodeid is not None:
                (root / mutant.path).write_text((root / mutant.path).read_text().replace(mutant.new, mutant.old, 1))
                check = subprocess.run([*argv[:-len(mutant.tests)], nodeid], cwd=root, env=env,
                                       capture_output=True, text=True, timeout=timeout)
                if check.returncode == PYTEST_FAILED:
                    return Outcome(mutant, False, proc.returncode, seconds,
                                   f"{nodeid} fails without the mutant too: no kill")
                if check.returncode != PYTEST_PASSED:
                    raise RuntimeError(f"{mutant.name}: could not re-run {nodeid!r} (pytest exited {check.returncode})")
            return Outcome(mutant, True, proc.returncode, seconds, failed)
        if proc.returncode == PYTEST_PASSED:
            return Outcome(mutant, False, proc.returncode, seconds, lines[-1] if lines else "")
        return Outcome(mutant, False, proc.returncode, seconds,
                       f"pytest exited {proc.returncode}: {' | '.join(lines[-3:]) or proc.stderr[-300:]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the hand-written mutants and print the kill rate.")
    p.add_argument("names", nargs="*", help="mutants to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--commit", metavar="REV", help="mutate the tree of this commit instead of the working tree")
    args = p.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34} {m.path:32} {m.why}")
        return 0
    unknown = [n for n in args.names if n not in BY_NAME]
    if unknown:
        print(f"mutants: unknown mutant(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    chosen = [BY_NAME[n] for n in args.names] or list(MUTANTS)
    killed = 0
    for m in chosen:
        try:
            o = run_mutant(m, commit=args.commit)
        except StaleMutant as exc:
            print(f"{'STALE':9} {m.name:34}         {exc}", flush=True)
            continue
        killed += o.killed
        verdict = "killed" if o.killed else "SURVIVED"
        print(f"{verdict:9} {m.name:34} {o.seconds:6.1f}s  {o.detail}", flush=True)
    print(f"kill rate: {killed}/{len(chosen)} ({100 * killed / len(chosen):.0f}%)")
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
