"""Inflate 1 GiB through the daemon and compare with freeing it directly.

The test frontend (tests/frontend.py) plays QEMU and the guest driver: a real
memfd as guest RAM, real rings, 256-PFN buffers, each waited for as Linux's
driver waits. The clock runs from the first buffer until the memfd's
allocated size has dropped by the whole GiB (so deferred discards count).

References, measured in the same run on a memfd of the same size:
  (a) one bulk fallocate(PUNCH_HOLE) of the GiB,
  (b) a C loop punching one 4 KiB page per call, in the same order as the
      balloon's PFNs (contiguous, or the same shuffled permutation).

Prints GiB/s and the ratios the project tracks: contiguous against (a),
shuffled against (b). Run as: python benchmarks/inflate.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balloond.device.releaser import punch_hole  # noqa: E402
from harness.daemon import DaemonProcess  # noqa: E402
from tests.frontend import TestFrontend  # noqa: E402

GIB = 1 << 30
PAGES = GIB >> 12

C_LOOP = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
/* usage: punch ORDER_FILE  (little-endian u32 page indices) -> seconds on stdout */
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "rb");
    size_t n = 0, cap = 1 << 18; unsigned *order = malloc(cap * 4);
    while (fread(&order[n], 4, 1, f) == 1) if (++n == cap) order = realloc(order, (cap *= 2) * 4);
    int fd = memfd_create("ref", 0);
    ftruncate(fd, (off_t)n * 4096);
    fallocate(fd, 0, 0, (off_t)n * 4096);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (size_t i = 0; i < n; i++)
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)order[i] * 4096, 4096);
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.6f\n", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
"""


def bulk_punch_seconds() -> float:
    fd = os.memfd_create("ref-bulk")
    try:
        os.ftruncate(fd, GIB)
        os.posix_fallocate(fd, 0, GIB)
        t0 = time.perf_counter()
        punch_hole(fd, 0, GIB)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def c_loop_seconds(binary: Path, order: list[int], workdir: Path) -> float:
    path = workdir / "order.bin"
    path.write_bytes(b"".join(i.to_bytes(4, "little") for i in order))
    return float(subprocess.run([str(binary), str(path)], check=True, capture_output=True, text=True).stdout)


def balloon_seconds(daemon: DaemonProcess, fe: TestFrontend, pfns: list[int]) -> float:
    first = min(pfns)
    fe.ram.populate(first, len(pfns))
    before = fe.ram.allocated_bytes()
    t0 = time.perf_counter()
    fe.inflate(pfns)
    while before - fe.ram.allocated_bytes() < GIB:
        if time.perf_counter() - t0 > 300:
            raise SystemExit("the daemon did not free the GiB within 300 s")
        time.sleep(0.0005)
    elapsed = time.perf_counter() - t0
    fe.deflate(pfns)
    return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--discard-delay-ms", type=float, default=None,
                   help="pass to the daemon (default: the daemon's own default)")
    args = p.parse_args()
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("a C compiler is needed for the per-page reference loop")

    with tempfile.TemporaryDirectory(prefix="bd-inflate-") as tmp:
        work = Path(tmp)
        (work / "punch.c").write_text(C_LOOP)
        binary = work / "punch"
        subprocess.run([cc, "-O2", "-o", str(binary), str(work / "punch.c")], check=True)
        extra = ["--stats-interval", "0"]
        if args.discard_delay_ms is not None:
            extra += ["--discard-delay-ms", str(args.discard_delay_ms)]
        daemon = DaemonProcess(work / "daemon", vms=("bench",), extra_args=extra, log_level="warning")
        daemon.start()
        try:
            fe = TestFrontend(daemon.sockets["bench"], ram_size=GIB + (64 << 20), layout="single", timeout=30)
            fe.start()
            base = fe.first_free_pfn
            contiguous = list(range(base, base + PAGES))
            shuffled = contiguous[:]
            random.Random(1).shuffle(shuffled)
            order_contig = [pfn - base for pfn in contiguous]
            order_shuffled = [pfn - base for pfn in shuffled]
            rows: dict[str, list[float]] = {k: [] for k in ("contig", "shuffled", "bulk", "c_contig", "c_shuffled")}
            for r in range(args.rounds):
                rows["bulk"].append(bulk_punch_seconds())
                rows["c_contig"].append(c_loop_seconds(binary, order_contig, work))
                rows["c_shuffled"].append(c_loop_seconds(binary, order_shuffled, work))
                rows["contig"].append(balloon_seconds(daemon, fe, contiguous))
                rows["shuffled"].append(balloon_seconds(daemon, fe, shuffled))
                print(f"round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in rows.items()),
                      flush=True)
            fe.close()
        finally:
            daemon.stop()

    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\n1 GiB, 256-PFN buffers, medians of {args.rounds} rounds (GiB/s; higher is faster)")
    for key, label in (("contig", "balloond, contiguous PFNs"), ("shuffled", "balloond, shuffled PFNs"),
                       ("bulk", "(a) one bulk punch"), ("c_contig", "(b) C per-page loop, contiguous"),
                       ("c_shuffled", "(b) C per-page loop, shuffled")):
        print(f"  {label:34} {1 / med[key]:8.2f}")
    print(f"ratio contiguous / (a) bulk punch:        {med['bulk'] / med['contig']:.2f}  (target >= 0.7)")
    print(f"ratio shuffled / (b) C per-page shuffled: {med['c_shuffled'] / med['shuffled']:.2f}  (target >= 0.9)")
    print(f"ratio contiguous / (b) C per-page contig: {med['c_contig'] / med['contig']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
