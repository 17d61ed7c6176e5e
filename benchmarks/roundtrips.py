"""Round trips: balloon-page migration under compaction, and time to target,
balloond against QEMU's built-in virtio-balloon, same guest, same run.

Linux's stock virtio_balloon waits for every buffer: each balloon page that
compaction moves is two synchronous round trips (inflate the new page on one
ring, deflate the old one on the other), each 256-PFN inflate or deflate
buffer one. Each round boots the same guest (512 MiB, Linux 6.1 by default;
balloond offering only what the built-in device offers by default, and the
guest booted as `same_work` says) with (A) balloond and
the stock driver, (C) balloond and our driver (guest-driver/, loaded with
its migrate extension and split migrations: a compaction batch's departing
pages in one buffer, their destinations told later, many per buffer; and
with the extension, inflate and deflate buffers of 1024 PFNs; left
out with --no-our-driver) and (B) QEMU's `virtio-balloon-pci` with the stock
driver, interleaved A C B A C B, and on each:

  1. balloons 128 MiB of the idle guest;
  2. writes 300 files of 128 KiB into a tmpfs, deletes every other one, and
     writes 1 to /proc/sys/vm/compact_memory four times (one guest command):
     the balloon pages moved (`balloon_migrate` in the guest's /proc/vmstat,
     which counts for both devices) per second of compaction, timed on the
     host (the command's round trip to the guest included) and by the
     guest's clock (the compactions alone);
  3. deflates, then times inflating to --target-mib and deflating back to 0,
     --to-target-repeats times (config `actual`: our API's actual_bytes
     from the daemon's last report, QEMU's query-balloon, read every
     20 ms); each round's line shows every change, the summary's times are
     medians over every change timed.
  4. with the stock driver (either device), inflates and deflates once
     more, not timed, with the guest kernel's function-graph tracer on the
     driver's work item (one buffer and the write of `actual` after it),
     leak_balloon and tell_host (benchmarks/guest_trace.py): per buffer,
     the guest's whole call and its wait for the device inside it, as the
     guest sees them (left out, with the reason, where the guest's kernel
     cannot trace them).

For balloond it also reads the daemon's CPU time over the whole run
(supervisor + the VM's worker, utime+stime from /proc/PID/stat), and in the
first round the CPU the daemon uses while the guest sits idle for
--idle-seconds after all that; QEMU's own CPU over that idle time is
printed too, with the built-in balloon's QEMU idle as long for reference
(the vCPU's halt polling, qemu-patches/0006, must cost an idle guest
nothing). The summary prints medians and the ratios
balloond/QEMU (migrations/s: higher is better; times: lower is better).

For our driver it also prints the guest's own counts: pages it moved, and
records sent with the extension.

With --ab-split another variant (W, "whole") runs our driver with
migrate_split=0: one whole record per moved page, each waited for (the
driver before split migrations), for an A/B of the two in the same run.

With --ab-config-cache a fourth variant (D, "nocache") runs balloond and the
stock driver with QEMU's config-cache=off (same QEMU binary): every config
read of the guest is then a GET_CONFIG round trip to the daemon, as without
qemu-patches/0002. For balloond the config reads the daemon answered
(GET_CONFIG) are printed per run.

    python benchmarks/roundtrips.py [--rounds 2] [--kernel 6.1] [--idle-seconds 60] [--no-our-driver]
                                    [--to-target-repeats 3] [--ab-config-cache] [--ab-split]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import BuiltinBalloon, VhostUserBalloon, Vm, find_kernel  # noqa: E402
from benchmarks import polling  # noqa: E402
from benchmarks.guest_trace import DriverCalls, TraceUnavailable, trace_guest  # noqa: E402
from benchmarks.same_work import BALLOOND_ARGS, GUEST_CMDLINE, balloond_at  # noqa: E402
from harness.daemon import DaemonProcess  # noqa: E402
from harness.qemu import find_qemu  # noqa: E402
from harness.vm import default_halt_poll_ns  # noqa: E402

MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")
MEMORY_MIB = 512
BALLOON_MIB = 128
FRAGMENT = ("mkdir -p /mnt/frag && mount -t tmpfs tmpfs /mnt/frag && "
            "i=0; while [ $i -lt 300 ]; do dd if=/dev/zero of=/mnt/frag/f$i bs=128k count=1 2>/dev/null; "
            "i=$((i+1)); done; "
            "i=0; while [ $i -lt 300 ]; do rm /mnt/frag/f$i; i=$((i+2)); done; sync")


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Looks every 20 ms: the times to target here are a few tenths of a second."""
    return polling.poll(predicate, timeout, what, interval=0.02)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def idle_cpu_pct(seconds: float, *cpu_readers: Callable[[], float]) -> list[float]:
    """Let the last buffers and discards settle, then the share of a core
    each reader's CPU seconds grew by over `seconds` of an idle guest."""
    time.sleep(2)
    before, t0 = [read() for read in cpu_readers], time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return [100 * (read() - b) / elapsed for read, b in zip(cpu_readers, before)]


def qemu_halt_poll() -> str:
    """The vCPUs' halt polling the guests ran with (harness.vm)."""
    if not find_qemu().tcg_halt_poll:
        return "off (QEMU without qemu-patches/0006)"
    ns = default_halt_poll_ns()
    return f"halt-poll-ns={ns}" if ns else "off"


def balloon_migrate(vm: Vm) -> int:
    m = re.search(r"^balloon_migrate (\d+)$", vm.sh("cat /proc/vmstat"), re.M)
    return int(m.group(1)) if m else 0


def compaction(vm: Vm, set_balloon: Callable[[int], None], reached: Callable[[int], bool]) -> dict[str, Any]:
    """Steps 1 and 2: a 128 MiB balloon, fragmented memory, four compactions."""
    set_balloon(BALLOON_MIB * MIB)
    poll(lambda: reached(BALLOON_MIB * MIB), 600, "the 128 MiB balloon")
    vm.sh(FRAGMENT, timeout=600)
    before = balloon_migrate(vm)
    # One guest command for the four compactions, timed on the host and in
    # the guest: the host's figure also holds the command's round trip to
    # the guest (tens of ms under TCG, the same for every variant, which
    # flattens the ratios); the guest's is the compactions alone.
    t0 = time.monotonic()
    # /proc/uptime: 10 ms resolution, as the guest's date has no %N
    words = vm.sh("cat /proc/uptime; for i in 1 2 3 4; do echo 1 > /proc/sys/vm/compact_memory; done; "
                  "cat /proc/uptime", timeout=600).split()
    start, end = float(words[-4]), float(words[-2])
    seconds = time.monotonic() - t0
    migrations = balloon_migrate(vm) - before
    guest_s = max(end - start, 0.01)
    return {"migrations": migrations, "compact_s": seconds, "migrations_per_s": migrations / seconds,
            "guest_compact_s": guest_s, "guest_migrations_per_s": migrations / guest_s}


def guest_view(calls: DriverCalls) -> str:
    """One round's traced change as the guest saw it: medians per buffer (µs)."""
    def us(name: str) -> str:
        value = calls.median(name)
        return "-" if value is None else f"{value:.0f}"
    return (f"guest per buffer: inflate {us('inflate')} µs (waiting {us('inflate_waits')}), "
            f"deflate {us('deflate')} µs (waiting {us('deflate_waits')})")


def each_change(seconds: list[float]) -> str:
    """Every change of a round, in order: a single deflate takes one of two
    quite different times on either device, and a median of nine hides
    which mode a run was in."""
    return " ".join(f"{x:.2f}" for x in seconds)


def to_target(args: argparse.Namespace, set_balloon: Callable[[int], None],
              reached: Callable[[int], bool], stock_driver: Vm | None = None) -> dict[str, Any]:
    """Step 3: empty the balloon, then time inflating to the target and back,
    --to-target-repeats times: one change is a few tenths of a second, read
    every 20 ms, so a single one per boot says little. With `stock_driver`
    (a guest running Linux's virtio_balloon) one more change, not timed,
    traced in the guest (benchmarks/guest_trace.py)."""
    def reach(nbytes: int, what: str) -> float:
        """Ask for `nbytes` and wait until the balloon is there: seconds, the request included."""
        t0 = time.monotonic()
        set_balloon(nbytes)
        poll(lambda: reached(nbytes), 600, what)
        return time.monotonic() - t0

    reach(0, "the balloon to empty")
    target = args.target_mib * MIB
    inflates, deflates = [], []
    for _ in range(args.to_target_repeats):
        inflates.append(reach(target, "inflation"))
        deflates.append(reach(0, "deflation"))
    out: dict[str, Any] = {"inflate_s": statistics.median(inflates), "deflate_s": statistics.median(deflates),
                           "inflate_all": inflates, "deflate_all": deflates}
    if stock_driver is not None:
        # Once more, untimed, with the guest's tracer on the stock driver.
        def change() -> None:
            reach(target, "inflation (traced)")
            reach(0, "deflation (traced)")

        try:
            out["guest"] = trace_guest(stock_driver, change)
        except TraceUnavailable as exc:
            out["guest_unavailable"] = str(exc)
    return out


DRIVER = "balloond_balloon"


def build_driver(kernel: str, outdir: Path) -> Path:
    """Our guest driver, built for the guest's kernel (the path of the .ko)."""
    release = find_kernel(kernel).release
    out = subprocess.run(["sh", str(REPO / "guest-driver" / "build.sh"), "-o", str(outdir), release],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"guest driver build failed for {release}:\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def driver_stats(vm: Vm) -> dict[str, int]:
    out = vm.sh("cat /sys/kernel/debug/balloond/stats")
    return {k: int(v) for k, v in re.findall(r"^(\w+): (\d+)$", out, re.M)}


def run_ours(args: argparse.Namespace, workdir: Path, idle: bool, driver: Path | None = None,
             config_cache: bool = True, split: bool = True) -> dict[str, Any]:
    """balloond with the stock driver, or with ours (`driver`: its .ko, loaded
    with the migrate extension on, and split migrations unless `split` is
    false); `config_cache`: QEMU's config-cache property."""
    daemon = DaemonProcess(workdir / "daemon", vms=("bench",),
                           extra_args=[*BALLOOND_ARGS, *args.daemon_args], log_level="warning")
    daemon.start()
    try:
        with Vm(args.kernel, memory_mib=MEMORY_MIB,
                balloon=VhostUserBalloon(daemon.sockets["bench"], config_cache=config_cache),
                load_balloon=driver is None, modules=[driver] if driver else [], cmdline=list(GUEST_CMDLINE),
                log_dir=workdir / ("driver" if driver else "ours"), name="driver" if driver else "ours") as vm:
            if driver is not None:
                vm.sh(f"insmod /lib/modules/{DRIVER}.ko migrate_ext=1 migrate_split={int(split)}")
            poll(lambda: daemon.api.vm("bench")["running"], 120, "the device to start")
            if driver is not None and "BALLOOND_MIGRATE_VQ" not in daemon.api.vm("bench")["features"]:
                raise SystemExit("our driver did not negotiate the migrate extension")
            worker = (daemon.api.vm("bench").get("worker") or {}).get("pid")
            pids = [daemon.pid] + ([worker] if worker else [])

            def cpu() -> float:
                return sum(cpu_seconds(p) for p in pids)

            def reached(nbytes: int) -> bool:
                return balloond_at(daemon.api, "bench", nbytes)

            def set_balloon(nbytes: int) -> None:
                daemon.api.set_target("bench", nbytes)

            cpu0 = cpu()
            guest0 = driver_stats(vm) if driver is not None else {}
            out = compaction(vm, set_balloon, reached)
            out["daemon_migrations"] = daemon.api.vm("bench")["migrations"]
            if driver is not None:
                guest = driver_stats(vm)
                for key in ("migrated", "ext_records", "ext_buffers", "ext_departures", "ext_arrivals",
                            "fallback_pairs"):
                    out[f"guest_{key}"] = guest.get(key, 0) - guest0.get(key, 0)
            out.update(to_target(args, set_balloon, reached, stock_driver=vm if driver is None else None))
            out["cpu_s"] = cpu() - cpu0
            out["config_reads"] = daemon.api.vm("bench")["counters"]["config_reads"]
            if idle:
                out["idle_pct"], out["qemu_idle_pct"] = idle_cpu_pct(
                    args.idle_seconds, cpu, lambda: cpu_seconds(vm.qemu_pid))
            return out
    finally:
        daemon.stop()


def run_qemu(args: argparse.Namespace, workdir: Path, idle: bool) -> dict[str, Any]:
    with Vm(args.kernel, memory_mib=MEMORY_MIB, balloon=BuiltinBalloon(), load_balloon=True,
            cmdline=list(GUEST_CMDLINE), log_dir=workdir / "qemu", name="qemu") as vm:
        ram = MEMORY_MIB * MIB
        poll(lambda: vm.qmp("query-balloon")["actual"] == ram, 120, "the balloon driver")

        def set_balloon(nbytes: int) -> None:
            vm.qmp("balloon", value=ram - nbytes)

        def reached(nbytes: int) -> bool:
            return vm.qmp("query-balloon")["actual"] == ram - nbytes

        out = compaction(vm, set_balloon, reached)
        out.update(to_target(args, set_balloon, reached, stock_driver=vm))
        if idle:
            out["qemu_idle_pct"], = idle_cpu_pct(args.idle_seconds, lambda: cpu_seconds(vm.qemu_pid))
        return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kernel", default="6.1")
    p.add_argument("--target-mib", type=int, default=256)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--to-target-repeats", type=int, default=3,
                   help="inflate/deflate pairs timed per boot (default 3)")
    p.add_argument("--daemon-arg", dest="daemon_args", action="append", default=[],
                   help="extra balloond argument (repeatable), e.g. --daemon-arg=--poll-us=0")
    p.add_argument("--no-our-driver", dest="our_driver", action="store_false",
                   help="leave out the variant with our guest driver")
    p.add_argument("--ab-split", action="store_true",
                   help="add our driver without split migrations (one whole record per move)")
    p.add_argument("--ab-config-cache", action="store_true",
                   help="add balloond + stock driver with QEMU's config-cache=off")
    args = p.parse_args()
    if args.to_target_repeats < 1:
        p.error("--to-target-repeats must be at least 1")
    if not 0 < args.target_mib < MEMORY_MIB:
        p.error(f"--target-mib must be between 0 and {MEMORY_MIB}")

    results: dict[str, list[dict[str, Any]]] = {"balloond": [], "nocache": [], "driver": [], "whole": [],
                                                  "qemu": []}
    with tempfile.TemporaryDirectory(prefix="bd-rt-") as tmp:
        ko = build_driver(args.kernel, Path(tmp) / "driver-build") if args.our_driver else None
        variants: list[tuple[str, Callable[..., dict[str, Any]]]] = [("balloond", run_ours)]
        if args.ab_config_cache:
            variants.append(("nocache", lambda a, w, idle: run_ours(a, w, False, config_cache=False)))
        if ko is not None:
            variants.append(("driver", lambda a, w, idle: run_ours(a, w, False, driver=ko)))
            if args.ab_split:
                variants.append(("whole", lambda a, w, idle: run_ours(a, w, False, driver=ko, split=False)))
        variants.append(("qemu", run_qemu))
        for i in range(args.rounds):
            for name, fn in variants:
                r = fn(args, Path(tmp) / f"r{i}-{name}", idle=i == 0 and name in ("balloond", "qemu"))
                results[name].append(r)
                extra = ""
                if "cpu_s" in r:
                    extra = (f"  daemon counted {r['daemon_migrations']}  daemon CPU {r['cpu_s']:6.2f}s"
                             f"  GET_CONFIG {r['config_reads']}")
                    if "idle_pct" in r:
                        extra += f"  idle CPU {r['idle_pct']:.3f}%"
                if "guest_migrated" in r:
                    extra += (f"  guest moved {r['guest_migrated']} (extension records {r['guest_ext_records']} "
                              f"in {r['guest_ext_buffers']} buffers: {r['guest_ext_departures']} departures, "
                              f"{r['guest_ext_arrivals']} arrivals; fallback pairs {r['guest_fallback_pairs']})")
                if "guest" in r:
                    extra += "  " + guest_view(r["guest"])
                if "guest_unavailable" in r:
                    extra += f"  (no guest trace: {r['guest_unavailable']})"
                print(f"round {i + 1}/{args.rounds} {name:8}: {r['migrations']:6d} migrations in "
                      f"{r['compact_s']:6.2f}s = {r['migrations_per_s']:7.0f}/s  (in the guest {r['guest_compact_s']:.3f}s = "
                      f"{r['guest_migrations_per_s']:.0f}/s)  inflate {each_change(r['inflate_all'])}s  "
                      f"deflate {each_change(r['deflate_all'])}s{extra}", flush=True)

    def med(rows: list[dict[str, Any]], key: str) -> float:
        """Median over rounds; for times to target, over every change timed."""
        if key in ("inflate_s", "deflate_s"):
            return statistics.median(x for r in rows for x in r[key.replace("_s", "_all")])
        return statistics.median(r[key] for r in rows)

    ours, drv, qemu = results["balloond"], results["driver"], results["qemu"]
    print(f"\n{MEMORY_MIB} MiB Linux {args.kernel} guest (TCG), medians of {args.rounds} rounds "
          f"(times to target: of {args.rounds * args.to_target_repeats} changes each way); "
          "balloond = stock virtio_balloon on balloond, driver = our driver with the migrate extension")
    head = f"{'':30}{'balloond':>10}" + (f"{'driver':>10}" if drv else "") + f"{'QEMU':>10}{'balloond/QEMU':>15}"
    print(head + (f"{'driver/QEMU':>13}" if drv else ""))
    for key, label, fmt in (("migrations_per_s", "migrations/s (compaction)", "{:10.0f}"),
                            ("guest_migrations_per_s", "migrations/s (guest's clock)", "{:10.0f}"),
                            ("migrations", "balloon pages migrated", "{:10.0f}"),
                            ("inflate_s", f"inflate to {args.target_mib} MiB (s)", "{:10.2f}"),
                            ("deflate_s", f"deflate from {args.target_mib} MiB (s)", "{:10.2f}")):
        a, b = med(ours, key), med(qemu, key)
        line = f"{label:30}" + fmt.format(a) + (fmt.format(med(drv, key)) if drv else "") + fmt.format(b)
        line += f"{a / b if b else float('inf'):15.2f}"
        if drv:
            c = med(drv, key)
            line += f"{c / b if b else float('inf'):13.2f}"
        print(line)
    a, b = DriverCalls(), DriverCalls()
    for r in ours:
        a.extend(r.get("guest", DriverCalls()))
    for r in qemu:
        b.extend(r.get("guest", DriverCalls()))
    for key, label in (("inflate_waits", "inflate wait per buffer (µs)"),
                       ("inflate", "inflate call per buffer (µs)"),
                       ("deflate_waits", "deflate wait per buffer (µs)"),
                       ("deflate", "deflate call per buffer (µs)")):
        x, y = a.median(key), b.median(key)
        if x is not None and y is not None:
            print(f"{'guest: ' + label:30}{x:10.0f}" + (f"{'-':>10}" if drv else "") + f"{y:10.0f}{x / y:15.2f}")
    if a.deflate and b.deflate:
        print("  (guest: the stock driver's work item per buffer of up to 256 pages, and its wait for the device\n"
              "   in it, timed by the guest's tracer in one more change per round, medians of every call)")
    print(f"daemon CPU per run (supervisor + worker): balloond {med(ours, 'cpu_s'):.2f}s"
          + (f", driver {med(drv, 'cpu_s'):.2f}s" if drv else ""))
    idle = [r["idle_pct"] for r in ours if "idle_pct" in r]
    nocache = results["nocache"]
    if nocache:
        print(f"config-cache=off (same QEMU): {'':4}"
              + "  ".join(f"{key} {med(nocache, key):.2f} ({med(nocache, key) / med(qemu, key):.2f}x QEMU)"
                          for key in ("migrations_per_s", "inflate_s", "deflate_s"))
              + f"  GET_CONFIG {med(nocache, 'config_reads'):.0f} vs {med(ours, 'config_reads'):.0f} with the cache")
    whole = results["whole"]
    if whole:
        print(f"our driver, whole records (migrate_split=0): "
              + "  ".join(f"{key} {med(whole, key):.2f} ({med(whole, key) / med(qemu, key):.2f}x QEMU)"
                          for key in ("migrations_per_s", "guest_migrations_per_s", "inflate_s", "deflate_s"))
              + f"; split/whole migrations/s {med(drv, 'migrations_per_s') / med(whole, 'migrations_per_s'):.2f}"
              + f", by the guest's clock {med(drv, 'guest_migrations_per_s') / med(whole, 'guest_migrations_per_s'):.2f}")
    if idle:
        print(f"daemon CPU serving an idle guest for {args.idle_seconds:g}s: {idle[0]:.3f}% of a core")
    qemu_idle = [(r["qemu_idle_pct"], q["qemu_idle_pct"]) for r, q in zip(ours, qemu)
                 if "qemu_idle_pct" in r and "qemu_idle_pct" in q]
    if qemu_idle:
        print(f"QEMU CPU for that idle guest: {qemu_idle[0][0]:.2f}% of a core with balloond, "
              f"{qemu_idle[0][1]:.2f}% with the built-in balloon (TCG {qemu_halt_poll()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
