"""The demo: balloond serving a real guest, shown live.

Starts the daemon, boots a Linux guest with the balloon attached through
QEMU's generic vhost-user device, has the guest dirty most of its memory (so
the host really holds it), then walks the balloon through a few targets and
shows, as a table that redraws in place, what the guest reports, what the
daemon tracks and what the host got back.

Run through scripts/demo, which sets the machine up first.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from balloond.services.sizes import format_size, parse_size  # noqa: E402
from harness import VhostUserBalloon, Vm  # noqa: E402
from harness.daemon import DaemonProcess  # noqa: E402

MIB = 1 << 20


class LiveTable:
    """Redraws its rows in place on a terminal; prints each final row otherwise."""

    def __init__(self, headers: list[str]) -> None:
        self.headers = headers
        self.tty = sys.stdout.isatty()
        self.drawn = 0
        self.done: list[list[str]] = []

    def _line(self, cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, (8, 10, 10, 10, 10, 12, 10, 24)))

    def show(self, current: list[str] | None) -> None:
        if not self.tty:
            return
        rows = [self._line(self.headers)] + [self._line(r) for r in self.done]
        if current is not None:
            rows.append(self._line(current))
        if self.drawn:
            sys.stdout.write(f"\x1b[{self.drawn}F")
        for row in rows:
            sys.stdout.write("\x1b[2K" + row + "\n")
        sys.stdout.flush()
        self.drawn = len(rows)

    def finish_row(self, row: list[str]) -> None:
        self.done.append(row)
        if self.tty:
            self.show(None)
        else:
            if len(self.done) == 1:
                print(self._line(self.headers))
            print(self._line(row), flush=True)


def bar(done: int, total: int, width: int = 20) -> str:
    if total <= 0:
        return "[" + "#" * width + "]"
    filled = min(width, int(width * done / total))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def main() -> int:
    p = argparse.ArgumentParser(description="balloond on a real guest, live")
    p.add_argument("--kernel", default="6.12", help="guest kernel series (6.1 or 6.12)")
    p.add_argument("--memory", default="1G", help="guest RAM")
    p.add_argument("--targets", default="256M,512M,128M,0", help="balloon sizes to walk through")
    args = p.parse_args()
    memory = parse_size(args.memory)
    targets = [parse_size(t) for t in args.targets.split(",")]

    with tempfile.TemporaryDirectory(prefix="balloond-demo-") as tmp:
        daemon = DaemonProcess(Path(tmp) / "daemon", vms=("demo",), log_level="info",
                               extra_args=["--no-deflate-on-oom", "--stats-interval", "1"])
        print(f"starting balloond (log: {daemon.log_path})", flush=True)
        print(f"  while it runs: balloonctl --api {daemon.api_path} status demo", flush=True)
        daemon.start()
        try:
            print(f"booting a Linux {args.kernel} guest with {format_size(memory)} of RAM (TCG)...", flush=True)
            with Vm(args.kernel, memory_mib=memory // MIB, balloon=VhostUserBalloon(daemon.sockets["demo"]),
                    load_balloon=True, cmdline=["page_poison=1"], log_dir=Path(tmp) / "vm", name="demo") as vm:
                print(f"guest up in {vm.boot_seconds:.1f}s; QEMU holds {format_size(vm.rss_shmem())} of guest RAM",
                      flush=True)
                run_targets(vm, daemon, targets)
        finally:
            daemon.stop()
    return 0


def run_targets(vm: Vm, daemon: DaemonProcess, targets: list[int]) -> None:
    api = daemon.api
    table = LiveTable(["target", "actual", "tracked", "MemTotal", "QEMU RSS", "host freed", "time", "progress"])
    print()
    for target in targets:
        start_actual = api.vm("demo")["actual_bytes"]
        api.set_target("demo", target)
        t0 = time.monotonic()
        while True:
            vm_state = api.vm("demo")
            actual = vm_state["actual_bytes"]
            done = abs(actual - start_actual)
            todo = abs(target - start_actual)
            reached = actual == target and vm_state["ballooned_bytes"] == target \
                and vm_state["pending_discard_bytes"] == 0
            row = [
                format_size(target), format_size(actual), format_size(vm_state["ballooned_bytes"]),
                format_size(vm.meminfo()["MemTotal"] * 1024), format_size(vm.rss_shmem()),
                format_size(vm_state["host_freed_bytes"]), f"{time.monotonic() - t0:.1f}s", bar(done, todo),
            ]
            if reached:
                table.finish_row(row)
                break
            table.show(row)
            if time.monotonic() - t0 > 300:
                table.finish_row(row)
                print(f"target {format_size(target)} not reached within 300 s; see {daemon.log_path}")
                return
            time.sleep(0.3)
        time.sleep(1)
    state = api.vm("demo")
    print(f"\nThe daemon released {format_size(state['host_freed_bytes'])} of host memory in all; "
          f"the guest's last stats: {format_size(state['stats'].get('free_memory'))} free "
          f"of {format_size(state['stats'].get('total_memory'))}.")


if __name__ == "__main__":
    sys.exit(main())
