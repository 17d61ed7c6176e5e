"""Run the real balloond as a subprocess and talk to its control API.

`DaemonProcess` starts `python -m balloond` with one vhost-user socket per VM
and an API socket in a scratch directory, waits until the API answers, and
stops it with SIGTERM. `ApiClient` is a small HTTP/1.1 client over the API's
Unix socket (the standard library's http.client, connected with AF_UNIX).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from balloond.services.cli import UnixHTTPConnection

REPO = Path(__file__).resolve().parents[1]


class ApiError(Exception):
    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class ApiClient:
    def __init__(self, path: str | os.PathLike[str], timeout: float = 5.0) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout

    def call(self, method: str, url: str, body: Any = None) -> tuple[int, Any]:
        """One request on a fresh connection; returns (status, JSON or text)."""
        conn = UnixHTTPConnection(self.path, self.timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, url, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.getheader("Content-Type", "").startswith("application/json"):
                return resp.status, json.loads(raw)
            return resp.status, raw.decode(errors="replace")
        finally:
            conn.close()

    def get(self, url: str) -> Any:
        status, body = self.call("GET", url)
        if status != 200:
            raise ApiError(status, body)
        return body

    def put(self, url: str, body: Any) -> Any:
        status, reply = self.call("PUT", url, body)
        if status != 200:
            raise ApiError(status, reply)
        return reply

    # ------------------------------------------------------------ shortcuts

    def vms(self) -> list[dict[str, Any]]:
        return self.get("/v1/vms")

    def vm(self, name: str, fresh: bool = True) -> dict[str, Any]:
        """One VM's state. Tests read what they just made a frontend or guest
        do, so by default the VM's worker is asked (`?fresh=1`); fresh=False
        is the operator's default read, from the worker's last report."""
        return self.get(f"/v1/vms/{name}" + ("?fresh=1" if fresh else ""))

    def set_target(self, name: str, nbytes: int) -> dict[str, Any]:
        return self.put(f"/v1/vms/{name}/target", {"bytes": nbytes})

    def pfns(self, name: str) -> dict[str, Any]:
        return self.get(f"/v1/vms/{name}/pfns")

    def pfn_set(self, name: str) -> set[int]:
        out: set[int] = set()
        for first, count in self.pfns(name)["ranges"]:
            out.update(range(first, first + count))
        return out

    def metrics(self) -> str:
        status, body = self.call("GET", "/metrics")
        if status != 200:
            raise ApiError(status, body)
        return body


def _live_members(pgid: int) -> list[int]:
    """Processes of group `pgid` that are not zombies."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            live.append(int(entry))
    return live


class DaemonProcess:
    """balloond in a subprocess, serving `vms` from sockets in `workdir`."""

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        vms: Sequence[str] = ("vm0",),
        *,
        stats_interval: float | None = None,
        extra_args: Sequence[str] = (),
        log_level: str = "debug",
        vm_options: Mapping[str, str] | None = None,
        nice: int = 0,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sockets = {name: str(self.workdir / f"{name}.sock") for name in vms}
        self.api_path = str(self.workdir / "api.sock")
        self.log_path = self.workdir / "balloond.log"
        self.stats_interval = stats_interval
        self.extra_args = list(extra_args)
        self.log_level = log_level
        #: Per VM, what follows the socket in its --vm option ("qmp=PATH,headroom=96M").
        self.vm_options = dict(vm_options or {})
        #: Added to the daemon's nice value at start (the systemd unit's Nice=).
        self.nice = nice
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = ApiClient(self.api_path)

    @property
    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "balloond"]
        for name, path in self.sockets.items():
            options = self.vm_options.get(name)
            argv += ["--vm", f"{name}={path}" + (f",{options}" if options else "")]
        argv += ["--api", self.api_path, "--log-format", "json", "--log-level", self.log_level]
        if self.stats_interval is not None:
            argv += ["--stats-interval", str(self.stats_interval)]
        return argv + self.extra_args

    def start(self, timeout: float = 15.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("NOTIFY_SOCKET", None)
        log = open(self.log_path, "ab")
        try:
            # Its own process group: `kill` reaches the supervisor, its
            # forkserver and every VM's worker at once.
            renice = (lambda: os.nice(self.nice)) if self.nice else None
            self.proc = subprocess.Popen(self.argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         start_new_session=True, preexec_fn=renice)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"balloond exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.api.vms()
                if all(os.path.exists(p) for p in self.sockets.values()):
                    return
            except (OSError, ApiError, http.client.HTTPException):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"balloond's API did not answer within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the whole daemon (supervisor, forkserver, workers), as
        systemd's control-group kill does, and wait until none is left: a
        worker outliving its supervisor by a few milliseconds could still
        serve a buffer, which a test of "the daemon is dead" must not see."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout)
        deadline = time.monotonic() + timeout
        while _live_members(pgid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of balloond's group {pgid} still alive after SIGKILL")
            time.sleep(0.01)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    # ---------------------------------------------------------------- logs

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def log_records(self, since: int = 0) -> list[dict[str, Any]]:
        """JSON log records written after byte offset `since` (other lines as {"raw": ...})."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(since)
                data = f.read()
        except OSError:
            return []
        out = []
        for line in data.decode(errors="replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                out.append(rec if isinstance(rec, dict) else {"raw": line})
            except json.JSONDecodeError:
                out.append({"raw": line})
        return out

    # ----------------------------------------------------------- waiting

    def policy_targets(self) -> list[dict[str, Any]]:
        """Every target the policy set, from the log (vm, action, target_bytes, old_bytes, reason)."""
        return [r for r in self.log_records() if r.get("event") == "policy target"]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def wait_vm(self, name: str, predicate: Callable[[dict[str, Any]], Any], timeout: float = 5.0, what: str = "") -> dict[str, Any]:
        """Poll GET /v1/vms/{name} until `predicate(state)` holds; return the state."""
        last: dict[str, Any] = {}

        def check() -> Any:
            nonlocal last
            last = self.api.vm(name)
            return predicate(last)

        try:
            self.wait_for(check, timeout, what or f"VM {name}")
        except TimeoutError:
            raise TimeoutError(f"timed out waiting for {what or 'a condition'} on {name}; last state: {last}") from None
        return last

    def wait_disconnected(self, name: str, timeout: float = 5.0) -> None:
        self.wait_vm(name, lambda s: not s["connected"], timeout, "the frontend to be gone")
