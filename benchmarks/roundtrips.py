"""Round trips: balloon-page migration under compaction, and time to target,
balloond against QEMU's built-in virtio-balloon, same guest, same run.

Linux's stock virtio_balloon waits for every buffer: each balloon page that
compaction moves is two synchronous round trips (inflate the new page on one
ring, deflate the old one on the other), each 256-PFN inflate or deflate
buffer one. Each round boots the same guest (512 MiB, Linux 6.1 by default,
stock driver, page_poison=1 so free page reporting does not race) once with
(A) balloond and once with (B) QEMU's `virtio-balloon-pci`, interleaved
A B A B, and on each:

  1. balloons 128 MiB of the idle guest;
  2. writes 300 files of 128 KiB into a tmpfs, deletes every other one, and
     writes 1 to /proc/sys/vm/compact_memory four times: the balloon pages
     moved (`balloon_migrate` in the guest's /proc/vmstat, which counts for
     both devices) per second of compaction;
  3. deflates, then times inflating to --target-mib and deflating back to 0
     (config `actual`: our API's actual_bytes, QEMU's query-balloon).

For balloond it also reads the daemon's CPU time over the whole run
(supervisor + the VM's worker, utime+stime from /proc/PID/stat), and in the
first round the CPU the daemon uses while the guest sits idle for
--idle-seconds after all that. The summary prints medians and the ratios
balloond/QEMU (migrations/s: higher is better; times: lower is better).

    python benchmarks/roundtrips.py [--rounds 2] [--kernel 6.1] [--idle-seconds 60]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import BuiltinBalloon, VhostUserBalloon, Vm  # noqa: E402
from harness.daemon import DaemonProcess  # noqa: E402

MIB = 1 << 20
TICK = os.sysconf("SC_CLK_TCK")
MEMORY_MIB = 512
BALLOON_MIB = 128
FRAGMENT = ("mkdir -p /mnt/frag && mount -t tmpfs tmpfs /mnt/frag && "
            "i=0; while [ $i -lt 300 ]; do dd if=/dev/zero of=/mnt/frag/f$i bs=128k count=1 2>/dev/null; "
            "i=$((i+1)); done; "
            "i=0; while [ $i -lt 300 ]; do rm /mnt/frag/f$i; i=$((i+2)); done; sync")


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def balloon_migrate(vm: Vm) -> int:
    m = re.search(r"^balloon_migrate (\d+)$", vm.sh("cat /proc/vmstat"), re.M)
    return int(m.group(1)) if m else 0


def compaction(vm: Vm, set_balloon: Callable[[int], None], reached: Callable[[int], bool]) -> dict[str, float]:
    """Steps 1 and 2: a 128 MiB balloon, fragmented memory, four compactions."""
    set_balloon(BALLOON_MIB * MIB)
    poll(lambda: reached(BALLOON_MIB * MIB), 600, "the 128 MiB balloon")
    vm.sh(FRAGMENT, timeout=600)
    before = balloon_migrate(vm)
    t0 = time.monotonic()
    for _ in range(4):
        vm.sh("echo 1 > /proc/sys/vm/compact_memory", timeout=600)
    seconds = time.monotonic() - t0
    migrations = balloon_migrate(vm) - before
    return {"migrations": migrations, "compact_s": seconds, "migrations_per_s": migrations / seconds}


def to_target(args: argparse.Namespace, set_balloon: Callable[[int], None],
              reached: Callable[[int], bool]) -> dict[str, float]:
    """Step 3: empty the balloon, then time inflating to the target and back."""
    set_balloon(0)
    poll(lambda: reached(0), 600, "the balloon to empty")
    target = args.target_mib * MIB
    t0 = time.monotonic()
    set_balloon(target)
    poll(lambda: reached(target), 600, "inflation")
    t_in = time.monotonic() - t0
    t0 = time.monotonic()
    set_balloon(0)
    poll(lambda: reached(0), 600, "deflation")
    return {"inflate_s": t_in, "deflate_s": time.monotonic() - t0}


def run_ours(args: argparse.Namespace, workdir: Path, idle: bool) -> dict[str, float]:
    daemon = DaemonProcess(workdir / "daemon", vms=("bench",),
                           extra_args=["--no-deflate-on-oom", *args.daemon_args], log_level="warning")
    daemon.start()
    try:
        with Vm(args.kernel, memory_mib=MEMORY_MIB, balloon=VhostUserBalloon(daemon.sockets["bench"]),
                load_balloon=True, cmdline=["page_poison=1"], log_dir=workdir / "ours", name="ours") as vm:
            poll(lambda: daemon.api.vm("bench")["running"], 120, "the device to start")
            worker = (daemon.api.vm("bench").get("worker") or {}).get("pid")
            pids = [daemon.pid] + ([worker] if worker else [])

            def cpu() -> float:
                return sum(cpu_seconds(p) for p in pids)

            def reached(nbytes: int) -> bool:
                v = daemon.api.vm("bench")
                return v["actual_bytes"] == nbytes and v["pending_discard_bytes"] == 0

            def set_balloon(nbytes: int) -> None:
                daemon.api.set_target("bench", nbytes)

            cpu0 = cpu()
            out = compaction(vm, set_balloon, reached)
            out["daemon_migrations"] = daemon.api.vm("bench")["migrations"]
            out.update(to_target(args, set_balloon, reached))
            out["cpu_s"] = cpu() - cpu0
            if idle:
                time.sleep(2)  # let the last buffers and discards settle
                c0, t0 = cpu(), time.monotonic()
                time.sleep(args.idle_seconds)
                out["idle_pct"] = 100 * (cpu() - c0) / (time.monotonic() - t0)
            return out
    finally:
        daemon.stop()


def run_qemu(args: argparse.Namespace, workdir: Path, idle: bool) -> dict[str, float]:
    with Vm(args.kernel, memory_mib=MEMORY_MIB, balloon=BuiltinBalloon(), load_balloon=True,
            cmdline=["page_poison=1"], log_dir=workdir / "qemu", name="qemu") as vm:
        ram = MEMORY_MIB * MIB
        poll(lambda: vm.qmp("query-balloon")["actual"] == ram, 120, "the balloon driver")

        def set_balloon(nbytes: int) -> None:
            vm.qmp("balloon", value=ram - nbytes)

        def reached(nbytes: int) -> bool:
            return vm.qmp("query-balloon")["actual"] == ram - nbytes

        out = compaction(vm, set_balloon, reached)
        out.update(to_target(args, set_balloon, reached))
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kernel", default="6.1")
    p.add_argument("--target-mib", type=int, default=256)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--daemon-arg", dest="daemon_args", action="append", default=[],
                   help="extra balloond argument (repeatable), e.g. --daemon-arg=--poll-us=0")
    args = p.parse_args()
    if not 0 < args.target_mib < MEMORY_MIB:
        p.error(f"--target-mib must be between 0 and {MEMORY_MIB}")

    ours: list[dict[str, float]] = []
    qemu: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bd-rt-") as tmp:
        for i in range(args.rounds):
            for name, fn, out in (("balloond", run_ours, ours), ("qemu", run_qemu, qemu)):
                r = fn(args, Path(tmp) / f"r{i}", idle=i == 0)
                out.append(r)
                extra = ""
                if "cpu_s" in r:
                    extra = f"  daemon counted {r['daemon_migrations']}  daemon CPU {r['cpu_s']:6.2f}s"
                    if "idle_pct" in r:
                        extra += f"  idle CPU {r['idle_pct']:.3f}%"
                print(f"round {i + 1}/{args.rounds} {name:8}: {r['migrations']:6d} migrations in "
                      f"{r['compact_s']:6.2f}s = {r['migrations_per_s']:7.0f}/s  inflate {r['inflate_s']:6.2f}s  "
                      f"deflate {r['deflate_s']:6.2f}s{extra}", flush=True)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"\nstock virtio_balloon, {MEMORY_MIB} MiB Linux {args.kernel} guest (TCG), "
          f"medians of {args.rounds} rounds")
    print(f"{'':30}{'balloond':>12}{'QEMU':>12}{'balloond/QEMU':>15}")
    for key, label, fmt in (("migrations_per_s", "migrations/s (compaction)", "{:12.0f}"),
                            ("migrations", "balloon pages migrated", "{:12.0f}"),
                            ("inflate_s", f"inflate to {args.target_mib} MiB (s)", "{:12.2f}"),
                            ("deflate_s", f"deflate from {args.target_mib} MiB (s)", "{:12.2f}")):
        a, b = med(ours, key), med(qemu, key)
        ratio = a / b if b else float("inf")
        print(f"{label:30}" + fmt.format(a) + fmt.format(b) + f"{ratio:15.2f}")
    print(f"daemon CPU per run (supervisor + worker): {med(ours, 'cpu_s'):.2f}s")
    idle = [r["idle_pct"] for r in ours if "idle_pct" in r]
    if idle:
        print(f"daemon CPU serving an idle guest for {args.idle_seconds:g}s: {idle[0]:.3f}% of a core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
