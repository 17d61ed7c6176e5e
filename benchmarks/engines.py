"""The two vhost-user engines side by side, with QEMU's built-in balloon as
the reference, same guest, same run.

balloond serves a VM with its own vhost-user engine ("pure", the default)
or with QEMU's libvhost-user through ctypes (`--engine libvhost-user`); the
balloon logic above them is the same code. Each round boots the same guest
(1 GiB, Linux 6.1 by default, stock virtio_balloon; balloond offering only
what the built-in device offers and the guest booted as `same_work` says)
once per variant, interleaved
(the order rotates from round to round), and on each times
--repeats changes of the balloon to --target-mib and back to 0:

  - time to target, from setting it to the guest's `actual` reaching it
    (and, for balloond, every discard done): our API's actual_bytes, QEMU's
    query-balloon, read every 20 ms;
  - for balloond, the daemon's CPU time (supervisor + the VM's worker,
    utime+stime) over the inflations, per GiB inflated;
  - the host memory the inflation gave back: the drop in the blocks
    allocated to the guest-RAM memfd (both variants use one), per change
    (page poisoning writes every page the guest frees, so each deflated
    page is allocated again before the next inflation).

The summary prints medians over every change and the ratios against QEMU's
built-in balloon and between the engines.

    python benchmarks/engines.py [--rounds 3] [--repeats 3] [--kernel 6.1] [--target-mib 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import BuiltinBalloon, VhostUserBalloon, Vm  # noqa: E402
from harness.daemon import DaemonProcess  # noqa: E402
from benchmarks.roundtrips import cpu_seconds, each_change, poll  # noqa: E402
from benchmarks.same_work import BALLOOND_ARGS, GUEST_CMDLINE, balloond_at  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
MEMORY_MIB = 1024
ENGINES = ("pure", "libvhost-user")


def changes(args: argparse.Namespace, vm: Vm, set_balloon: Callable[[int], None], reached: Callable[[int], bool],
            cpu: Callable[[], float]) -> dict[str, list[float]]:
    """--repeats inflations to the target and deflations back, timed."""
    target = args.target_mib * MIB
    out: dict[str, list[float]] = {"inflate_s": [], "deflate_s": [], "freed": [], "cpu_per_gib": []}
    for _ in range(args.repeats):
        allocated = vm.memfd_allocated_bytes()
        c0, t0 = cpu(), time.monotonic()
        set_balloon(target)
        poll(lambda: reached(target), 600, "inflation")
        out["inflate_s"].append(time.monotonic() - t0)
        out["cpu_per_gib"].append((cpu() - c0) * GIB / target)
        out["freed"].append(allocated - vm.memfd_allocated_bytes())
        t0 = time.monotonic()
        set_balloon(0)
        poll(lambda: reached(0), 600, "deflation")
        out["deflate_s"].append(time.monotonic() - t0)
    return out


def run_engine(args: argparse.Namespace, workdir: Path, engine: str) -> dict[str, list[float]]:
    daemon = DaemonProcess(workdir / "daemon", vms=("bench",), log_level="warning",
                           extra_args=["--engine", engine, *BALLOOND_ARGS])
    daemon.start()
    try:
        with Vm(args.kernel, memory_mib=MEMORY_MIB, balloon=VhostUserBalloon(daemon.sockets["bench"]),
                load_balloon=True, cmdline=list(GUEST_CMDLINE), log_dir=workdir / "vm", name=engine) as vm:
            poll(lambda: daemon.api.vm("bench")["running"], 120, "the device to start")
            worker = (daemon.api.vm("bench").get("worker") or {}).get("pid")
            pids = [daemon.pid] + ([worker] if worker else [])
            # The run measures the engine it names: the library is mapped
            # into the process serving the VM exactly when it is used.
            maps = Path(f"/proc/{pids[-1]}/maps").read_text()
            if ("libvhost-user" in maps) != (engine == "libvhost-user"):
                raise SystemExit(f"the VM's worker does not run on the {engine} engine")

            def reached(nbytes: int) -> bool:
                return balloond_at(daemon.api, "bench", nbytes)

            return changes(args, vm, lambda n: daemon.api.set_target("bench", n), reached,
                           lambda: sum(cpu_seconds(p) for p in pids))
    finally:
        daemon.stop()


def run_qemu(args: argparse.Namespace, workdir: Path) -> dict[str, list[float]]:
    ram = MEMORY_MIB * MIB
    with Vm(args.kernel, memory_mib=MEMORY_MIB, balloon=BuiltinBalloon(), load_balloon=True,
            cmdline=list(GUEST_CMDLINE), log_dir=workdir / "vm", name="qemu") as vm:
        poll(lambda: vm.qmp("query-balloon")["actual"] == ram, 120, "the balloon driver")
        return changes(args, vm, lambda n: vm.qmp("balloon", value=ram - n),
                       lambda n: vm.qmp("query-balloon")["actual"] == ram - n, lambda: 0.0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="changes timed per boot (default 3)")
    p.add_argument("--kernel", default="6.1")
    p.add_argument("--target-mib", type=int, default=512)
    args = p.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    if not 0 < args.target_mib < MEMORY_MIB:
        p.error(f"--target-mib must be between 0 and {MEMORY_MIB}")

    variants: list[tuple[str, Callable[[Path], dict[str, list[float]]]]] = [
        *((e, lambda w, e=e: run_engine(args, w, e)) for e in ENGINES),
        ("qemu", lambda w: run_qemu(args, w)),
    ]
    results: dict[str, dict[str, list[float]]] = {name: {} for name, _ in variants}
    with tempfile.TemporaryDirectory(prefix="bd-engines-") as tmp:
        for i in range(args.rounds):
            order = variants[i % len(variants):] + variants[:i % len(variants)]
            for name, fn in order:
                r = fn(Path(tmp) / f"r{i}-{name}")
                for key, values in r.items():
                    results[name].setdefault(key, []).extend(values)
                cpu = "" if name == "qemu" else f"  daemon CPU {statistics.median(r['cpu_per_gib']):.3f} s/GiB"
                print(f"round {i + 1}/{args.rounds} {name:14}: inflate "
                      + each_change(r["inflate_s"]) + " s  deflate "
                      + each_change(r["deflate_s"]) + " s  freed "
                      + " ".join(f"{x / MIB:.0f}" for x in r["freed"]) + f" MiB{cpu}", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(results[name][key])

    n = args.rounds * args.repeats
    print(f"\n{MEMORY_MIB} MiB Linux {args.kernel} guest (TCG), stock virtio_balloon, balloon of {args.target_mib} MiB; "
          f"medians of {n} changes each way per variant")
    print(f"{'':26}{'pure':>10}{'libvhost-user':>15}{'QEMU':>10}{'pure/QEMU':>11}{'lvu/QEMU':>10}{'lvu/pure':>10}")
    for key, label in (("inflate_s", "inflate: time to target s"), ("deflate_s", "deflate: time to target s")):
        a, b, q = med("pure", key), med("libvhost-user", key), med("qemu", key)
        print(f"{label:26}{a:10.3f}{b:15.3f}{q:10.3f}{a / q:11.2f}{b / q:10.2f}{b / a:10.2f}")
    a, b = med("pure", "cpu_per_gib"), med("libvhost-user", "cpu_per_gib")
    print(f"{'daemon CPU s per GiB':26}{a:10.3f}{b:15.3f}{'-':>10}{'':11}{'':10}{b / a:10.2f}")
    a, b, q = (med(name, "freed") / MIB for name in ("pure", "libvhost-user", "qemu"))
    print(f"{'host memory freed MiB':26}{a:10.0f}{b:15.0f}{q:10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
