"""The guest kit: kernels and the initramfs the test guests boot from.

Why an initramfs built per test: the guests need no disk, no network and no
distribution, only busybox, our guest tool and a handful of kernel modules.
Assembling the image in Python from those parts takes well under a second,
lets each test choose which modules are present (e.g. our own guest driver)
and which load at boot, and keeps all of it reproducible from the cache that
scripts/build-guest-kit.sh fills.

Inside the guest:
  /init               -> /bin/guesttool (PID 1: reaps orphans, powers off at exit)
  /etc/bd/init.sh     mounts proc, sysfs, devtmpfs, debugfs, tmpfs /tmp;
                      insmods /etc/bd/boot-modules in order; then runs the
                      command agent on /dev/ttyS1 (the harness's channel).
                      Kernel messages go to ttyS0 only, so they never mix
                      with command output.
  /lib/modules/NAME.ko  every module the image carries (decompressed)
  /bin/*              busybox applets
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from .cpio import CpioWriter
from .errors import SetupError
from .guesttool import guesttool_binary
from .modules import ModuleIndex, canonical, read_module
from .paths import harness_cache_dir, kernels_dir

KIT_HINT = "run as root: scripts/build-guest-kit.sh   (or scripts/setup.sh)"

#: The virtio transport: loaded at boot when they are modules (6.1), skipped
#: when built in (6.12, 7.3).
VIRTIO_BOOT_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
)
#: Carried in every image but loaded only when a test asks.
BALLOON_MODULE = "virtio_balloon"

BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

#: Data for a file in the guest: bytes, or a host path to copy.
FileSource = Union[bytes, str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Kernel:
    """One unpacked Debian kernel from the cache.

    ``build_root``: for kernels whose build tools need a newer Debian than
    the host's (7.x), the trixie root that holds ``headers_dir`` and in which
    modules for this kernel are built (guest-driver/build.sh finds it through
    ``<kernels>/<release>/build-root``); None when the host builds them.
    """

    series: str          # "6.1", "6.12" or "7.3"
    release: str         # e.g. "6.1.0-56-amd64"
    vmlinuz: Path
    modules_dir: Path
    headers_dir: Path | None
    build_root: Path | None = None

    def module_index(self) -> ModuleIndex:
        return ModuleIndex(self.modules_dir)


def available_kernels() -> list[Kernel]:
    """All kernels listed in the cache's kernels.json."""
    summary = kernels_dir() / "kernels.json"
    if not summary.exists():
        raise SetupError(f"{summary} missing; {KIT_HINT}")
    kernels = []
    for k in json.loads(summary.read_text())["kernels"]:
        headers = Path(k["headers_dir"]) if k.get("headers_dir") else None
        root = Path(k["build_root"]) if k.get("build_root") else None
        kernels.append(
            Kernel(k["series"], k["release"], Path(k["vmlinuz"]), Path(k["modules_dir"]), headers, root)
        )
    return kernels


def find_kernel(which: str) -> Kernel:
    """A kernel by series ("6.1", "6.12", "7.3") or exact release."""
    kernels = available_kernels()
    for k in kernels:
        if which in (k.series, k.release):
            if not k.vmlinuz.exists():
                raise SetupError(f"{k.vmlinuz} missing; {KIT_HINT}")
            return k
    have = ", ".join(f"{k.series} ({k.release})" for k in kernels)
    raise SetupError(f"no kernel {which!r} in the cache (have: {have}); {KIT_HINT}")


def busybox_binary() -> Path:
    """The static busybox from Debian's busybox-static."""
    for cand in BUSYBOX_CANDIDATES:
        p = Path(cand)
        if p.exists() and _is_static_elf(p):
            return p
    raise SetupError("no static busybox found; run as root: apt-get install busybox-static")


def _is_static_elf(path: Path) -> bool:
    """True if the ELF file has no PT_INTERP (no dynamic loader needed)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit only
            return False
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


@dataclass
class InitramfsSpec:
    """What goes into one guest image.

    ``modules``: names (kernel package modules) or paths (.ko, e.g. our
    guest driver) the image carries; dependencies are added automatically.
    ``boot_modules``: the subset (by name) insmod'ed at boot, in dependency
    order, after the virtio transport.
    ``files``: guest path -> bytes or host path.  Host files keep their
    executable bit.
    ``init_script``: extra shell run by init.sh before the agent starts.
    """

    kernel: Kernel
    modules: list[str | Path] = field(default_factory=list)
    boot_modules: list[str] = field(default_factory=list)
    files: Mapping[str, FileSource] = field(default_factory=dict)
    init_script: str = ""


INIT_SH = """\
#!/bin/sh
# Generated by harness/guest.py: guest init (see that module's docstring).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
echo "bd-init: kernel $(uname -r), loading boot modules"
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m.ko" || echo "bd-init: insmod $m failed"
done < /etc/bd/boot-modules
[ -f /etc/bd/init.local ] && . /etc/bd/init.local
echo "bd-init: starting command agent on ttyS1"
exec /bin/guesttool agent /dev/ttyS1
"""


class GuestImage:
    """Builds (and caches) the initramfs for an InitramfsSpec."""

    def __init__(self, spec: InitramfsSpec) -> None:
        self.spec = spec
        self.index = spec.kernel.module_index()
        self._extra_names: list[str] = []
        for m in spec.modules:
            if isinstance(m, Path) or str(m).endswith((".ko", ".ko.xz", ".ko.zst", ".ko.gz")):
                self._extra_names.append(self.index.add_extra(Path(m)))
        wanted = [n for n in VIRTIO_BOOT_MODULES if self.index.exists(n)]
        wanted.append(BALLOON_MODULE)
        wanted += [canonical(str(m)) for m in spec.modules if not self._is_path(m)]
        wanted += self._extra_names
        wanted += [canonical(m) for m in spec.boot_modules]
        self.carried = self.index.resolve(wanted)
        boot_names = [n for n in VIRTIO_BOOT_MODULES if self.index.exists(n)]
        boot_names += [canonical(m) for m in spec.boot_modules]
        self.boot_order = [m.name for m in self.index.resolve(boot_names)]

    @staticmethod
    def _is_path(m: str | Path) -> bool:
        return isinstance(m, Path) or str(m).endswith((".ko", ".ko.xz", ".ko.zst", ".ko.gz"))

    def module_load_order(self, name: str) -> list[str]:
        """Modules to insmod (in order) so that ``name`` is loaded."""
        return self.index.dependencies(name)

    # -- building ----------------------------------------------------------
    def _inputs_digest(self, busybox: Path, tool: Path) -> str:
        h = hashlib.sha256()
        h.update(INIT_SH.encode())
        h.update(self.spec.init_script.encode())
        h.update(self.spec.kernel.release.encode())
        for p in [busybox, tool] + [m.source for m in self.carried]:
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update("\n".join(self.boot_order).encode())
        for guest_path in sorted(self.spec.files):
            src = self.spec.files[guest_path]
            h.update(guest_path.encode())
            if isinstance(src, bytes):
                h.update(hashlib.sha256(src).digest())
            else:
                st = Path(src).stat()
                h.update(f"{src}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:20]

    def build(self) -> Path:
        """Return the path of the (cached) initramfs image."""
        busybox = busybox_binary()
        tool = guesttool_binary()
        out_dir = harness_cache_dir() / "initramfs"
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"{self.spec.kernel.release}-{self._inputs_digest(busybox, tool)}.cpio"
        if out.exists():
            return out
        self._prune(out_dir)
        w = CpioWriter()
        for d in ("dev", "proc", "sys", "tmp", "root", "etc/bd", "lib/modules", "bin", "sbin",
                  "usr/bin", "usr/sbin", "mnt", "run"):
            w.add_dir(d)
        w.add_chardev("dev/console", 5, 1)
        w.add_chardev("dev/null", 1, 3, 0o666)
        w.add_chardev("dev/ttyS0", 4, 64)
        w.add_chardev("dev/ttyS1", 4, 65)
        w.add_file("bin/busybox", busybox.read_bytes(), 0o755)
        for applet in self._applets(busybox):
            if applet not in ("bin/busybox",):
                rel = os.path.relpath("bin/busybox", os.path.dirname(applet))
                w.add_symlink(applet, rel)
        w.add_file("bin/guesttool", tool.read_bytes(), 0o755)
        w.add_symlink("init", "bin/guesttool")
        w.add_file("etc/bd/init.sh", INIT_SH.encode(), 0o755)
        if self.spec.init_script:
            w.add_file("etc/bd/init.local", self.spec.init_script.encode(), 0o755)
        w.add_file("etc/bd/boot-modules", ("\n".join(self.boot_order) + "\n").encode())
        w.add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        w.add_file("etc/group", b"root:x:0:\n")
        for mod in self.carried:
            w.add_file(f"lib/modules/{mod.guest_file}", read_module(mod.source), 0o644)
        for guest_path, src in sorted(self.spec.files.items()):
            if isinstance(src, bytes):
                w.add_file(guest_path, src, 0o644)
            else:
                p = Path(src)
                w.add_file(guest_path, p.read_bytes(), 0o755 if os.access(p, os.X_OK) else 0o644)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(w.finish())
        os.replace(tmp, out)
        return out

    @staticmethod
    def _applets(busybox: Path) -> list[str]:
        proc = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SetupError(f"{busybox} --list-full failed: {proc.stderr}")
        return [line.strip().lstrip("/") for line in proc.stdout.splitlines() if line.strip()]

    @staticmethod
    def _prune(out_dir: Path, keep: int = 24) -> None:
        """Keep the image cache small: drop all but the newest images."""
        images = sorted(out_dir.glob("*.cpio"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in images[keep:]:
            try:
                old.unlink()
            except OSError:
                pass


def build_initramfs(
    kernel: Kernel | str,
    *,
    modules: Iterable[str | Path] = (),
    boot_modules: Iterable[str] = (),
    files: Mapping[str, FileSource] | None = None,
    init_script: str = "",
) -> tuple[Path, GuestImage]:
    """Convenience wrapper: build the image, return (path, image)."""
    k = find_kernel(kernel) if isinstance(kernel, str) else kernel
    image = GuestImage(
        InitramfsSpec(k, list(modules), list(boot_modules), dict(files or {}), init_script)
    )
    return image.build(), image
