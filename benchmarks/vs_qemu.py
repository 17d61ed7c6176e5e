"""Side by side: balloond against QEMU's built-in virtio-balloon, same guest.

Each round boots the same guest twice — once with balloond attached through
QEMU's generic vhost-user device, once with QEMU's own `virtio-balloon-pci`
driven over QMP — asks both for the same balloon, and measures

  * the seconds from setting the target until the guest reports it reached
    (config `actual`: our API's actual_bytes, QEMU's query-balloon), and
  * the host memory returned: the drop in the guest-RAM memfd's allocated
    blocks between just before the target was set and once it was reached.

then deflates and measures the way back. balloond offers only what the
built-in device offers by default, both guests boot with page_poison=1 and
the daemon is watched from its last report (`same_work` says why), so both
devices see the same work. Rounds alternate the two
so drift on a shared machine hits both; the summary prints medians and the
ratio ours/QEMU (time: lower is better; memory: higher is better).

    python benchmarks/vs_qemu.py [--rounds 3] [--kernel 6.12] [--memory-mib 1024] [--target-mib 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import BuiltinBalloon, VhostUserBalloon, Vm  # noqa: E402
from benchmarks.polling import poll  # noqa: E402
from benchmarks.same_work import BALLOOND_ARGS, GUEST_CMDLINE, balloond_at  # noqa: E402
from harness.daemon import DaemonProcess  # noqa: E402

MIB = 1 << 20


def run_ours(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    daemon = DaemonProcess(workdir / "daemon", vms=("bench",),
                           extra_args=[*BALLOOND_ARGS, *args.daemon_args],
                           log_level="warning")
    daemon.start()
    try:
        with Vm(args.kernel, memory_mib=args.memory_mib, balloon=VhostUserBalloon(daemon.sockets["bench"]),
                load_balloon=True, cmdline=list(GUEST_CMDLINE), log_dir=workdir / "ours", name="ours") as vm:
            poll(lambda: daemon.api.vm("bench")["running"], 60, "the device to start")
            target = args.target_mib * MIB
            before = vm.memfd_allocated_bytes()
            daemon.api.set_target("bench", target)
            # Reached means the guest reports the balloon AND the host got the
            # memory: the daemon may defer discards by a few milliseconds.
            t_in = poll(lambda: balloond_at(daemon.api, "bench", target), 600, "inflation")
            freed = before - vm.memfd_allocated_bytes()
            daemon.api.set_target("bench", 0)
            t_out = poll(lambda: balloond_at(daemon.api, "bench", 0), 600, "deflation")
            return {"inflate_s": t_in, "freed": freed, "deflate_s": t_out}
    finally:
        daemon.stop()


def run_qemu(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    with Vm(args.kernel, memory_mib=args.memory_mib, balloon=BuiltinBalloon(), load_balloon=True,
            cmdline=list(GUEST_CMDLINE), log_dir=workdir / "qemu", name="qemu") as vm:
        ram = args.memory_mib * MIB
        target = args.target_mib * MIB
        poll(lambda: vm.qmp("query-balloon")["actual"] == ram, 60, "the balloon driver")
        before = vm.memfd_allocated_bytes()
        vm.qmp("balloon", value=ram - target)
        t_in = poll(lambda: vm.qmp("query-balloon")["actual"] == ram - target, 600, "inflation")
        freed = before - vm.memfd_allocated_bytes()
        vm.qmp("balloon", value=ram)
        t_out = poll(lambda: vm.qmp("query-balloon")["actual"] == ram, 600, "deflation")
        return {"inflate_s": t_in, "freed": freed, "deflate_s": t_out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kernel", default="6.12")
    p.add_argument("--memory-mib", type=int, default=1024)
    p.add_argument("--target-mib", type=int, default=512)
    p.add_argument("--daemon-arg", dest="daemon_args", action="append", default=[],
                   help="extra balloond argument (repeatable), e.g. --daemon-arg=--poll-us=0")
    args = p.parse_args()
    if not 0 < args.target_mib < args.memory_mib:
        p.error("--target-mib must be between 0 and --memory-mib")

    ours: list[dict[str, float]] = []
    qemu: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bd-bench-") as tmp:
        for i in range(args.rounds):
            for name, fn, out in (("balloond", run_ours, ours), ("qemu", run_qemu, qemu)):
                r = fn(args, Path(tmp) / f"r{i}")
                out.append(r)
                print(f"round {i + 1}/{args.rounds} {name:8}: inflate {r['inflate_s']:6.2f}s  "
                      f"freed {r['freed'] / MIB:7.1f} MiB  deflate {r['deflate_s']:6.2f}s", flush=True)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    print(f"\n{args.target_mib} MiB balloon in a {args.memory_mib} MiB Linux {args.kernel} guest (TCG), "
          f"medians of {args.rounds} rounds")
    print(f"{'':22}{'balloond':>12}{'QEMU':>12}{'ours/QEMU':>12}")
    for key, label, unit in (("inflate_s", "time to inflate", "s"), ("deflate_s", "time to deflate", "s"),
                             ("freed", "host memory freed", "MiB")):
        a, b = med(ours, key), med(qemu, key)
        scale = MIB if unit == "MiB" else 1
        ratio = a / b if b else float("inf")
        print(f"{label:22}{a / scale:11.2f}{unit[0]}{b / scale:11.2f}{unit[0]}{ratio:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
