"""Locating the QEMU binary and what it can do.

Why: attaching a vhost-user balloon needs QEMU's generic vhost-user device,
which Debian 12's QEMU does not allow; scripts/build-qemu.sh builds one into
the cache.  Its name differs by version (``vhost-user-test-device-pci`` from
10.2 on, ``vhost-user-device-pci`` in a patched 10.0), so it is detected from
``-device help`` rather than assumed.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import SetupError
from .paths import cache_dir

#: Preferred first.
GENERIC_DEVICE_NAMES = ("vhost-user-test-device-pci", "vhost-user-device-pci")

#: Firmware search path: Debian's qemu-system-data (option ROMs such as
#: linuxboot_dma.bin, needed by -kernel) and seabios (bios-256k.bin).
FIRMWARE_DIRS = ("/usr/share/qemu", "/usr/share/seabios")

BUILD_HINT = "run as root: scripts/build-qemu.sh   (or scripts/setup.sh)"


@dataclass(frozen=True)
class QemuInfo:
    """A usable qemu-system-x86_64 and its relevant capabilities."""

    binary: Path
    version: str
    generic_device: str | None  # None: no vhost-user balloon possible
    devices: frozenset[str]
    #: ``-accel tcg,halt-poll-ns=`` is known (qemu-patches/0006): a halted
    #: vCPU serves vhost call eventfds itself instead of waiting for the
    #: main loop to wake it.
    tcg_halt_poll: bool = False

    def has_device(self, name: str) -> bool:
        return name in self.devices

    def firmware_args(self) -> list[str]:
        args: list[str] = []
        for d in FIRMWARE_DIRS:
            if os.path.isdir(d):
                args += ["-L", d]
        return args


def _cached_binary() -> Path | None:
    base = cache_dir()
    current = base / "qemu-current" / "bin" / "qemu-system-x86_64"
    if current.exists():
        return current
    for stamp in sorted(base.glob("qemu-*/.stamp"), reverse=True):
        binary = stamp.parent / "bin" / "qemu-system-x86_64"
        if binary.exists():
            return binary
    return None


def qemu_binary() -> Path:
    """BALLOOND_QEMU if set (used as is), else the binary the build cached."""
    env = os.environ.get("BALLOOND_QEMU")
    if env:
        path = Path(env)
        if not path.exists():
            raise SetupError(f"BALLOOND_QEMU={env} does not exist")
        return path
    binary = _cached_binary()
    if binary is None:
        raise SetupError(f"no QEMU build found under {cache_dir()}; {BUILD_HINT}")
    return binary


@functools.cache
def _probe(binary: str) -> QemuInfo:
    try:
        version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.splitlines()[0]
        listing = subprocess.run(
            [binary, "-device", "help"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        raise SetupError(f"cannot run {binary}: {exc}; {BUILD_HINT}") from exc
    devices = frozenset(re.findall(r'^name "([^"]+)"', listing, re.M))
    generic = next((n for n in GENERIC_DEVICE_NAMES if n in devices), None)
    return QemuInfo(Path(binary), version, generic, devices, _knows_tcg_halt_poll(binary))


def _knows_tcg_halt_poll(binary: str) -> bool:
    """Whether the TCG accelerator takes ``halt-poll-ns``: start a machine-less
    QEMU with it and quit through QMP (an unknown property ends QEMU at once
    with an error instead)."""
    try:
        run = subprocess.run(
            [binary, "-machine", "none", "-accel", "tcg,halt-poll-ns=0", "-display", "none",
             "-nodefaults", "-qmp", "stdio"],
            input='{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n',
            capture_output=True, text=True, timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return run.returncode == 0 and "halt-poll-ns" not in run.stderr


def find_qemu(require_vhost_user: bool = False) -> QemuInfo:
    """Locate QEMU and probe it.

    With ``require_vhost_user`` a QEMU without the generic vhost-user device
    is an error explaining how to get one.
    """
    info = _probe(str(qemu_binary()))
    if require_vhost_user and info.generic_device is None:
        raise SetupError(
            f"{info.binary} ({info.version}) has no generic vhost-user device "
            f"({' or '.join(GENERIC_DEVICE_NAMES)}); {BUILD_HINT}"
        )
    return info
