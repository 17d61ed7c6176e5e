"""One test guest: a QEMU process, its command channel, QMP and host metrics.

Why this shape: every end-to-end test, the demo and the benchmarks need the
same thing: boot a small Linux guest with a chosen balloon device, run
commands in it, drive QEMU over QMP, and measure how much host memory the
guest's RAM really occupies.  ``Vm`` does exactly that and nothing more.

The API is synchronous; the ``a``-prefixed methods are awaitable twins for
tests that live in an asyncio loop (they run the sync call in a worker thread,
so they never block that loop).

Host-memory metrics: guest RAM is one memfd (memory-backend-memfd,
share=on, which vhost-user needs anyway).  ``memfd_allocated_bytes`` reads
the blocks allocated to that memfd, i.e. what the host really backs after the
balloon backend punched holes; ``rss_shmem`` is QEMU's own RssShmem (pages
of shared memory mapped into QEMU).

Logs (all in ``log_dir``): console.log (ttyS0: kernel and init messages),
commands.log (the command channel, both directions' output), qemu.log
(QEMU's stdout/stderr) and cmdline.txt.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .channel import CommandChannel
from .devices import Balloon, VhostUserBalloon
from .errors import GuestError, GuestTimeout, SetupError
from .guest import FileSource, GuestImage, InitramfsSpec, Kernel, find_kernel
from .qemu import QemuInfo, find_qemu
from .qmp import QmpSession

DEFAULT_CMDLINE = ("console=ttyS0", "panic=-1")

#: Under TCG there is no irqfd: a vhost back-end's interrupt goes through
#: QEMU's main loop, which then wakes the halted vCPU. With the patched
#: QEMU a vCPU whose last halt took at most this long (ns) polls the call
#: eventfds itself, for twice that halt, before it sleeps; the stock
#: balloon driver's round trips then skip both wake-ups. An idle guest's
#: halts are longer, so it does not poll. 1 ms covers a 256-page buffer's
#: round trip (about 0.2-0.5 ms here); with 100 us most deflate buffers
#: were still delivered by the main loop (benchmarks/roundtrips.py).
TCG_HALT_POLL_NS = 1_000_000


def default_halt_poll_ns() -> int:
    """TCG_HALT_POLL_NS, or BALLOOND_HALT_POLL_NS when set."""
    value = os.environ.get("BALLOOND_HALT_POLL_NS", str(TCG_HALT_POLL_NS))
    if not value.isdigit() or int(value) >= 1 << 32:
        raise SetupError(f"BALLOOND_HALT_POLL_NS={value!r}: expected nanoseconds, 0 to 4294967295")
    return int(value)


_PR_SET_PDEATHSIG = 1
_live_vms: weakref.WeakSet[Vm] = weakref.WeakSet()


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL when the thread that started us dies.

    A harness killed by a timeout must not leave guests running.  (This is
    tied to the starting *thread*; VMs are started from the main thread or
    from long-lived executor threads, which outlive them.)
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


@atexit.register
def _kill_leftover_vms() -> None:
    for vm in list(_live_vms):
        vm.kill()


def default_log_root() -> Path:
    env = os.environ.get("BALLOOND_VM_LOG_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / "balloond-vm-logs"


class Vm:
    """A guest VM.  Use as a (sync or async) context manager, or call
    ``start()``/``wait_boot()`` and ``close()`` yourself.

    Parameters:
      kernel        "6.1", "6.12", an exact release, or a Kernel.
      memory_mib    guest RAM (one memfd backend).
      memory_path   back guest RAM with this file instead (memory-backend-file,
                    share=on; e.g. on /dev/shm): a later QEMU given the same
                    path runs on the same RAM file.
      balloon       None, BuiltinBalloon(...) or VhostUserBalloon(...).
      hugepages     back RAM with 2 MiB hugetlb pages (host must have them).
      cpus          vCPUs.
      cmdline       extra kernel command-line words (e.g. "page_poison=1").
      load_balloon  insmod virtio_balloon at boot (else: ``load_module``).
      modules       extra modules the image carries (names or .ko paths).
      boot_modules  modules (names) to load at boot.
      files         extra guest files: {guest path: bytes or host path}.
      init_script   extra shell run by init before the command agent.
      accel         "tcg" (default; BALLOOND_ACCEL overrides) or "kvm".
      halt_poll_ns  under TCG, how long a halted vCPU polls vhost call
                    eventfds before it sleeps (default TCG_HALT_POLL_NS,
                    BALLOOND_HALT_POLL_NS overrides; 0: never). Used when
                    the QEMU build knows it (qemu-patches/0006).
      log_dir       where logs go (default: BALLOOND_VM_LOG_DIR or
                    $TMPDIR/balloond-vm-logs/<name>-<time>).
      qemu_args     extra QEMU arguments.
      incoming      start as a migration destination listening on this URI
                    (``-incoming``, e.g. "unix:/tmp/x.sock"): same arguments
                    otherwise, so that the source's state fits; do not call
                    ``wait_boot`` (the guest arrives running, see
                    ``migrate_to``).
    """

    def __init__(
        self,
        kernel: str | Kernel = "6.12",
        *,
        memory_mib: int = 512,
        balloon: Balloon = None,
        hugepages: bool = False,
        cpus: int = 1,
        cmdline: Iterable[str] = (),
        load_balloon: bool = False,
        modules: Iterable[str | Path] = (),
        boot_modules: Iterable[str] = (),
        files: Mapping[str, FileSource] | None = None,
        init_script: str = "",
        accel: str | None = None,
        halt_poll_ns: int | None = None,
        log_dir: str | Path | None = None,
        name: str = "vm",
        qemu_args: Sequence[str] = (),
        qemu: QemuInfo | None = None,
        memory_path: str | Path | None = None,
        incoming: str | None = None,
    ) -> None:
        self.kernel = find_kernel(kernel) if isinstance(kernel, str) else kernel
        self.memory_mib = memory_mib
        self.memory_path = Path(memory_path) if memory_path is not None else None
        self.balloon = balloon
        self.hugepages = hugepages
        self.cpus = cpus
        self.cmdline = list(DEFAULT_CMDLINE) + list(cmdline)
        self.accel = accel or os.environ.get("BALLOOND_ACCEL", "tcg")
        self.halt_poll_ns = default_halt_poll_ns() if halt_poll_ns is None else halt_poll_ns
        self.name = name
        self.extra_qemu_args = list(qemu_args)
        self.incoming = incoming
        self.qemu = qemu or find_qemu(require_vhost_user=isinstance(balloon, VhostUserBalloon))
        boot = list(boot_modules) + (["virtio_balloon"] if load_balloon else [])
        self.image = GuestImage(
            InitramfsSpec(self.kernel, list(modules), boot, dict(files or {}), init_script)
        )
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_dir = (
            Path(log_dir) if log_dir else default_log_root() / f"{name}-{stamp}-{os.getpid()}"
        )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.log_dir / "console.log"
        self.commands_log = self.log_dir / "commands.log"
        self.qemu_log = self.log_dir / "qemu.log"
        # Unix socket paths must stay short (108 bytes): keep them in /tmp.
        self._sockdir = Path(tempfile.mkdtemp(prefix="bd-vm-"))
        self.qmp_socket = self._sockdir / "qmp.sock"
        self._cmd_socket = self._sockdir / "cmd.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._channel: CommandChannel | None = None
        self._qmp: QmpSession | None = None
        self._listener: socket.socket | None = None
        self.boot_seconds: float | None = None

    # ------------------------------------------------------------------ setup
    def _accel_arg(self) -> str:
        if self.accel == "tcg" and self.qemu.tcg_halt_poll:
            return f"tcg,halt-poll-ns={self.halt_poll_ns}"
        return self.accel

    def command_line(self, initrd: Path) -> list[str]:
        """The full QEMU command line (for logs and for debugging by hand)."""
        mem = f"memory-backend-memfd,id=mem,size={self.memory_mib}M,share=on"
        if self.memory_path is not None:
            mem = f"memory-backend-file,id=mem,size={self.memory_mib}M,share=on,mem-path={self.memory_path}"
        if self.hugepages:
            mem += ",hugetlb=on,hugetlbsize=2M"
        args = [
            str(self.qemu.binary),
            "-name", self.name,
            "-accel", self._accel_arg(),
            "-machine", "q35,memory-backend=mem",
            "-cpu", "max" if self.accel == "tcg" else "host",
            "-smp", str(self.cpus),
            "-m", f"{self.memory_mib}M",
            "-object", mem,
            *self.qemu.firmware_args(),
            "-nodefaults", "-nographic", "-no-reboot", "-nic", "none",
            "-monitor", "none",
            "-chardev", f"file,id=con,path={self.console_log}",
            "-serial", "chardev:con",
            "-chardev", f"socket,id=cmd,path={self._cmd_socket}",
            "-serial", "chardev:cmd",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(initrd),
            "-append", " ".join(self.cmdline),
        ]
        if self.balloon is not None:
            args += self.balloon.qemu_args(self.qemu)
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        return args + self.extra_qemu_args

    def start(self) -> Vm:
        """Launch QEMU (returns once the process runs and QMP answers)."""
        if self._proc is not None:
            raise GuestError("VM already started")
        initrd = self.image.build()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self._cmd_socket))
        self._listener.listen(1)
        argv = self.command_line(initrd)
        (self.log_dir / "cmdline.txt").write_text(shlex.join(argv) + "\n")
        self._t0 = time.monotonic()
        with open(self.qemu_log, "ab") as qlog:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        _live_vms.add(self)
        self._channel = CommandChannel(self._accept_serial(), self.commands_log)
        self._qmp = QmpSession()
        self._qmp.connect(
            str(self.qmp_socket), timeout=60, check=lambda: self._check_alive("before QMP was up")
        )
        return self

    def _accept_serial(self, seconds: float = 30.0) -> socket.socket:
        """The connection QEMU makes to our command socket while it starts
        (its serial port); GuestError if QEMU dies or does not connect."""
        assert self._listener is not None
        self._listener.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while True:
            try:
                conn, _ = self._listener.accept()
                break
            except TimeoutError:
                self._check_alive("while starting")
                if time.monotonic() > deadline:
                    raise GuestError(f"QEMU did not connect its serial port; see {self.qemu_log}") from None
        conn.settimeout(None)
        return conn

    def wait_boot(self, timeout: float = 300.0) -> float:
        """Wait until the guest's command agent is up; returns boot seconds."""
        assert self._channel is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._channel.wait_ready(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                break
            except GuestTimeout:
                self._check_alive("during boot")
                if time.monotonic() > deadline:
                    raise GuestTimeout(
                        f"guest did not boot within {timeout}s; see {self.console_log}"
                    ) from None
            except GuestError:
                self._check_alive("during boot")
                raise
        self.boot_seconds = time.monotonic() - self._t0
        return self.boot_seconds

    def _check_alive(self, when: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            tail = ""
            if self.qemu_log.exists():
                tail = self.qemu_log.read_text(errors="replace")[-2000:]
            raise GuestError(
                f"QEMU exited ({self._proc.returncode}) {when}; logs in {self.log_dir}\n{tail}"
            )

    # --------------------------------------------------------------- commands
    def run(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run a shell command in the guest: (exit status, output).

        stdout and stderr are merged; status 124 means the guest-side timeout
        killed it.
        """
        if self._channel is None:
            raise GuestError("VM not started")
        try:
            return self._channel.run(cmd, timeout)
        except GuestError:
            self._check_alive("while running a command")
            raise

    def sh(self, cmd: str, timeout: float = 60.0) -> str:
        """Like ``run`` but raises GuestError on a non-zero status."""
        status, out = self.run(cmd, timeout)
        if status != 0:
            raise GuestError(f"guest command failed ({status}): {cmd!r}\n{out}")
        return out

    async def arun(self, cmd: str, timeout: float = 60.0) -> tuple[int, str]:
        return await asyncio.to_thread(self.run, cmd, timeout)

    async def ash(self, cmd: str, timeout: float = 60.0) -> str:
        return await asyncio.to_thread(self.sh, cmd, timeout)

    # ------------------------------------------------------------- guest helpers
    def load_module(self, name: str) -> None:
        """insmod ``name`` and what it needs (skipping what is loaded)."""
        order = self.image.module_load_order(name)
        script = "\n".join(
            f"[ -d /sys/module/{m} ] || insmod /lib/modules/{m}.ko || exit 1" for m in order
        )
        self.sh(script or "true")

    def meminfo(self) -> dict[str, int]:
        """The guest's /proc/meminfo in KiB (HugePages_* are counts)."""
        out = self.sh("cat /proc/meminfo")
        info = {}
        for line in out.splitlines():
            m = re.match(r"(\S+):\s+(\d+)", line)
            if m:
                info[m.group(1)] = int(m.group(2))
        return info

    def start_hold(self, mib: int, seed: int | None = None) -> int:
        """Start ``guesttool hold`` in the background; returns its guest pid
        once the memory is filled."""
        seed_arg = "" if seed is None else f" {int(seed)}"
        out = self.sh(
            f"guesttool hold {int(mib)}{seed_arg} > /tmp/hold.$$.log 2>&1 &\n"
            "pid=$!\n"
            "while ! grep -q 'HOLD READY' /tmp/hold.$$.log 2>/dev/null; do\n"
            "  kill -0 $pid 2>/dev/null || { cat /tmp/hold.$$.log; exit 1; }\n"
            "  sleep 0.1\n"
            "done\n"
            "mv /tmp/hold.$$.log /tmp/hold.$pid.log; echo $pid",
            timeout=600,
        )
        return int(out.split()[-1])

    def verify_hold(self, pid: int, timeout: float = 600.0) -> tuple[bool, int]:
        """Ask a ``hold`` process to verify its pages: (ok, bad page count)."""
        out = self.sh(
            f"n=$(grep -c '^VERIFY' /tmp/hold.{pid}.log)\n"
            f"kill -USR1 {pid} || exit 1\n"
            f"while [ $(grep -c '^VERIFY' /tmp/hold.{pid}.log) -le $n ]; do\n"
            f"  kill -0 {pid} 2>/dev/null || {{ echo 'VERIFY DIED'; exit 1; }}\n"
            "  sleep 0.1\n"
            "done\n"
            f"grep '^VERIFY' /tmp/hold.{pid}.log | tail -n 1",
            timeout=timeout,
        )
        line = out.strip().splitlines()[-1]
        if line.startswith("VERIFY OK"):
            return True, 0
        m = re.search(r"bad=(\d+)", line)
        return False, int(m.group(1)) if m else -1

    # -------------------------------------------------------------------- QMP
    @property
    def qmp_session(self) -> QmpSession:
        if self._qmp is None:
            raise GuestError("VM not started")
        return self._qmp

    def qmp(self, name: str, args: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Execute a QMP command; see QmpSession.command."""
        return self.qmp_session.command(name, args, **kwargs)

    async def aqmp(self, name: str, args: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return await self.qmp_session.acommand(name, args, **kwargs)

    # -------------------------------------------------------------- migration
    def migrate_to(self, uri: str, timeout: float = 600.0, *, wait: bool = True) -> dict[str, Any]:
        """Start a migration to ``uri`` (a destination ``Vm`` started with
        ``incoming``) and, with ``wait``, return QEMU's final query-migrate
        (status "completed", "failed" or "cancelled"; "total-time" and
        "downtime" in ms when completed)."""
        self.qmp("migrate", uri=uri)
        if not wait:
            return dict(self.qmp("query-migrate"))
        return self.wait_migration(timeout)

    def wait_migration(self, timeout: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = dict(self.qmp("query-migrate"))
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            self._check_alive("while migrating")
            if time.monotonic() > deadline:
                raise GuestTimeout(f"migration not finished within {timeout}s: {info}")
            time.sleep(0.1)

    # ----------------------------------------------------------- host metrics
    @property
    def qemu_pid(self) -> int:
        if self._proc is None:
            raise GuestError("VM not started")
        return self._proc.pid

    def rss_shmem(self) -> int:
        """QEMU's RssShmem (bytes): shared guest RAM resident in QEMU.

        Always 0 with ``hugepages=True``: the kernel does not count hugetlb
        pages there; use ``memfd_allocated_bytes`` instead.
        """
        with open(f"/proc/{self.qemu_pid}/status") as f:
            for line in f:
                if line.startswith("RssShmem:"):
                    return int(line.split()[1]) * 1024
        raise GuestError("RssShmem not found in /proc/PID/status")

    def memfd_allocated_bytes(self) -> int:
        """Bytes the host has allocated for the guest-RAM memfd (st_blocks*512).

        The memfd is found among QEMU's fds by its name ("/memfd:..."), and
        its size equal to the guest RAM size.
        """
        if self.memory_path is not None:
            return os.stat(self.memory_path).st_blocks * 512
        want = self.memory_mib * 1024 * 1024
        fd_dir = f"/proc/{self.qemu_pid}/fd"
        best = None
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
                if not target.startswith("/memfd:"):
                    continue
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if st.st_size == want:
                return st.st_blocks * 512
            if best is None or st.st_size > best.st_size:
                best = st
        if best is None:
            raise GuestError("guest RAM memfd not found among QEMU's fds")
        return best.st_blocks * 512

    def reset(self, timeout: float = 300.0) -> float:
        """Reset the machine as a reboot would (QMP system_reset; the
        harness's -no-reboot is overridden for this VM) and wait until the
        new boot's command agent is up; returns its boot seconds."""
        assert self._channel is not None, "start() first"
        self.qmp("set-action", reboot="reset")
        t0 = time.monotonic()
        self.qmp("system_reset")
        deadline = t0 + timeout
        while True:
            try:
                self._channel.wait_ready(timeout=min(2.0, max(0.1, deadline - time.monotonic())))
                return time.monotonic() - t0
            except GuestTimeout:
                self._check_alive("while rebooting")
                if time.monotonic() > deadline:
                    raise GuestTimeout(
                        f"guest did not boot again within {timeout}s; see {self.console_log}"
                    ) from None

    # --------------------------------------------------------------- shutdown
    def poweroff(self, timeout: float = 60.0) -> int:
        """Power the guest off cleanly; kill QEMU if it does not exit.

        Returns QEMU's exit status.
        """
        if self._proc is None:
            return self._finish()  # never started: only its socket directory to remove
        if self._proc.poll() is None and self._channel is not None and not self._channel.closed:
            try:
                # Reply markers may never arrive: the guest goes away.
                self._channel.run("sync; (sleep 0.2; poweroff -f) >/dev/null 2>&1 &", timeout=10)
            except GuestError:
                pass
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self._finish()

    def kill(self) -> None:
        """Kill QEMU at once (SIGKILL)."""
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait()
        self._finish()

    def close(self) -> None:
        """Power off (or kill) and release everything."""
        self.poweroff()

    def _finish(self) -> int:
        rc = self._proc.poll() if self._proc is not None else 0
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        shutil.rmtree(self._sockdir, ignore_errors=True)
        return rc or 0

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -------------------------------------------------------- context managers
    def __enter__(self) -> Vm:
        try:
            self.start()
            self.wait_boot()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.kill()
        else:
            self.close()

    async def __aenter__(self) -> Vm:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.__exit__, *exc)
