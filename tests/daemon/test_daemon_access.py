"""Who may call the control API: peer credentials (SO_PEERCRED).

The real daemon is asked from forked children that drop to other users
(nobody, uid 65534, and uid/gid 65533, which need not exist). The API socket
is created 0600; the tests chmod it 0666 and put it in a world-searchable
directory, so the file system lets everyone connect and what is tested is
the credential check itself. The policy (access.py) and the middleware are
also tested in-process, with a real ControlApi on a Unix socket and with a
fake transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from balloond.services.access import UCRED, AccessPolicy, PeerCredentials, access_middleware, peer_credentials
from balloond.services.api import ControlApi
from balloond.services.cli import UnixHTTPConnection
from harness.loop_thread import LoopThread
from tests.daemon.harness import REPO, DaemonProcess

NOBODY = 65534
STRANGER = 65533  # no such user is needed: the kernel takes any uid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


def call_as(uid: int, gid: int, path: str, method: str = "GET", url: str = "/v1/vms", body: Any = None) -> dict[str, Any]:
    """One API request from a forked child running as uid/gid (no supplementary
    groups). Returns {"status", "body", "pid"} or {"error"}."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        out: dict[str, Any]
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            conn = UnixHTTPConnection(path, 5.0)
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, url, body=data, headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            raw = resp.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            out = {"status": resp.status, "body": parsed, "pid": os.getpid()}
        except BaseException as exc:
            out = {"error": repr(exc), "pid": os.getpid()}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"error": "child said nothing"}')
    assert "error" not in result, f"request as uid {uid} failed: {result['error']}"
    return result


def open_to_everyone(path: str) -> None:
    """What the test needs from the file system: every user may connect."""
    os.chmod(path, 0o666)


# ============================================================ the real daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    """Our own daemon, in a directory other users can search (pytest's are 0700)."""
    workdir = tempfile.mkdtemp(prefix="balloond-access-")
    os.chmod(workdir, 0o711)
    proc = DaemonProcess(workdir, vms=("vm0",), extra_args=["--discard-delay-ms", "0"])
    proc.start()
    proc.initial_api_mode = stat.S_IMODE(os.stat(proc.api_path).st_mode)  # type: ignore[attr-defined]
    open_to_everyone(proc.api_path)
    yield proc
    alive = proc.alive
    code = proc.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    assert alive, f"balloond died during the module:\n{proc.log_tail()}"
    assert code == 0, f"balloond exited with {code} on SIGTERM:\n{proc.log_tail()}"


def refusals(daemon: DaemonProcess, since: int) -> list[dict[str, Any]]:
    return [r for r in daemon.log_records(since) if r.get("event") == "API request refused"]


def test_api_socket_is_0600_by_default(daemon):
    assert daemon.initial_api_mode == 0o600


def test_root_is_served(daemon):
    result = call_as(0, 0, daemon.api_path)
    assert result["status"] == 200
    assert [vm["name"] for vm in result["body"]] == ["vm0"]


def test_other_user_gets_403_and_one_log_line(daemon):
    since = daemon.log_size()
    result = call_as(NOBODY, NOBODY, daemon.api_path)
    assert result["status"] == 403
    assert set(result["body"]) == {"error"}
    assert str(NOBODY) in result["body"]["error"]
    lines = daemon.wait_for(lambda: refusals(daemon, since), what="the refusal's log line")
    assert len(lines) == 1
    line = lines[0]
    assert (line["pid"], line["uid"], line["gid"]) == (result["pid"], NOBODY, NOBODY)
    # Refused at accept, before the request is read: the line names the peer, not the request.
    assert line["level"] == "warning" and "path" not in line and "method" not in line


def test_refused_write_changes_nothing(daemon):
    before = daemon.api.vm("vm0")["target_bytes"]
    for path in ("/v1/vms/vm0/target", "/v1/vms/vm0/stats-interval"):
        key = "bytes" if path.endswith("target") else "seconds"
        result = call_as(STRANGER, STRANGER, daemon.api_path, "PUT", path, {key: 1 << 20})
        assert result["status"] == 403
    assert call_as(STRANGER, STRANGER, daemon.api_path, url="/metrics")["status"] == 403
    assert call_as(STRANGER, STRANGER, daemon.api_path, url="/no/such/path")["status"] == 403
    assert daemon.api.vm("vm0")["target_bytes"] == before


@contextlib.contextmanager
def own_daemon(extra_args: list[str] = (), config: str | None = None) -> Iterator[DaemonProcess]:
    """A daemon of the test's own (fresh rate limiter, its own access flags),
    in a directory every user may search; `config` is written to a TOML file
    passed with --config."""
    workdir = tempfile.mkdtemp(prefix="balloond-access-")
    os.chmod(workdir, 0o711)
    args = list(extra_args)
    if config is not None:
        path = os.path.join(workdir, "balloond.toml")
        with open(path, "w") as f:
            f.write(config)
        args += ["--config", path]
    proc = DaemonProcess(workdir, vms=("vm0",), extra_args=args)
    try:
        proc.start()
        open_to_everyone(proc.api_path)
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def test_refusals_are_rate_limited():
    """5 lines per 10 s, counted on a daemon nobody has been refused by yet:
    12 refusals in a burst log exactly the first 5."""
    with own_daemon() as proc:
        since = proc.log_size()
        pids = [call_as(STRANGER, STRANGER, proc.api_path) for _ in range(12)]
        assert [r["status"] for r in pids] == [403] * 12
        assert call_as(0, 0, proc.api_path)["status"] == 200  # the API still serves root
        lines = refusals(proc, since)
        assert len(lines) == 5, f"{len(lines)} log lines for 12 refusals"
        assert [line["pid"] for line in lines] == [r["pid"] for r in pids[:5]]


ALLOW_CASES = [
    ("uid", NOBODY, (NOBODY, NOBODY), True),
    ("uid", NOBODY, (STRANGER, STRANGER), False),
    ("gid", STRANGER, (NOBODY, STRANGER), True),
    ("gid", STRANGER, (NOBODY, NOBODY), False),
]


def check_access(proc: DaemonProcess, peer: tuple[int, int], allowed: bool) -> None:
    result = call_as(*peer, proc.api_path)
    assert result["status"] == (200 if allowed else 403), result
    if allowed:
        assert [vm["name"] for vm in result["body"]] == ["vm0"]
    assert call_as(0, 0, proc.api_path)["status"] == 200


@pytest.mark.parametrize("kind, value, peer, allowed", ALLOW_CASES)
def test_allowed_uids_and_gids_flags(kind, value, peer, allowed):
    with own_daemon([f"--api-allow-{kind}", str(value)]) as proc:
        check_access(proc, peer, allowed)


@pytest.mark.parametrize("kind, value, peer, allowed", ALLOW_CASES)
def test_allowed_uids_and_gids_in_the_config_file(kind, value, peer, allowed):
    with own_daemon(config=f"api_allow_{kind}s = [{value}]\n") as proc:
        check_access(proc, peer, allowed)


def test_config_file_and_flags_add_up():
    """A uid from the file and one from the command line are both served."""
    with own_daemon(["--api-allow-uid", str(STRANGER)], config=f"api_allow_uids = [{NOBODY}]\n") as proc:
        for uid in (NOBODY, STRANGER):
            assert call_as(uid, uid, proc.api_path)["status"] == 200, uid
        assert call_as(STRANGER - 1, STRANGER - 1, proc.api_path)["status"] == 403


@pytest.mark.parametrize("args, toml", [
    (["--api-allow-uid", "-1"], None),
    (["--api-allow-gid", "4294967295"], None),
    (["--api-allow-uid", "root"], None),
    ([], 'api_allow_uids = ["nobody"]\n'),
    ([], "api_allow_gids = [true]\n"),
    ([], "api_allow_gids = [1.5]\n"),
    ([], "api_allow_uids = 65534\n"),
])
def test_bad_allowed_ids_are_one_line_and_exit_2(tmp_path, args, toml):
    if toml is not None:
        (tmp_path / "b.toml").write_text(toml)
        args = [*args, "--config", str(tmp_path / "b.toml")]
    p = subprocess.run([sys.executable, "-m", "balloond", "--vm", f"a={tmp_path / 'a.sock'}", *args],
                       cwd=REPO, capture_output=True, text=True, timeout=30)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("balloond: ") and p.stderr.count("\n") == 1, p.stderr
    assert "api" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "a.sock").exists()


# ============================================= in-process: ControlApi and policy


class ServedApi:
    """A ControlApi with no VMs on a Unix socket, its loop in a thread."""

    def __init__(self, **kw: Any) -> None:
        self.dir = tempfile.mkdtemp(prefix="balloond-access-")
        os.chmod(self.dir, 0o711)
        self.path = os.path.join(self.dir, "api.sock")
        self.loop = LoopThread("served-api")
        self.api = ControlApi({}, **kw)
        self.loop.call(self.api.start(self.path))
        open_to_everyone(self.path)

    def close(self) -> None:
        self.loop.call(self.api.stop())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("kw, peer, status", [
    ({}, (0, 0), 200),
    ({}, (NOBODY, NOBODY), 403),
    ({"allowed_uids": [NOBODY]}, (NOBODY, NOBODY), 200),
    ({"allowed_uids": [NOBODY]}, (STRANGER, NOBODY), 403),
    ({"allowed_gids": [STRANGER]}, (NOBODY, STRANGER), 200),
    ({"allowed_gids": [STRANGER]}, (STRANGER, NOBODY), 403),
])
def test_control_api_peer_check(kw, peer, status):
    served = ServedApi(**kw)
    try:
        result = call_as(*peer, served.path)
        assert result["status"] == status, result
        if status == 403:
            assert set(result["body"]) == {"error"}
        else:
            assert result["body"] == []
    finally:
        served.close()


def test_policy_rules():
    policy = AccessPolicy(own_uid=1000)
    assert policy.allows(PeerCredentials(1, 0, 0))
    assert policy.allows(PeerCredentials(1, 1000, 5))
    assert not policy.allows(PeerCredentials(1, 1001, 1000))  # a gid equal to our uid means nothing
    assert not policy.allows(None)
    policy = AccessPolicy([2000], [3000], own_uid=1000)
    assert policy.allows(PeerCredentials(1, 2000, 7))
    assert policy.allows(PeerCredentials(1, 7, 3000))
    assert not policy.allows(PeerCredentials(1, 3000, 2000))
    assert policy.describe() == {"uids": [0, 1000, 2000], "gids": [3000]}
    assert AccessPolicy().own_uid == os.getuid()
    for bad in ([-1], [1 << 32]):
        with pytest.raises(ValueError):
            AccessPolicy(bad)


def test_peer_credentials_of_a_real_socket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        assert peer_credentials(a) == PeerCredentials(os.getpid(), os.getuid(), os.getgid())
    finally:
        a.close()
        b.close()
    assert peer_credentials(None) is None
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert peer_credentials(tcp) is None
    finally:
        tcp.close()


class FakeSocket:
    family = socket.AF_UNIX

    def __init__(self, pid: int, uid: int, gid: int) -> None:
        self.raw = UCRED.pack(pid, uid, gid)

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option, size) == (socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
        return self.raw


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))


def _call_middleware(policy: AccessPolicy, sock: Any, log: Recorder) -> web.StreamResponse:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: sock if name == "socket" else default
    request = make_mocked_request("PUT", "/v1/vms/a/target", transport=transport)

    async def handler(req: web.Request) -> web.Response:
        return web.json_response({"served": True})

    return asyncio.run(access_middleware(policy, log)(request, handler))


def test_middleware_refuses_and_logs_pid_uid_gid():
    log = Recorder()
    policy = AccessPolicy(own_uid=1000)
    resp = _call_middleware(policy, FakeSocket(4242, 1001, 1001), log)
    assert resp.status == 403
    assert json.loads(resp.body) == {"error": "permission denied for uid 1001 (gid 1001)"}
    assert log.lines == [("API request refused", {"pid": 4242, "uid": 1001, "gid": 1001, "method": "PUT", "path": "/v1/vms/a/target"})]
    resp = _call_middleware(policy, FakeSocket(4242, 1000, 1001), log)
    assert resp.status == 200 and json.loads(resp.body) == {"served": True}
    assert len(log.lines) == 1


def test_middleware_fails_closed_without_credentials():
    log = Recorder()
    resp = _call_middleware(AccessPolicy(own_uid=1000), None, log)
    assert resp.status == 403 and "error" in json.loads(resp.body)
    assert [e for e, _ in log.lines] == ["API request refused: peer unknown"]


def test_middleware_log_is_rate_limited():
    log = Recorder()
    policy = AccessPolicy(own_uid=1000)
    for uid in range(2000, 2050):
        assert _call_middleware_shared(policy, FakeSocket(1, uid, uid), log).status == 403
    assert len(log.lines) == 5


_shared: dict[int, Any] = {}


def _call_middleware_shared(policy: AccessPolicy, sock: Any, log: Recorder) -> web.StreamResponse:
    """Like _call_middleware, but one middleware (one rate limiter) across calls."""
    middleware = _shared.setdefault(id(log), access_middleware(policy, log))
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: sock if name == "socket" else default
    request = make_mocked_request("GET", "/v1/vms", transport=transport)

    async def handler(req: web.Request) -> web.Response:
        return web.json_response([])

    return asyncio.run(middleware(request, handler))


def test_ucred_layout():
    assert UCRED.size == 12 == struct.calcsize("3i")
