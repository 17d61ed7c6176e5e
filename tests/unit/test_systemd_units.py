"""The files in systemd/: the unit verifies and is hardened as documented,
sysusers/tmpfiles entries apply, the QEMU backend description follows QEMU's
schema, the example configuration loads, and the daemon really runs inside
the unit's sandbox.

The last needs systemd as PID 1, which test machines do not have, so the
sandbox is rebuilt by hand from the unit's own settings (root only):
  User=/Group=/SupplementaryGroups=  setpriv to nobody:nogroup (+ kvm)
  NoNewPrivileges=, CapabilityBoundingSet=  setpriv --no-new-privs --bounding-set=-all
  PrivateNetwork=                   a new network namespace (unshare -n)
  ProtectSystem=strict, RuntimeDirectory=  a mount namespace with / read-only and
                                    only the runtime directory writable
  ProtectHome=, PrivateTmp=         empty tmpfs over /root, /home, /run/user, /tmp, /var/tmp
  SystemCallFilter=                 a seccomp allow-list of exactly the system calls
                                    `systemd-analyze syscall-filter` expands the unit's
                                    lines to (others fail with EPERM)
  RestrictAddressFamilies=AF_UNIX   seccomp: socket() of any other family fails
  MemoryDenyWriteExecute=           seccomp rules as systemd 252 sets them (no W+X mmap,
                                    no mprotect(PROT_EXEC), no shmat(SHM_EXEC)), and
                                    the kernel's PR_SET_MDWE as newer systemd uses
The seccomp filters are built with libseccomp (libseccomp2, which systemd
itself depends on) through ctypes.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import tomllib
from pathlib import Path

import pytest

from balloond.services import config
from balloond.worker.process import WORKER_NICE
from balloond.services.policy import PolicyConfig, VmPolicySettings

REPO = Path(__file__).resolve().parents[2]
SYSTEMD = REPO / "systemd"
UNIT = SYSTEMD / "balloond.service"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: apt-get install systemd (scripts/setup.sh installs it)")
    return path


def unit_entries(path: Path = UNIT) -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; repeated keys kept."""
    section = ""
    out = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def unit_values(key: str) -> list[str]:
    return [v for _, k, v in unit_entries() if k == key]


def installed_copy(tmp: Path) -> Path:
    """The unit with ExecStart at the balloond this interpreter has (verify
    insists that the binary exists and is executable)."""
    balloond = Path(sys.executable).parent / "balloond"
    if not os.access(balloond, os.X_OK):
        pytest.fail(f"no balloond console script next to {sys.executable} (pip install -e .)")
    text = UNIT.read_text().replace("ExecStart=/usr/bin/balloond", f"ExecStart={balloond}")
    assert str(balloond) in text
    out = tmp / "balloond.service"
    out.write_text(text)
    return out


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("systemd-analyze"), "verify", "--man=no", str(path)], check=False,
                          capture_output=True, text=True, cwd=path.parent, timeout=120)


# ------------------------------------------------------------------ the unit


def test_unit_verifies_without_warnings(tmp_path):
    result = verify(installed_copy(tmp_path))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "balloond.service" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
    # verify exits 0 even for unknown keys: make sure such warnings are seen
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nProtectSytem=strict\nType=notifyy\n")
    result = verify(bad)
    assert "Unknown key" in result.stderr and "Failed to parse service type" in result.stderr


def test_unit_exposure_is_low(tmp_path):
    result = subprocess.run([_tool("systemd-analyze"), "security", "--offline=yes", "--no-pager",
                             str(installed_copy(tmp_path))], check=False, capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for balloond\.service: ([0-9.]+) (\w+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= 1.0 and m.group(2) == "SAFE", result.stdout


def test_unit_settings():
    single = {k: v for _, k, v in unit_entries()}
    assert single["Type"] == "notify"
    assert single["ExecStart"] == "/usr/bin/balloond --config /etc/balloond/balloond.toml"
    assert (single["User"], single["Group"], single["RuntimeDirectory"]) == ("balloond", "balloond", "balloond")
    assert single["SupplementaryGroups"] == "kvm"
    for key, value in {
        "NoNewPrivileges": "yes", "CapabilityBoundingSet": "", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateNetwork": "yes", "RestrictAddressFamilies": "AF_UNIX",
        "MemoryDenyWriteExecute": "yes", "LockPersonality": "yes", "RestrictRealtime": "yes",
        "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "SystemCallArchitectures": "native",
    }.items():
        assert single.get(key) == value, key
    assert unit_values("SystemCallFilter")[0] == "@system-service"
    # the control plane ahead of the workers, the workers level with QEMU
    assert int(single["Nice"]) + WORKER_NICE == 0
    # these would break the daemon (see the comments in the unit)
    assert "ProcSubset" not in single and "PrivateUsers" not in single
    # the example configuration gives sockets to the group the unit joins
    example = tomllib.loads((SYSTEMD / "balloond.toml.example").read_text())
    assert example["socket_group"] == single["SupplementaryGroups"]
    assert all(vm["socket"].startswith(f"/run/{single['RuntimeDirectory']}/") for vm in example["vm"] if "socket" in vm)


def expand_syscall_set(spec: str, _cache: dict[str, set[str]] = {}) -> set[str]:  # noqa: B006
    if spec not in _cache:
        out = subprocess.run([_tool("systemd-analyze"), "syscall-filter", "--no-pager", spec],
                             capture_output=True, text=True, check=True, timeout=60).stdout
        names: set[str] = set()
        for line in out.splitlines()[1:]:
            item = line.strip()
            if not item or item.startswith("#"):
                continue
            names |= expand_syscall_set(item) if item.startswith("@") else {item}
        _cache[spec] = names
    return _cache[spec]


def allowed_syscalls() -> set[str]:
    """The unit's SystemCallFilter= lines as systemd applies them: the first
    is an allow-list; later ones add, or remove with "~"."""
    allowed: set[str] = set()
    for i, line in enumerate(unit_values("SystemCallFilter")):
        invert = line.startswith("~")
        assert i > 0 or not invert, "the first SystemCallFilter= line must be an allow-list"
        names = set()
        for item in line.lstrip("~").split():
            names |= expand_syscall_set(item) if item.startswith("@") else {item}
        allowed = allowed - names if invert else allowed | names
    return allowed


def test_syscall_filter_keeps_what_balloond_uses():
    allowed = allowed_syscalls()
    needed = {
        "fallocate", "madvise", "mmap", "munmap", "memfd_create",  # guest RAM, libffi
        "eventfd2", "epoll_wait", "epoll_pwait", "epoll_ctl", "epoll_create1",  # the event loop
        "socket", "bind", "listen", "accept4", "connect", "sendmsg", "recvmsg", "sendto",  # sockets, SCM_RIGHTS
        "chown", "fchownat", "fchmodat", "umask", "unlink",  # sockets handed to the socket group
        "openat", "read", "fstat", "newfstatat", "statx", "getrandom", "prlimit64",
    }
    assert needed - allowed == set()
    assert {"setuid", "mount", "reboot", "init_module", "ptrace", "kexec_load"} & allowed == set()


# ------------------------------------------------------------------ the other files


def test_sysusers_and_tmpfiles(tmp_path):
    (tmp_path / "etc").mkdir()
    subprocess.run([_tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSTEMD / "balloond.sysusers.conf")],
                   check=True, capture_output=True, timeout=60)
    passwd = (tmp_path / "etc" / "passwd").read_text()
    group = (tmp_path / "etc" / "group").read_text()
    m = re.search(r"^balloond:x:(\d+):(\d+):[^:]*:/var/lib/balloond:/usr/sbin/nologin$", passwd, re.MULTILINE)
    assert m, passwd
    uid = int(m.group(1))
    assert re.search(r"^kvm:x:\d+:balloond$", group, re.MULTILINE), group
    result = subprocess.run([_tool("systemd-tmpfiles"), f"--root={tmp_path}", "--create",
                             str(SYSTEMD / "balloond.tmpfiles.conf")], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for path, mode in (("run/balloond", 0o755), ("var/lib/balloond", 0o750)):
        st = (tmp_path / path).stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, mode), path


#: QEMU's docs/interop/vhost-user.json: the VHostUserBackendType enum and the
#: VhostUserBackend struct (description, type, binary, optional tags).
QEMU_BACKEND_TYPES = {"9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net", "rng",
                      "rpmsg", "rproc-serial", "scsi", "vsock", "fs"}


def test_vhost_user_backend_description():
    data = json.loads((SYSTEMD / "50-balloond.json").read_text())
    assert set(data) <= {"description", "type", "binary", "tags"}
    assert isinstance(data["description"], str) and data["description"]
    assert data["type"] in QEMU_BACKEND_TYPES and data["type"] == "balloon"
    assert data["binary"] == "/usr/bin/balloond"
    assert all(isinstance(t, str) for t in data.get("tags", []))
    # the backend program conventions QEMU's document asks of the binary
    out = subprocess.run([sys.executable, "-m", "balloond", "--print-capabilities"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    assert json.loads(out)["type"] == data["type"]
    help_text = subprocess.run([sys.executable, "-m", "balloond", "--help"], capture_output=True, text=True,
                               check=True, timeout=60).stdout
    assert "--socket-path" in help_text and "--fd" in help_text


def test_example_config_loads(tmp_path):
    path = SYSTEMD / "balloond.toml.example"
    settings, _ = config.load(["--config", str(path)])
    assert [vm.name for vm in settings.vms] == ["web1", "batch1", "pinned", "legacy1"]
    assert settings.vms[0].qmp and not settings.vms[0].uses_qemu_balloon
    assert settings.vms[3].uses_qemu_balloon and settings.vms[3].qmp
    assert settings.socket_group == "kvm" and settings.api == "/run/balloond/api.sock"
    assert settings.state_dir == "/var/lib/balloond"
    # the policy lines, uncommented, are valid policy settings
    text = re.sub(r"^#~ ", "", path.read_text(), flags=re.MULTILINE)
    data = tomllib.loads(text)
    policy = PolicyConfig.from_mapping(data["policy"])
    assert policy.enabled and policy.reserve_bytes == 2 << 30
    vms = {vm["name"]: VmPolicySettings.from_mapping(vm) for vm in data["vm"]}
    assert vms["web1"].min_bytes == 1 << 30 and vms["web1"].shares == 2
    assert vms["batch1"].max_bytes == 6 << 30 and not vms["pinned"].enabled


# ------------------------------------------------------------------ the sandbox

LAUNCHER = r'''
"""Apply the unit's restrictions, as systemd does, then exec argv:
launcher.py MECHANISM FAMILIES ERRNO ALLOW_FILE -- COMMAND...
MECHANISM applies MemoryDenyWriteExecute=: seccomp (systemd 252), prctl
(PR_SET_MDWE, newer systemd where the kernel has it), both, or none;
FAMILIES is RestrictAddressFamilies=, ERRNO SystemCallErrorNumber=, and
ALLOW_FILE the SystemCallFilter= allow-list, one name a line."""
import ctypes, errno, os, socket, sys

mechanism, families, errname, allow_file = sys.argv[1:5]
argv = sys.argv[6:]
lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_release.argtypes = [ctypes.c_void_p]

class Cmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]

lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                       ctypes.POINTER(Cmp)]
ALLOW = 0x7FFF0000
def ERRNO(e): return 0x00050000 | e
EQ, GE, MASKED_EQ = 4, 5, 7

def rule(ctx, action, name, *cmps):
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return
    arr = (Cmp * max(1, len(cmps)))(*cmps)
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add {name}")

def load(ctx):
    rc = lib.seccomp_load(ctx)
    if rc < 0:
        raise OSError(-rc, "seccomp_load")
    lib.seccomp_release(ctx)

# RestrictAddressFamilies= (an allow-list)
if families:
    allowed = {getattr(socket, name) for name in families.split()}
    ctx = lib.seccomp_init(ALLOW)
    for af in range(1, 64):
        if af not in allowed:
            rule(ctx, ERRNO(errno.EAFNOSUPPORT), "socket", Cmp(0, EQ, af, 0))
    rule(ctx, ERRNO(errno.EAFNOSUPPORT), "socket", Cmp(0, GE, 64, 0))
    load(ctx)

# MemoryDenyWriteExecute=
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000
if mechanism in ("seccomp", "both"):  # systemd 252
    ctx = lib.seccomp_init(ALLOW)
    rule(ctx, ERRNO(errno.EPERM), "mmap", Cmp(2, MASKED_EQ, PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC))
    rule(ctx, ERRNO(errno.EPERM), "mprotect", Cmp(2, MASKED_EQ, PROT_EXEC, PROT_EXEC))
    rule(ctx, ERRNO(errno.EPERM), "pkey_mprotect", Cmp(2, MASKED_EQ, PROT_EXEC, PROT_EXEC))
    rule(ctx, ERRNO(errno.EPERM), "shmat", Cmp(2, MASKED_EQ, SHM_EXEC, SHM_EXEC))
    load(ctx)
if mechanism in ("prctl", "both"):  # newer systemd, where the kernel has it
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        print(f"PR_SET_MDWE: {os.strerror(ctypes.get_errno())} (a kernel before 6.3?)", file=sys.stderr)
        sys.exit(77)
assert mechanism in ("seccomp", "prctl", "both", "none"), mechanism

# SystemCallFilter= last (seccomp() is not on the list)
ctx = lib.seccomp_init(ERRNO(getattr(errno, errname)))
for name in open(allow_file).read().split():
    rule(ctx, ALLOW, name)
load(ctx)
os.execv(argv[0], argv)
'''

PROBE = r'''
import ctypes, json, mmap, os, socket
from balloond.services.host_memory import HostMemorySampler
out = {}
s = HostMemorySampler().sample()
out["meminfo"] = s.available_bytes > 0
out["psi"] = s.psi_some_avg10
try:
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    out["inet"] = "allowed"
except OSError as exc:
    out["inet"] = exc.errno
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    out["wx"] = "allowed"
except OSError as exc:
    out["wx"] = exc.errno
out["callback"] = ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)()
try:
    open("/etc/balloond-probe", "w")
    out["etc"] = "writable"
except OSError as exc:
    out["etc"] = exc.errno
try:
    os.setuid(0)
    out["setuid"] = "allowed"
except OSError as exc:
    out["setuid"] = exc.errno
out["home"] = os.listdir("/root") if os.path.isdir("/root") else None
out["uid"] = os.getuid()
print(json.dumps(out))
'''


class Sandbox:
    """Runs commands as the unit would: see the module's docstring."""

    def __init__(self, workdir: Path) -> None:
        for tool in ("unshare", "setpriv", "mount"):
            _tool(tool)
        self.stage = Path(tempfile.mkdtemp(prefix="balloond-stage-", dir="/run"))
        self.runtime = Path(tempfile.mkdtemp(prefix="balloond-run-", dir="/run"))
        self.stage.chmod(0o755)
        os.chown(self.runtime, 65534, 65534)
        self.runtime.chmod(0o755)
        (self.stage / "allow.txt").write_text("\n".join(sorted(allowed_syscalls())))
        (self.stage / "launcher.py").write_text(LAUNCHER)
        (self.stage / "probe.py").write_text(PROBE)
        try:
            self.group = grp.getgrnam("kvm")
        except KeyError:  # no kvm group: the daemon's own group stands in
            self.group = grp.getgrgid(65534)
        self.prefix = Path(sys.base_prefix)
        self.site = Path(sysconfig.get_paths()["purelib"])
        self.python = f"{self.prefix}/bin/python{sys.version_info[0]}.{sys.version_info[1]}"
        self.workdir = workdir

    def argv(self, *command: str) -> list[str]:
        families = " ".join(unit_values("RestrictAddressFamilies"))
        errname = unit_values("SystemCallErrorNumber")[-1]
        script = textwrap.dedent(f"""\
            set -e
            mount --make-rprivate /
            mount -t tmpfs -o mode=0755 tmpfs /mnt
            mkdir /mnt/py /mnt/site /mnt/src /mnt/stage
            mount --bind -o ro {self.prefix} /mnt/py
            mount --bind -o ro {self.site} /mnt/site
            mount --bind -o ro {REPO} /mnt/src
            mount --bind -o ro {self.stage} /mnt/stage
            for d in /root /home /run/user /tmp /var/tmp; do
                [ -d $d ] && mount -t tmpfs -o mode=0755 tmpfs $d
            done
            mkdir -p {self.prefix}
            mount --bind -o ro /mnt/py {self.prefix}
            mount --bind {self.runtime} {self.runtime}
            mount -o remount,bind,ro /
            cd /  # systemd starts a system service in / (the checkout may sit in a hidden /tmp)
            exec env -i PATH=/usr/bin:/bin PYTHONPATH=/mnt/src:/mnt/site PYTHONDONTWRITEBYTECODE=1 \\
                HOME=/nonexistent NOTIFY_SOCKET={self.runtime}/notify \\
                setpriv --reuid=65534 --regid=65534 --groups={self.group.gr_gid} --no-new-privs \\
                --bounding-set=-all --inh-caps=-all -- \\
                {self.python} -s /mnt/stage/launcher.py both "{families}" {errname} /mnt/stage/allow.txt -- \\
                    {self.python} -s "$@"
            """)
        # --kill-child: the sandboxed process dies with unshare (a failed test cannot leave it behind)
        return ["unshare", "--mount", "--net", "--fork", "--kill-child", "--", "sh", "-c", script, "sh", *command]

    def close(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
        shutil.rmtree(self.runtime, ignore_errors=True)


def _child_pid(pid: int, deadline: float) -> int:
    """The daemon: the last process down the unshare → sh → exec chain."""
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise AssertionError("the sandboxed daemon did not start")


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


@pytest.fixture
def sandbox(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("building the unit's sandbox needs root (scripts/test runs as root)")
    box = Sandbox(tmp_path)
    yield box
    box.close()


def test_sandbox_probe(sandbox):
    """What the unit allows and forbids, seen from inside."""
    result = subprocess.run(sandbox.argv("/mnt/stage/probe.py"), check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["uid"] == 65534
    assert probe["meminfo"] is True  # the policy can read /proc/meminfo (and PSI where there is one)
    assert probe["inet"] in (97, 1), probe  # EAFNOSUPPORT: only AF_UNIX
    assert probe["wx"] in (1, 13), probe  # W+X memory refused
    assert probe["callback"] == 7  # ...yet ctypes callbacks work (libffi maps a memfd twice, RW and RX)
    assert probe["etc"] in (30, 13), probe  # EROFS (or EACCES): the system is read-only
    assert probe["setuid"] == 1, probe  # EPERM
    # /root is an empty tmpfs (but for the way to this interpreter, if it lives there)
    inside = Path(sys.base_prefix).parts[2:3] if Path(sys.base_prefix).parts[1:2] == ("root",) else ()
    assert probe["home"] == list(inside), probe


def test_daemon_runs_in_the_units_sandbox(sandbox):
    """The real daemon under the unit's restrictions: READY=1, sockets handed
    to the group, an inflate that frees host memory, stats, the API and
    metrics, and a clean stop on SIGTERM."""
    from harness.daemon import ApiClient
    from protocol.balloon import StatTag
    from tests.frontend import TestFrontend

    rt = sandbox.runtime
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(rt / "notify"))
    os.chmod(rt / "notify", 0o666)
    notify.settimeout(30)
    log = open(sandbox.workdir / "balloond.log", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        sandbox.argv("-m", "balloond", "--vm", f"vm0={rt}/vm0.sock", "--api", f"{rt}/api.sock",
                     "--socket-group", sandbox.group.gr_name, "--stats-interval", "0.2",
                     "--state-dir", f"{rt}/state",
                     "--log-format", "json", "--log-level", "debug"),
        stdout=log, stderr=subprocess.STDOUT)
    fe = None
    pid = None
    try:
        messages = []
        while not any(m.startswith("READY=1") for m in messages):
            try:
                messages.append(notify.recv(4096).decode())
            except TimeoutError:
                raise AssertionError(f"no READY=1: {(sandbox.workdir / 'balloond.log').read_text()[-3000:]}")
        assert "STATUS=serving 1 VM(s)" in "\n".join(messages)
        pid = _child_pid(proc.pid, time.monotonic() + 10)
        status = _status(pid)
        assert status["Uid"].split()[0] == "65534" and status["Gid"].split()[0] == "65534"
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        assert int(status["CapBnd"], 16) == 0 and int(status["CapEff"], 16) == 0
        assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
        st = os.stat(rt / "vm0.sock")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, sandbox.group.gr_gid, 0o660)
        assert stat.S_IMODE(os.stat(rt / "api.sock").st_mode) == 0o600

        fe = TestFrontend(str(rt / "vm0.sock"), ram_size=64 << 20, connect=False)
        fe.connect()
        fe.probe()
        fe.prime_stats({StatTag.TOTAL_MEMORY: 64 << 20, StatTag.AVAILABLE_MEMORY: 40 << 20})
        fe.start()
        pfns = range(fe.first_free_pfn, fe.first_free_pfn + 4096)
        fe.ram.touch(pfns)
        before = fe.ram.allocated_bytes()
        fe.inflate(pfns)
        api = ApiClient(rt / "api.sock")
        deadline = time.monotonic() + 5  # the default discard delay: the timer's path is the one tested
        while (vm := api.vm("vm0"))["pending_discard_bytes"]:
            assert time.monotonic() < deadline, "deferred discards were never done"
            time.sleep(0.02)
        assert before - fe.ram.allocated_bytes() == 16 << 20  # fallocate(PUNCH_HOLE) under the filter
        assert vm["host_freed_bytes"] == 16 << 20 and vm["ballooned_bytes"] == 16 << 20
        assert vm["stats"]["available_memory"] == 40 << 20
        assert fe.serve_stats({StatTag.AVAILABLE_MEMORY: 30 << 20}, timeout=5)
        deadline = time.monotonic() + 5
        while api.vm("vm0")["stats"]["available_memory"] != 30 << 20:
            assert time.monotonic() < deadline, "stats did not arrive"
            time.sleep(0.05)
        fe.deflate(pfns)
        api.set_target("vm0", 8 << 20)
        assert fe.wait_config_change(5)
        assert "balloond_vm_host_freed_bytes" in api.metrics()
        assert any((rt / "state").iterdir())  # the journal (--state-dir) is written
        fe.close()
        fe = None
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        while not any(m.startswith("STOPPING=1") for m in messages):
            messages.append(notify.recv(4096).decode())
    finally:
        if fe is not None:
            fe.close()
        if proc.poll() is None:
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait(10)
        notify.close()
        log.close()
    text = (sandbox.workdir / "balloond.log").read_text()
    assert "Traceback" not in text and "Operation not permitted" not in text, text[-3000:]
