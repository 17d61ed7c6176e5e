"""Test guests started by libvirt, as operators run them (docs/libvirt.md).

Why: most hosts start QEMU through libvirt, which owns QEMU's command line
and its monitor. The tests need Debian's libvirtd without the machine's
init system and without touching the machine's own libvirt state, and
guests like ``Vm``'s (the project's QEMU, TCG, direct kernel boot of the
test kernels, the command channel on ttyS1) but defined as libvirt domains.

``LibvirtDaemon`` runs ``libvirtd`` in the foreground in a mount namespace of
its own (``unshare --mount``), where its state directories (/etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt) are
bind mounts of a scratch directory; its socket is in that directory too and
reached with ``qemu:///system?socket=PATH``. QEMU runs as Debian's
libvirt runs it, as the user libvirt-qemu with the group libvirt-qemu and
libvirt-qemu's supplementary group kvm (``qemu_user="root"`` for root), but
with no security driver, no cgroups and no per-domain /dev namespace (none
of which a container offers); the domain's QEMU log is
``<workdir>/log/qemu/NAME.log`` and its pid file
``<workdir>/run/qemu/NAME.pid``, seen from outside through the same bind
mounts. What that user must reach is copied where it can: the emulator and
the guest's kernel and initramfs (the build cache is under root's home);
the command channel's socket is handed to it.

``LibvirtVm`` is a ``Vm`` whose QEMU libvirt starts: ``start``, ``destroy``
(virsh destroy) and ``power_on`` (virsh start) drive the domain; commands,
meminfo and the memfd measurements work as for any ``Vm``. Its ``qmp`` goes
through libvirt (``virsh qemu-monitor-command``): libvirt owns the monitor.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from .devices import Balloon, BuiltinBalloon, VhostUserBalloon
from .errors import GuestError, SetupError
from .vm import Vm, _die_with_parent

#: libvirt's state directories, each replaced by a directory of the scratch dir.
STATE_DIRS = {"/etc/libvirt": "etc", "/run/libvirt": "run", "/var/lib/libvirt": "lib",
              "/var/log/libvirt": "log", "/var/cache/libvirt": "cache"}

SETUP_HINT = "run as root: scripts/setup.sh (installs libvirt)"

_live_daemons: weakref.WeakSet[LibvirtDaemon] = weakref.WeakSet()


@atexit.register
def _stop_leftover_daemons() -> None:
    for daemon in list(_live_daemons):
        daemon.stop()


class LibvirtDaemon:
    """A private libvirtd (see the module's docstring); a context manager."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *, qemu_user: str = "libvirt-qemu") -> None:
        # Unix socket paths must stay short (108 bytes): the default is in /tmp.
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="bd-lv-"))
        self.qemu_user = qemu_user
        self.qemu_group = "root" if qemu_user == "root" else "libvirt-qemu"
        self.socket = self.workdir / "sock" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self.log_path = self.workdir / "libvirtd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def domain_log(self, domain: str) -> Path:
        return self.workdir / "log" / "qemu" / f"{domain}.log"

    def pid_file(self, domain: str) -> Path:
        return self.workdir / "run" / "qemu" / f"{domain}.pid"

    @property
    def qemu_uid(self) -> int:
        import pwd

        return pwd.getpwnam(self.qemu_user).pw_uid

    def readable(self, path: Path) -> Path:
        """`path`, or a copy of it the QEMU user can read (kept for the daemon's life)."""
        if self.qemu_user == "root":
            return path
        copy = self.workdir / "files" / f"{path.stat().st_mtime_ns}-{path.name}"
        if not copy.exists():
            copy.parent.mkdir(mode=0o755, exist_ok=True)
            tmp = copy.with_suffix(".tmp")
            shutil.copy2(path, tmp)
            tmp.chmod(0o755)
            os.replace(tmp, copy)
        return copy

    def _write_config(self) -> Path:
        self.workdir.chmod(0o755)  # the QEMU user reaches the copies made for it through it
        for sub in (*STATE_DIRS.values(), "sock"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "etc" / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.workdir / "sock"}"\n'
            'unix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\nunix_sock_admin_perms = "0700"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            'log_outputs = "3:stderr"\n'
        )
        # What a container lacks is turned off: DAC relabelling, cgroups, the
        # per-domain /dev namespace; QEMU's stdio goes to a plain file (no virtlogd).
        (self.workdir / "etc" / "qemu.conf").write_text(
            f'user = "{self.qemu_user}"\ngroup = "{self.qemu_group}"\ndynamic_ownership = 0\nremember_owner = 0\n'
            'security_driver = "none"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n'
            'stdio_handler = "file"\n'
        )
        script = self.workdir / "start.sh"
        mounts = "".join(f'mkdir -p {target}\nmount --bind "$1/{sub}" {target}\n'
                         for target, sub in STATE_DIRS.items())
        script.write_text(f'set -e\n{mounts}exec libvirtd --config "$1/etc/libvirtd.conf"\n')
        return script

    def start(self, timeout: float = 30.0) -> LibvirtDaemon:
        if shutil.which("libvirtd") is None or shutil.which("virsh") is None:
            raise SetupError(f"libvirtd or virsh missing; {SETUP_HINT}")
        script = self._write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", str(script), str(self.workdir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        _live_daemons.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SetupError(f"libvirtd exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.socket.exists() and self.virsh("uri", check=False).returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise SetupError(f"libvirtd did not answer within {timeout}s:\n{self.log_tail()}")
            time.sleep(0.1)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop libvirtd and start it again, its domains left running (as a
        package upgrade does): the new libvirtd finds their QEMUs again."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout)
        self.socket.unlink(missing_ok=True)
        self.start(timeout)

    def virsh(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise GuestError(f"virsh {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def version(self) -> str:
        """libvirtd's version ("9.0.0"), asked through the Python binding (virsh's
        `version` needs an emulator on $PATH to answer at all)."""
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            v = conn.getLibVersion()
        finally:
            conn.close()
        return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

    def domains(self, *flags: str) -> list[str]:
        return [n for n in self.virsh("list", "--name", *flags).stdout.split() if n]

    def stop(self, timeout: float = 15.0) -> None:
        """Destroy and undefine every domain (libvirt's QEMUs outlive libvirtd), then stop libvirtd."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                for name in self.domains("--all"):
                    self.virsh("destroy", name, check=False)
                    self.virsh("undefine", name, check=False)
            except (GuestError, subprocess.SubprocessError):
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        shutil.rmtree(self.workdir / "files", ignore_errors=True)  # the copies for QEMU (~40 MB); logs stay
        _live_daemons.discard(self)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> LibvirtDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _arg(value: str) -> str:
    return f"    <qemu:arg value={quoteattr(value)}/>\n"


class LibvirtVm(Vm):
    """A guest defined in `libvirt` as domain `name`.

    balloon: VhostUserBalloon (balloond's device, through libvirt's QEMU
    namespace; `<memballoon model='none'/>`), BuiltinBalloon (libvirt's own
    `<memballoon model='virtio'>`: options "autodeflate", "freePageReporting";
    `stats_period` sets its `<stats period>`), or None.
    balloond_qmp: a path for a second QMP monitor beside libvirt's, for balloond.
    current_memory_mib: the domain's `<currentMemory>` (the balloon at start).
    """

    def __init__(
        self,
        libvirt: LibvirtDaemon,
        kernel: str = "6.12",
        *,
        balloon: Balloon = None,
        balloond_qmp: str | os.PathLike[str] | None = None,
        stats_period: int | None = None,
        current_memory_mib: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(kernel, balloon=balloon, **kwargs)
        self.libvirt = libvirt
        self.domain = self.name
        self.balloond_qmp = str(balloond_qmp) if balloond_qmp is not None else None
        self.stats_period = stats_period
        self.current_memory_mib = current_memory_mib or self.memory_mib
        self.xml_path = self.log_dir / "domain.xml"
        self.starts = 0

    # ------------------------------------------------------------------ the domain
    def domain_xml(self, initrd: Path) -> str:
        """The domain, as an operator would write it (docs/libvirt.md), for the test kernel."""
        balloon = self.balloon
        if isinstance(balloon, BuiltinBalloon):
            attrs = "".join(f" {k}={quoteattr(v)}" for k, v in sorted(balloon.options.items()))
            stats = f"<stats period='{self.stats_period}'/>" if self.stats_period else ""
            memballoon = f"<memballoon model='virtio'{attrs}>{stats}</memballoon>"
        else:
            memballoon = "<memballoon model='none'/>"  # else libvirt adds its own balloon beside ours
        args = "".join(_arg(a) for a in self.qemu.firmware_args())
        if isinstance(balloon, VhostUserBalloon):
            args += "".join(_arg(a) for a in balloon.qemu_args(self.qemu))
        if self.balloond_qmp:
            args += _arg("-qmp") + _arg(f"unix:{self.balloond_qmp},server=on,wait=off")
        args += "".join(_arg(a) for a in self.extra_qemu_args)
        return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(self.domain)}</name>
  <memory unit='MiB'>{self.memory_mib}</memory>
  <currentMemory unit='MiB'>{self.current_memory_mib}</currentMemory>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <vcpu>{self.cpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(self.libvirt.readable(self.kernel.vmlinuz)))}</kernel>
    <initrd>{escape(str(self.libvirt.readable(initrd)))}</initrd>
    <cmdline>{escape(" ".join(self.cmdline))}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum' migratable='off'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(str(self.libvirt.readable(self.qemu.binary)))}</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'><source path={quoteattr(str(self.console_log))} append='on'/><target port='0'/></serial>
    <serial type='unix'><source mode='connect' path={quoteattr(str(self._cmd_socket))}/><target port='1'/></serial>
    {memballoon}
  </devices>
  <qemu:commandline>
{args}  </qemu:commandline>
</domain>
"""

    def start(self) -> LibvirtVm:
        """Define the domain and start it (returns once QEMU has connected the command channel)."""
        if self._listener is not None:
            raise GuestError("VM already started")
        initrd = self.image.build()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self._cmd_socket))
        self._listener.listen(1)
        if self.libvirt.qemu_user != "root":  # QEMU connects to it as its own user
            self._sockdir.chmod(0o711)
            os.chown(self._cmd_socket, self.libvirt.qemu_uid, -1)
        self.xml_path.write_text(self.domain_xml(initrd))
        self.libvirt.virsh("define", str(self.xml_path))
        self.power_on(wait=False)
        return self

    def power_on(self, wait: bool = True) -> float | None:
        """virsh start, and the command channel; with `wait`, until the guest's agent is up."""
        self._t0 = time.monotonic()
        self.libvirt.virsh("start", self.domain)
        self.starts += 1
        from .channel import CommandChannel

        self._channel = CommandChannel(self._accept_serial(), self.commands_log)
        return self.wait_boot() if wait else None

    def destroy(self) -> None:
        """virsh destroy: QEMU is killed, the domain stays defined."""
        self.libvirt.virsh("destroy", self.domain, check=False)
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def state(self) -> str:
        return self.libvirt.virsh("domstate", self.domain, check=False).stdout.strip()

    # ------------------------------------------------------------------ Vm's hooks
    @property
    def qemu_log(self) -> Path:
        return self.libvirt.domain_log(self.domain)

    @qemu_log.setter
    def qemu_log(self, value: Path) -> None:
        pass  # Vm.__init__ sets it; libvirt decides where QEMU's log goes

    @property
    def qemu_pid(self) -> int:
        try:
            return int(self.libvirt.pid_file(self.domain).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            raise GuestError(f"domain {self.domain} is not running") from None

    @property
    def running(self) -> bool:
        try:
            pid = self.qemu_pid
        except GuestError:
            return False
        return os.path.exists(f"/proc/{pid}")

    def _check_alive(self, when: str) -> None:
        if not self.running:
            tail = ""
            if self.qemu_log.exists():
                tail = self.qemu_log.read_text(errors="replace")[-2000:]
            raise GuestError(f"domain {self.domain} is not running {when}; logs in {self.log_dir}\n{tail}")

    def qmp(self, name: str, args: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """One QMP command through libvirt (it owns the monitor)."""
        command: dict[str, Any] = {"execute": name}
        if args or kwargs:
            command["arguments"] = {**(args or {}), **kwargs}
        out = self.libvirt.virsh("qemu-monitor-command", self.domain, json.dumps(command)).stdout
        reply = json.loads(out)
        if "error" in reply:
            raise GuestError(f"QMP {name} failed: {reply['error']}")
        return reply.get("return")

    def poweroff(self, timeout: float = 60.0) -> int:
        if self.running and self._channel is not None and not self._channel.closed:
            try:
                self._channel.run("sync; (sleep 0.2; poweroff -f) >/dev/null 2>&1 &", timeout=10)
            except GuestError:
                pass
            deadline = time.monotonic() + timeout
            while self.running and time.monotonic() < deadline:
                time.sleep(0.1)
        return self._finish()

    def kill(self) -> None:
        self._finish()

    def _finish(self) -> int:
        self.libvirt.virsh("destroy", self.domain, check=False)
        self.libvirt.virsh("undefine", self.domain, check=False)
        return super()._finish()
