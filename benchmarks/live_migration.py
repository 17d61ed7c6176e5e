"""Live migration with a balloon: balloond against QEMU's built-in virtio-balloon.

Each round migrates the same guest (Linux 6.12 by default, 1 GiB, a
384 MiB balloon) from one QEMU to another on this host over a Unix socket,
once with the balloon served by balloond (one daemon, a socket per side)
and once with QEMU's own virtio-balloon-pci, and reads QEMU's figures for
the migration: total time and downtime (query-migrate, ms), the peak
allocation of both sides' guest-RAM files while QEMU copies RAM (sampled
every 20 ms), and the destination's allocation once the guest runs there
(after balloond discarded the adopted balloon, if anything of it had been
allocated; QEMU's built-in device does not discard on the destination: a
ballooned page that arrived as a zero page stays allocated). Rounds
alternate the two so that drift on a shared host hits both; the summary
prints medians and the ratios ours / built-in (lower is better for all).

Both QEMUs back guest RAM with the same memory-backend-memfd (share=on,
which vhost-user needs): QEMU's built-in balloon punches holes in that memfd
as ours does, so the two differ in the device alone. With --skip-file-holes
on (the default), both sources migrate with QEMU's skip-file-holes
capability (qemu-patches/0004): holes of the RAM file are neither read nor
sent. `--skip-file-holes off` shows QEMU without it.

    python benchmarks/live_migration.py [--rounds 3] [--kernel 6.12] [--memory-mib 1024] [--balloon-mib 384]
                                        [--skip-file-holes on|off]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import BuiltinBalloon, VhostUserBalloon, Vm  # noqa: E402
from benchmarks.polling import poll  # noqa: E402
from harness.daemon import DaemonProcess  # noqa: E402
from harness.ram_sampler import PeakAllocation  # noqa: E402

MIB = 1 << 20


def migrate(src: Vm, dst: Vm, uri: str, settle: Callable[[], object], skip_holes: bool) -> dict[str, float]:
    if skip_holes:
        src.qmp("migrate-set-capabilities", capabilities=[{"capability": "skip-file-holes", "state": True}])
    with PeakAllocation(src, dst) as peaks:
        info = src.migrate_to(uri, timeout=900)
    if info["status"] != "completed":
        raise SystemExit(f"migration {info['status']}: {info}")
    poll(lambda: dst.qmp("query-status")["status"] == "running", 60, "the destination to run")
    poll(settle, 120, "the destination to settle")
    return {
        "total_ms": float(info["total-time"]),
        "downtime_ms": float(info["downtime"]),
        "dst_alloc_mib": dst.memfd_allocated_bytes() / MIB,
        "src_peak_mib": peaks.peak[0] / MIB,
        "dst_peak_mib": peaks.peak[1] / MIB,
        "transferred_mib": info["ram"]["transferred"] / MIB,
    }


def pair(args: argparse.Namespace, workdir: Path, name: str, balloon_src: object, balloon_dst: object
         ) -> tuple[Vm, Vm, str]:
    uri = f"unix:{tempfile.mkdtemp(prefix='bd-mig-')}/in.sock"
    common = dict(memory_mib=args.memory_mib, load_balloon=True)
    src = Vm(args.kernel, balloon=balloon_src, log_dir=workdir / f"{name}-src", name=f"{name}-src", **common)
    src.start()
    src.wait_boot()
    dst = Vm(args.kernel, balloon=balloon_dst, log_dir=workdir / f"{name}-dst", name=f"{name}-dst",
             incoming=uri, **common)
    dst.start()
    return src, dst, uri


def run_ours(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    daemon = DaemonProcess(workdir / "daemon", vms=("src", "dst"), log_level="warning")
    daemon.start()
    src = dst = None
    try:
        src, dst, uri = pair(args, workdir, "ours", VhostUserBalloon(daemon.sockets["src"]),
                             VhostUserBalloon(daemon.sockets["dst"]))
        poll(lambda: daemon.api.vm("src")["running"], 60, "the device to start")
        target = args.balloon_mib * MIB
        daemon.api.set_target("src", target)
        poll(lambda: (s := daemon.api.vm("src"))["actual_bytes"] == target and s["pending_discard_bytes"] == 0,
             600, "the balloon")
        src_alloc = src.memfd_allocated_bytes() / MIB

        def settled() -> bool:
            s = daemon.api.vm("dst")
            return bool(s["running"] and s["ballooned_bytes"] == target and s["pending_discard_bytes"] == 0)

        return {**migrate(src, dst, uri, settled, args.skip_file_holes == "on"), "src_alloc_mib": src_alloc}
    finally:
        for vm in (src, dst):
            if vm is not None:
                vm.kill()
        daemon.stop()


def run_builtin(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    src = dst = None
    try:
        src, dst, uri = pair(args, workdir, "builtin", BuiltinBalloon(), BuiltinBalloon())
        ram = args.memory_mib * MIB
        poll(lambda: src.qmp("query-balloon")["actual"] == ram, 60, "the balloon driver")
        src.qmp("balloon", value=ram - args.balloon_mib * MIB)
        poll(lambda: src.qmp("query-balloon")["actual"] == ram - args.balloon_mib * MIB, 600, "the balloon")
        src_alloc = src.memfd_allocated_bytes() / MIB
        return {**migrate(src, dst, uri, lambda: True, args.skip_file_holes == "on"), "src_alloc_mib": src_alloc}
    finally:
        for vm in (src, dst):
            if vm is not None:
                vm.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernel", default="6.12")
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--balloon-mib", type=int, default=384)
    parser.add_argument("--skip-file-holes", choices=("on", "off"), default="on",
                        help="migrate with QEMU's skip-file-holes capability (qemu-patches/0004)")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"ours": [], "builtin": []}
    with tempfile.TemporaryDirectory(prefix="bd-bench-mig-") as tmp:
        for r in range(args.rounds):
            order = [("ours", run_ours), ("builtin", run_builtin)]
            if r % 2:
                order.reverse()
            for name, run in order:
                load = os.getloadavg()[0]
                row = run(args, Path(tmp) / f"{name}-{r}")
                rows[name].append(row)
                print(f"round {r + 1} {name:8s} total {row['total_ms']:7.0f} ms  downtime {row['downtime_ms']:5.0f} ms  "
                      f"sent {row['transferred_mib']:6.1f} MiB  RAM file: source {row['src_alloc_mib']:5.0f} MiB "
                      f"(peak {row['src_peak_mib']:5.0f}), destination peak {row['dst_peak_mib']:5.0f} MiB, "
                      f"after {row['dst_alloc_mib']:5.0f} MiB  (load {load:.2f})", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(row[key] for row in rows[name])

    print(f"\n{args.balloon_mib} MiB balloon in a {args.memory_mib} MiB Linux {args.kernel} guest (TCG), "
          f"memfd-backed RAM on both, migrated over a Unix socket, skip-file-holes {args.skip_file_holes}; "
          f"medians of {args.rounds}:")
    print(f"{'':28s}{'balloond':>12s}{'built-in':>12s}{'ours/built-in':>16s}")
    for key, label in (("total_ms", "total time (ms)"), ("downtime_ms", "downtime (ms)"),
                       ("src_peak_mib", "source peak RAM file (MiB)"),
                       ("dst_peak_mib", "dest. peak RAM file (MiB)"),
                       ("dst_alloc_mib", "destination RAM file (MiB)")):
        ours, builtin = med("ours", key), med("builtin", key)
        print(f"{label:28s}{ours:12.0f}{builtin:12.0f}{ours / builtin if builtin else float('nan'):16.2f}")
    print(f"destination allocation bound (RAM - 0.95 x balloon): {args.memory_mib - 0.95 * args.balloon_mib:.0f} MiB; "
          f"load now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
