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


def other_group() -> grp.struct_group:
    """A group that exists and is not ours, so a chown to it can be seen:
    `kvm` (what the service uses) or `disk` (on every Debian system)."""
    for name in ("kvm", "disk"):
        try:
            group = grp.getgrnam(name)
        except KeyError:
            continue
        if group.gr_gid != os.getgid():
            return group
    raise AssertionError("neither group kvm nor group disk exists on this machine")


def test_sockets_are_private_by_default_and_group_shared_on_request(tmp_path):
    group = other_group()
    api = ApiClient(tmp_path / "api.sock")
    proc = run_daemon(["--vm", f"a={tmp_path / 'a.sock'}", "--api", str(tmp_path / "api.sock"),
                       "--socket-group", group.gr_name])
    try:
        wait_api(api, proc)
        st = os.stat(tmp_path / "a.sock")
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, group.gr_gid), \
            f"mode {stat.S_IMODE(st.st_mode):o}, gid {st.st_gid}; want 660 and {group.gr_name} ({group.gr_gid})"
        api_st = os.stat(tmp_path / "api.sock")
        assert stat.S_IMODE(api_st.st_mode) == 0o600 and api_st.st_gid == os.getgid(), "the API socket stays private"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    api = ApiClient(tmp_path / "api2.sock")
    proc = run_daemon(["--vm", f"b={tmp_path / 'b.sock'}", "--api", str(tmp_path / "api2.sock")])
    try:
        wait_api(api, proc)
        st = os.stat(tmp_path / "b.sock")
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, os.getgid())
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not (tmp_path / "b.sock").exists(), "the daemon leaves no socket behind on SIGTERM"


def test_an_unknown_socket_group_is_one_line_and_exit_1(tmp_path):
    """Found when the socket is made (exit 1, like any socket the daemon cannot set up)."""
    proc = run_daemon(["--vm", f"a={tmp_path / 'a.sock'}", "--socket-group", "no-such-group-here"])
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 1, err
    assert err.count(b"\n") == 1 and b"no-such-group-here" in err and b"Traceback" not in err, err


def inflate_and_see(api: ApiClient, path: str, vm: str, pages: int = 256) -> None:
    """A frontend on `path` inflates `pages` frames; the daemon's VM `vm` tracks exactly them."""
    fe = TestFrontend(path)
    try:
        fe.start()
        first = fe.first_free_pfn
        fe.ram.touch(range(first, first + pages))
        fe.inflate(range(first, first + pages))
        deadline = time.monotonic() + 5
        while (state := api.vm(vm))["ballooned_bytes"] != pages * 4096:
            assert time.monotonic() < deadline, f"{vm}: {state['ballooned_bytes']} bytes ballooned, want {pages * 4096}"
            time.sleep(0.05)
        assert api.pfn_set(vm) == set(range(first, first + pages))
    finally:
        fe.close()


def test_socket_path_convention_serves_one_vm_named_default(tmp_path):
    """--socket-path PATH (the vhost-user backend convention) = --vm default=PATH."""
    path = tmp_path / "backend.sock"
    api = ApiClient(tmp_path / "api.sock")
    proc = run_daemon(["--socket-path", str(path), "--api", str(tmp_path / "api.sock")])
    try:
        wait_api(api, proc)
        assert [vm["name"] for vm in api.vms()] == ["default"]
        assert stat.S_ISSOCK(os.stat(path).st_mode) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
        inflate_and_see(api, str(path), "default")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert not path.exists()


def test_fd_convention_serves_one_vm_named_default_on_the_inherited_socket(tmp_path):
    """--fd N: a listening socket the caller (libvirt, systemd) opened; the daemon neither creates nor removes it."""
    path = str(tmp_path / "handed-over.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    api = ApiClient(tmp_path / "api.sock")
    proc = run_daemon(["--fd", str(fd), "--api", str(tmp_path / "api.sock")], pass_fds=[fd])
    listener.close()
    try:
        wait_api(api, proc)
        assert [vm["name"] for vm in api.vms()] == ["default"]
        inflate_and_see(api, path, "default")
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert os.path.exists(path), "a socket the daemon did not create is not the daemon's to remove"


def test_socket_path_and_fd_together_are_refused_in_one_line(tmp_path):
    proc = run_daemon(["--socket-path", str(tmp_path / "a.sock"), "--fd", "3"])
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 2 and err.count(b"\n") == 1 and b"default" in err and b"Traceback" not in err, err


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
