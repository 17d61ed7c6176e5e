"""One daemon serving many VMs: a worker process per VM against one process for all.

Each round starts balloond twice with the same `--vm` sockets (64 by
default), once with `--vm-isolation process` (the supervisor and one worker
per VM) and once with `--vm-isolation none` (everything in one process), in
that order, round after round, so drift on a shared machine hits both. For
each daemon:

  * a test frontend (tests/frontend.py: a real memfd of guest RAM, real
    rings and eventfds, 256-PFN buffers each waited for as Linux's driver
    does) connects to every VM and starts its device;
  * memory, all VMs idle and connected: PSS and USS (Private_Clean +
    Private_Dirty, from /proc/PID/smaps_rollup) summed over the daemon and
    every process below it, the supervisor's own USS and, per worker, the
    median and largest USS; measured again after the load;
  * a burst: every VM inflates 8 MiB of populated guest RAM at once; the
    time until the last VM had all its buffers back, and until every memfd
    had given the memory back to the host (deferred discards count);
  * API latency, all VMs idle (the reference for the next line): a separate
    process (so that the load's own threads do not delay it) reads
    `GET /v1/vms` and `GET /v1/vms/{name}` (an operator's reads, from the
    workers' reports: docs/api.md) on the API socket in a loop;
  * a sustained load for --seconds: every VM inflates and deflates its
    8 MiB again and again while the same reads go on: API p50/p99 of each,
    the inflate buffers per second across all VMs, and the daemon's CPU per
    buffer (and idle, before any load);
  * a reconnect: one VM's frontend hangs up and a new one connects, starts
    and gets one inflate buffer back (the reference for the next line);
  * process isolation only: SIGKILL one VM's worker (its pid from the API's
    `worker.pid`) and time until a new frontend on that VM's socket has
    connected, started and had one inflate buffer acknowledged.

The summary prints medians over rounds per design and the ratios
process/none (USS total, API p99, throughput; lower memory and latency and
higher throughput are better). A daemon without `--vm-isolation` is
measured as "none" only, and the output says so.

The daemon starts with --daemon-nice (default -10, the systemd unit's
Nice=), so its workers run at 0, level with the load generator as they
would be with QEMU; the API reader runs at the daemon's nice, so that its
own wait for a CPU is not counted as the daemon's latency.

    python benchmarks/many_vms.py [--vms 64] [--rounds 2] [--seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.daemon import ApiClient, ApiError, DaemonProcess  # noqa: E402
from tests.frontend import PFNS_PER_BUFFER, FrontendTestError, TestFrontend  # noqa: E402

MIB = 1 << 20
PAGE = 4096
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Ends the run with one line."""


# ---------------------------------------------------------------- processes


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    """`root` and every process below it (workers are the forkserver's children)."""
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def smaps_rollup(pid: int) -> tuple[int, int]:
    """(PSS, USS) in bytes; (0, 0) for a process that is gone."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        return 0, 0
    return fields.get("Pss", 0), fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a pid from a reused one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def identities(pids: list[int]) -> dict[int, int]:
    return {pid: t for pid in pids if (t := start_time(pid)) is not None}


def reap_leftovers(tree: dict[int, int], mode: str, grace: float = 5.0) -> None:
    """After the daemon stopped, give what it started `grace` seconds to exit
    (the forkserver notices its parent is gone within a second or two), then
    SIGKILL the very processes that remain, each named on stderr."""
    deadline = time.monotonic() + grace
    alive = dict(tree)
    while alive and time.monotonic() < deadline:
        alive = {pid: t for pid, t in alive.items() if start_time(pid) == t}
        time.sleep(0.05)
    for pid, t in alive.items():
        if start_time(pid) == t:
            try:
                os.kill(pid, signal.SIGKILL)
                print(f"note: process {pid} of balloond ({mode}) outlived it by {grace:.0f} s; killed",
                      file=sys.stderr)
            except ProcessLookupError:
                pass


def worker_pids(api: ApiClient) -> dict[str, int]:
    return {v["name"]: v["worker"]["pid"] for v in api.vms() if (v.get("worker") or {}).get("pid")}


def has_isolation_flag() -> bool:
    out = subprocess.run([sys.executable, "-m", "balloond", "--help"], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=60)
    return "--vm-isolation" in out.stdout


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


# ---------------------------------------------------------------- API poller (its own process)


def api_poller(path: str, names: list[str], seconds: float, interval: float) -> None:
    """GET /v1/vms and GET /v1/vms/{name}, alternately, until `seconds` pass; JSON on stdout."""
    api = ApiClient(path, timeout=10.0)
    lat: dict[str, list[float]] = {"list": [], "one": []}
    errors: list[str] = []
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        kind, url = ("list", "/v1/vms") if i % 2 == 0 else ("one", f"/v1/vms/{names[(i // 2) % len(names)]}")
        t0 = time.perf_counter()
        try:
            status, body = api.call("GET", url)
            if status != 200:
                errors.append(f"{url}: HTTP {status}")
        except OSError as exc:
            errors.append(f"{url}: {exc}")
        lat[kind].append(time.perf_counter() - t0)
        i += 1
        if interval:
            time.sleep(interval)
    json.dump({"lat": lat, "errors": errors}, sys.stdout)


# ---------------------------------------------------------------- one daemon, measured


class Fleet:
    """One TestFrontend per VM, connected and started."""

    def __init__(self, daemon: DaemonProcess, args: argparse.Namespace) -> None:
        self.daemon = daemon
        self.args = args
        self.fes: dict[str, TestFrontend] = {}

    def new_frontend(self, name: str, timeout: float = 30.0) -> TestFrontend:
        fe = TestFrontend(self.daemon.sockets[name], ram_size=self.args.ram_mib * MIB, timeout=timeout,
                          connect=False)
        try:
            fe.connect()
            fe.start()
        except BaseException:
            fe.close()
            raise
        return fe

    def connect_all(self) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            for name, fe in zip(self.daemon.sockets, pool.map(self.new_frontend, self.daemon.sockets)):
                self.fes[name] = fe
        return time.perf_counter() - t0

    def pfns(self, fe: TestFrontend) -> list[int]:
        return list(range(fe.first_free_pfn, fe.first_free_pfn + self.args.inflate_mib * MIB // PAGE))

    def close(self) -> None:
        for fe in self.fes.values():
            try:
                fe.close()
            except OSError:
                pass
        self.fes.clear()


def run_threads(fleet: Fleet, body: Any) -> tuple[list[threading.Thread], list[Any], list[str]]:
    """body(fe, barrier) in one thread per VM, all released together; results and errors."""
    barrier = threading.Barrier(len(fleet.fes) + 1)
    results: list[Any] = [None] * len(fleet.fes)
    errors: list[str] = []

    def one(i: int, name: str, fe: TestFrontend) -> None:
        try:
            barrier.wait()
            results[i] = body(fe)
        except (FrontendTestError, OSError, TimeoutError, threading.BrokenBarrierError) as exc:
            errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(i, n, fe), daemon=True) for i, (n, fe) in enumerate(fleet.fes.items())]
    for t in threads:
        t.start()
    barrier.wait()
    return threads, results, errors


def memory(daemon: DaemonProcess, mode: str) -> dict[str, float]:
    pids = process_tree(daemon.pid)
    workers = set(worker_pids(daemon.api).values()) if mode == "process" else set()
    per = {pid: smaps_rollup(pid) for pid in pids}
    worker_uss = [per[p][1] for p in pids if p in workers]
    return {
        "procs": len(pids),
        "pss_total": sum(v[0] for v in per.values()),
        "uss_total": sum(v[1] for v in per.values()),
        "uss_supervisor": per[daemon.pid][1],
        "uss_worker_median": statistics.median(worker_uss) if worker_uss else float("nan"),
        "uss_worker_max": max(worker_uss) if worker_uss else float("nan"),
    }


def burst(fleet: Fleet) -> dict[str, float]:
    """Every VM inflates its populated 8 MiB at once; seconds until all acked, until all freed."""
    for fe in fleet.fes.values():
        fe.ram.populate(fe.first_free_pfn, fleet.args.inflate_mib * MIB // PAGE)
    before = {name: fe.ram.allocated_bytes() for name, fe in fleet.fes.items()}
    want = fleet.args.inflate_mib * MIB

    def body(fe: TestFrontend) -> float:
        fe.inflate(fleet.pfns(fe))
        return time.perf_counter()

    threads, results, errors = run_threads(fleet, body)
    t0 = time.perf_counter()
    for t in threads:
        t.join(fleet.args.seconds * 6)
    if errors or any(r is None for r in results):
        raise BenchError(f"burst inflate failed: {(errors or ['a VM did not finish in time'])[0]}")
    acked = max(results) - t0
    pending = dict(fleet.fes)
    while pending:
        for name in [n for n, fe in pending.items() if before[n] - fe.ram.allocated_bytes() >= want]:
            del pending[name]
        if time.perf_counter() - t0 > fleet.args.seconds * 6:
            raise BenchError(f"{len(pending)} VMs' memfds were not freed within {fleet.args.seconds * 6:.0f} s")
        time.sleep(0.002)
    freed = time.perf_counter() - t0

    threads, results, errors = run_threads(fleet, lambda fe: fe.deflate(fleet.pfns(fe)))
    for t in threads:
        t.join(fleet.args.seconds * 6)
    if errors:
        raise BenchError(f"burst deflate failed: {errors[0]}")
    return {"burst_acked_s": acked, "burst_freed_s": freed}


def start_poller(daemon: DaemonProcess, args: argparse.Namespace, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--api-poller", daemon.api_path, "--seconds", str(seconds),
         "--api-interval", str(args.api_interval), "--names", ",".join(daemon.sockets)],
        stdout=subprocess.PIPE, text=True,
        # At the daemon's priority: what is timed is the daemon's answer, not
        # the client's own wait for a CPU among 64 busy workers.
        preexec_fn=(lambda: os.nice(args.daemon_nice)) if args.daemon_nice else None)


def poller_result(poller: subprocess.Popen[str], timeout: float) -> dict[str, list[float]]:
    try:
        out, _ = poller.communicate(timeout=timeout)
    finally:
        if poller.poll() is None:
            poller.kill()
            poller.wait()
    polled = json.loads(out)
    if polled["errors"]:
        raise BenchError(f"API errors ({len(polled['errors'])}): {polled['errors'][0]}")
    return polled["lat"]


def idle_api(fleet: Fleet) -> dict[str, float]:
    """Reference: the same API reads with every VM connected and idle."""
    seconds = max(2.0, fleet.args.seconds / 3)
    lat = poller_result(start_poller(fleet.daemon, fleet.args, seconds), seconds * 6 + 30)
    return {"api_idle_p50_ms": pct(lat["list"] + lat["one"], 0.5) * 1e3,
            "api_idle_p99_ms": pct(lat["list"] + lat["one"], 0.99) * 1e3}


def sustained(fleet: Fleet, mode: str) -> dict[str, float]:
    """Inflate/deflate in every VM for --seconds while another process reads the API."""
    args = fleet.args
    daemon = fleet.daemon
    poller = start_poller(daemon, args, args.seconds)
    pids = process_tree(daemon.pid)
    cpu0 = cpu_seconds(pids)
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.monotonic() + args.seconds

    def body(fe: TestFrontend) -> int:
        pfns = fleet.pfns(fe)
        n = 0
        while time.monotonic() < deadline:
            n += fe.inflate(pfns)
            fe.deflate(pfns)
        return n

    try:
        threads, results, errors = run_threads(fleet, body)
        t0 = time.perf_counter()
        for t in threads:
            t.join(args.seconds * 6)
        elapsed = time.perf_counter() - t0
        if errors or any(r is None for r in results):
            raise BenchError(f"sustained load failed: {(errors or ['a VM did not finish in time'])[0]}")
        cpu = cpu_seconds(process_tree(daemon.pid)) - cpu0  # a worker that ended would be missing: none end here
        own1 = resource.getrusage(resource.RUSAGE_SELF)
    except BaseException:
        poller.kill()
        poller.wait()
        raise
    lat = poller_result(poller, args.seconds * 6 + 30)
    inflate_buffers = sum(results)
    return {
        "inflate_buf_s": inflate_buffers / elapsed,
        "load_s": elapsed,
        "daemon_cpu_us_per_buf": cpu / (2 * inflate_buffers) * 1e6,
        "daemon_cpu_share": cpu / elapsed,
        "loadgen_cpu_share": (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime) / elapsed,
        "api_list_p50_ms": pct(lat["list"], 0.5) * 1e3,
        "api_list_p99_ms": pct(lat["list"], 0.99) * 1e3,
        "api_one_p50_ms": pct(lat["one"], 0.5) * 1e3,
        "api_one_p99_ms": pct(lat["one"], 0.99) * 1e3,
        "api_p99_ms": pct(lat["list"] + lat["one"], 0.99) * 1e3,
        "api_requests": len(lat["list"]) + len(lat["one"]),
    }


def serve_one_buffer(fleet: Fleet, name: str, deadline: float) -> None:
    """A new frontend on `name` connects, starts and gets one inflate buffer back (retried until deadline)."""
    last = "no attempt"
    while time.perf_counter() < deadline:
        try:
            fe = fleet.new_frontend(name, timeout=max(0.5, min(5.0, deadline - time.perf_counter())))
        except (FrontendTestError, OSError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.005)
            continue
        try:
            fe.inflate(fleet.pfns(fe)[:PFNS_PER_BUFFER])
        except (FrontendTestError, OSError, TimeoutError) as exc:
            last = f"{type(exc).__name__}: {exc}"
            fe.close()
            continue
        fleet.fes[name] = fe
        return
    raise BenchError(f"VM {name} was not served again in time: {last}")


def reconnect(fleet: Fleet, name: str) -> float:
    """Reference: hang up a VM's frontend and serve it with a new one."""
    fleet.fes.pop(name).close()
    t0 = time.perf_counter()
    serve_one_buffer(fleet, name, t0 + 30)
    return time.perf_counter() - t0


def kill_recovery(fleet: Fleet, name: str) -> float:
    """SIGKILL the worker serving `name` (its frontend connected) and time until the VM is served again."""
    old = worker_pids(fleet.daemon.api).get(name)
    if old is None:
        raise BenchError(f"the API gives no worker.pid for {name}")
    stale = fleet.fes.pop(name)
    t0 = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    stale.close()  # QEMU sees the hang-up and reconnects
    serve_one_buffer(fleet, name, t0 + 60)
    elapsed = time.perf_counter() - t0
    new = worker_pids(fleet.daemon.api).get(name)
    if new in (None, old):
        raise BenchError(f"{name} was served but the API shows worker pid {new} (killed {old})")
    return elapsed


def run_design(mode: str, flag: bool, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    names = [f"vm{i:03d}" for i in range(args.vms)]
    extra = ["--stats-interval", "0", *(["--vm-isolation", mode] if flag else []), *args.daemon_args]
    daemon = DaemonProcess(workdir, vms=names, extra_args=extra, log_level="warning", nice=args.daemon_nice)
    fleet = Fleet(daemon, args)
    tree: dict[int, int] = {}
    t0 = time.perf_counter()
    try:
        try:
            daemon.start(timeout=120)
        except RuntimeError as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            raise BenchError(f"balloond ({mode}) failed to start: {lines[0]}"
                             + (f" — last log line: {lines[-1][:300]}" if len(lines) > 1 else "")) from None
        r: dict[str, float] = {"ready_s": time.perf_counter() - t0}
        tree.update(identities(process_tree(daemon.pid)))
        if mode == "process":
            daemon.wait_for(lambda: len(worker_pids(daemon.api)) == args.vms, 60, "a worker for every VM")
        try:
            r["connect_s"] = fleet.connect_all()
        except (FrontendTestError, OSError, TimeoutError) as exc:
            raise BenchError(f"connecting {args.vms} frontends ({mode}) failed: {type(exc).__name__}: {exc}") from None
        daemon.wait_for(lambda: all(v["connected"] for v in daemon.api.vms()), 30, "every VM connected")
        pids = process_tree(daemon.pid)
        tree.update(identities(pids))
        cpu0 = cpu_seconds(pids)
        time.sleep(args.settle)
        r["idle_cpu_share"] = (cpu_seconds(pids) - cpu0) / args.settle
        r.update(memory(daemon, mode))
        r.update(idle_api(fleet))
        r.update(burst(fleet))
        r.update(sustained(fleet, mode))
        time.sleep(args.settle)
        r["uss_total_after_load"] = memory(daemon, mode)["uss_total"]
        r["reconnect_s"] = statistics.median(reconnect(fleet, names[-1 - k]) for k in range(args.kills))
        if mode == "process" and flag:
            r["kill_recovery_s"] = statistics.median(kill_recovery(fleet, names[k]) for k in range(args.kills))
        tree.update(identities(process_tree(daemon.pid)))
        return r
    finally:
        fleet.close()
        if not daemon.alive and daemon.proc is not None and daemon.proc.returncode not in (0, -15, None):
            print(f"note: balloond ({mode}) exited with {daemon.proc.returncode}", file=sys.stderr)
        daemon.stop()
        reap_leftovers(tree, mode)


# ---------------------------------------------------------------- summary


ROWS = [
    # key, label, scale, unit, digits
    ("ready_s", "daemon ready", 1, "s", 2),
    ("connect_s", "all frontends started", 1, "s", 2),
    ("procs", "processes", 1, "", 0),
    ("pss_total", "PSS total, idle", MIB, "MiB", 1),
    ("uss_total", "USS total, idle", MIB, "MiB", 1),
    ("uss_supervisor", "USS supervisor", MIB, "MiB", 1),
    ("uss_worker_median", "USS per worker, median", MIB, "MiB", 2),
    ("uss_worker_max", "USS per worker, max", MIB, "MiB", 2),
    ("uss_total_after_load", "USS total, after load", MIB, "MiB", 1),
    ("idle_cpu_share", "daemon CPU idle (cores)", 1, "", 3),
    ("burst_acked_s", "burst: all VMs acked", 1, "s", 3),
    ("burst_freed_s", "burst: all memory freed", 1, "s", 3),
    ("inflate_buf_s", "inflate buffers/s (all VMs)", 1, "", 0),
    ("daemon_cpu_us_per_buf", "daemon CPU per buffer", 1, "us", 0),
    ("daemon_cpu_share", "daemon CPU (cores)", 1, "", 2),
    ("loadgen_cpu_share", "load generator CPU (cores)", 1, "", 2),
    ("api_idle_p50_ms", "API p50, all VMs idle", 1, "ms", 1),
    ("api_idle_p99_ms", "API p99, all VMs idle", 1, "ms", 1),
    ("api_requests", "API requests under load", 1, "", 0),
    ("api_list_p50_ms", "GET /v1/vms p50", 1, "ms", 1),
    ("api_list_p99_ms", "GET /v1/vms p99", 1, "ms", 1),
    ("api_one_p50_ms", "GET /v1/vms/{name} p50", 1, "ms", 1),
    ("api_one_p99_ms", "GET /v1/vms/{name} p99", 1, "ms", 1),
    ("api_p99_ms", "API p99, both", 1, "ms", 1),
    ("reconnect_s", "reconnect + 1 buffer", 1, "s", 3),
    ("kill_recovery_s", "worker SIGKILL -> served", 1, "s", 3),
]


def fmt(value: float | None, scale: float, digits: int) -> str:
    if value is None or value != value:
        return "-"
    return f"{value / scale:.{digits}f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vms", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=10.0, help="length of the sustained load (default 10)")
    p.add_argument("--ram-mib", type=int, default=64, help="guest RAM per VM (default 64)")
    p.add_argument("--inflate-mib", type=int, default=8, help="balloon per VM in each cycle (default 8)")
    p.add_argument("--api-interval", type=float, default=0.01, help="pause between API requests (default 0.01 s)")
    p.add_argument("--kills", type=int, default=3, help="workers killed (and VMs reconnected) per round (default 3)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="idle seconds (daemon CPU measured) before measuring memory (default 2)")
    p.add_argument("--daemon-nice", type=int, default=-10,
                   help="nice increment the daemon starts with (default -10, as the systemd unit's Nice=; "
                        "its workers add 10 to it); 0 when not root")
    p.add_argument("--daemon-arg", dest="daemon_args", action="append", default=[],
                   help="extra balloond argument for both designs (repeatable), e.g. --daemon-arg=--poll-us=0")
    p.add_argument("--api-poller", help=argparse.SUPPRESS)
    p.add_argument("--names", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.api_poller:
        api_poller(args.api_poller, args.names.split(","), args.seconds, args.api_interval)
        return 0
    if args.vms < 1 or args.rounds < 1 or args.kills < 1 or args.kills > args.vms:
        p.error("--vms, --rounds and --kills must be at least 1, and --kills at most --vms")
    if args.settle <= 0:
        p.error("--settle must be above 0")
    if not 0 < args.inflate_mib * MIB + (2 * MIB) <= args.ram_mib * MIB:
        p.error("--inflate-mib must leave room in --ram-mib for the driver's area")

    # Every frontend holds a memfd, a socket pair and ~20 eventfds; the daemon inherits the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    flag = has_isolation_flag()
    modes = ["process", "none"] if flag else ["none"]
    if not flag:
        print("note: this balloond has no --vm-isolation; measuring the single-process design only", flush=True)

    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    try:
        with tempfile.TemporaryDirectory(prefix="bd-many-") as tmp:
            for i in range(args.rounds):
                for mode in modes:
                    load = os.getloadavg()[0]
                    r = run_design(mode, flag, args, Path(tmp) / f"r{i}-{mode}")
                    results[mode].append(r)
                    line = (f"round {i + 1}/{args.rounds} {mode:7} (host load {load:.1f}): USS {r['uss_total'] / MIB:7.1f} MiB "
                            f"(PSS {r['pss_total'] / MIB:7.1f}) in {r['procs']:.0f} procs  "
                            f"{r['inflate_buf_s']:7.0f} buf/s  API p50/p99 {r['api_list_p50_ms']:.1f}/"
                            f"{r['api_p99_ms']:.1f} ms  burst {r['burst_acked_s']:.2f}s")
                    if "kill_recovery_s" in r:
                        line += f"  kill->served {r['kill_recovery_s']:.3f}s"
                    print(line, flush=True)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ApiError as exc:
        print(f"error: the API answered {exc}", file=sys.stderr)
        return 1

    def med(mode: str, key: str) -> float | None:
        values = [r[key] for r in results[mode] if key in r]
        return statistics.median(values) if values else None

    print(f"\n{args.vms} VMs, {args.ram_mib} MiB guest RAM each, {args.inflate_mib} MiB balloon per VM in "
          f"256-PFN buffers, {args.seconds:g} s of load; medians of {args.rounds} round(s)"
          + f"; daemon started at nice {args.daemon_nice:+d}"
          + (f"; balloond {' '.join(args.daemon_args)}" if args.daemon_args else ""))
    head = f"{'':30}" + "".join(f"{m:>12}" for m in modes)
    print(head + (f"{'process/none':>14}" if flag else ""))
    for key, label, scale, unit, digits in ROWS:
        if all(med(m, key) is None for m in modes):
            continue
        row = f"{label + (f' ({unit})' if unit else ''):30}" + "".join(f"{fmt(med(m, key), scale, digits):>12}"
                                                                        for m in modes)
        print(row)
    if flag:
        print()
        for key, label, better in (("uss_total", "USS total", "lower is better"),
                                   ("api_idle_p99_ms", "API p99, idle", "lower is better"),
                                   ("api_p99_ms", "API p99, load", "lower is better; goal p99 < 50 ms"),
                                   ("inflate_buf_s", "inflate throughput", "higher is better")):
            a, b = med("process", key), med("none", key)
            ratio = a / b if a is not None and b else float("nan")
            print(f"ratio process/none, {label + ':':20} {ratio:6.2f}  ({better})")
        a, b = med("process", "kill_recovery_s"), med("process", "reconnect_s")
        if a is not None and b:
            print(f"worker killed -> VM served again: {a:.3f} s, {a / b:.1f}x a plain reconnect ({b:.3f} s)")
    else:
        print("(process isolation not measured: the daemon has no --vm-isolation)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
