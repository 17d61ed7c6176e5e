"""How VM sockets come to be: created with tight permissions, or inherited
already listening (as libvirt and systemd hand them over)."""

from __future__ import annotations

import grp
import os
import socket
import stat
import subprocess
import sys
import time

from harness.daemon import REPO, ApiClient
from tests.frontend import TestFrontend


def wait_api(api: ApiClient, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "daemon exited"
        try:
            api.vms()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_daemon(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "balloond", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def test_sockets_are_private_by_default_and_group_shared_on_request(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    api = ApiClient(tmp_path / "api.sock")
    proc = run_daemon(["--vm", f"a={tmp_path / 'a.sock'}", "--api", str(tmp_path / "api.sock"),
                       "--socket-group", group])
    try:
        wait_api(api, proc)
        mode = stat.S_IMODE(os.stat(tmp_path / "a.sock").st_mode)
        assert mode == 0o660 and os.stat(tmp_path / "a.sock").st_gid == os.getgid()
        assert stat.S_IMODE(os.stat(tmp_path / "api.sock").st_mode) == 0o600
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    api = ApiClient(tmp_path / "api2.sock")
    proc = run_daemon(["--vm", f"b={tmp_path / 'b.sock'}", "--api", str(tmp_path / "api2.sock")])
    try:
        wait_api(api, proc)
        assert stat.S_IMODE(os.stat(tmp_path / "b.sock").st_mode) == 0o600
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not (tmp_path / "b.sock").exists(), "the daemon leaves no socket behind on SIGTERM"


def test_inherited_listening_socket_serves_a_vm(tmp_path):
    path = str(tmp_path / "inherited.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    api = ApiClient(tmp_path / "api.sock")
    proc = run_daemon(["--vm", f"inh=fd:{fd}", "--api", str(tmp_path / "api.sock")], pass_fds=[fd])
    listener.close()
    try:
        wait_api(api, proc)
        fe = TestFrontend(path)
        fe.start()
        fe.ram.touch(range(fe.first_free_pfn, fe.first_free_pfn + 256))
        fe.inflate(range(fe.first_free_pfn, fe.first_free_pfn + 256))
        deadline = time.monotonic() + 5
        while api.vm("inh")["ballooned_bytes"] != 256 * 4096:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fe.close()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_an_fd_that_is_not_a_listening_socket_is_a_clear_error(tmp_path):
    r, w = os.pipe()
    proc = run_daemon(["--vm", f"x=fd:{r}"], pass_fds=[r])
    _, err = proc.communicate(timeout=15)
    os.close(r)
    os.close(w)
    assert proc.returncode == 1 and b"is not a listening Unix socket" in err and b"Traceback" not in err
