"""Fast checks of the harness's pure-Python parts (no VM, no setup needed).

A wrong cpio header or module order shows up in the VM tests only as "the
guest did not boot"; these tests pin the pieces down directly.
"""

from __future__ import annotations

import lzma
import stat
from pathlib import Path

import pytest

from harness.cpio import CpioWriter
from harness.errors import SetupError
from harness.modules import ModuleIndex, canonical, modinfo_depends, read_module


def parse_newc(archive: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """Minimal newc reader: {name: (mode, data, (rdevmajor, rdevminor))}."""
    out = {}
    pos = 0
    while True:
        assert archive[pos : pos + 6] == b"070701"
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = pos + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) & ~3
        data = archive[data_start : data_start + size]
        pos = (data_start + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data, (fields[9], fields[10]))


def test_cpio_roundtrip() -> None:
    w = CpioWriter()
    w.add_file("etc/bd/init.sh", b"#!/bin/sh\necho hi\n", 0o755)
    w.add_symlink("bin/sh", "busybox")
    w.add_chardev("dev/console", 5, 1)
    w.add_file("odd", b"x" * 5)
    entries = parse_newc(w.finish())

    assert stat.S_ISDIR(entries["etc"][0]) and stat.S_ISDIR(entries["etc/bd"][0])
    mode, data, _ = entries["etc/bd/init.sh"]
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755 and data.startswith(b"#!/bin/sh")
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
    assert entries["odd"][1] == b"xxxxx"


def test_canonical_names() -> None:
    assert canonical("kernel/drivers/virtio/virtio_pci.ko.xz") == "virtio_pci"
    assert canonical("virtio-rng.ko") == "virtio_rng"
    assert canonical("virtio_balloon") == "virtio_balloon"


def test_modinfo_depends() -> None:
    blob = b"\x7fELF...\0license=GPL\0depends=virtio,virtio_ring\0vermagic=6.1\0"
    assert modinfo_depends(blob) == ["virtio", "virtio_ring"]
    assert modinfo_depends(b"\0depends=\0") == []
    assert modinfo_depends(b"no modinfo") == []


def make_modules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "lib/modules/6.1.0-test"
    (d / "kernel/drivers/virtio").mkdir(parents=True)
    for name in ("virtio_ring", "virtio", "virtio_pci", "virtio_balloon"):
        ko = d / f"kernel/drivers/virtio/{name}.ko.xz"
        ko.write_bytes(lzma.compress(b"ELF " + name.encode()))
    (d / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio_ring.ko.xz:\n"
        "kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz\n"
        "kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio.ko.xz "
        "kernel/drivers/virtio/virtio_ring.ko.xz\n"
        "kernel/drivers/virtio/virtio_balloon.ko.xz: kernel/drivers/virtio/virtio.ko.xz "
        "kernel/drivers/virtio/virtio_ring.ko.xz\n"
    )
    (d / "modules.builtin").write_text("kernel/drivers/virtio/virtio_mmio.ko\n")
    return d


def test_module_order_and_extra_modules(tmp_path: Path) -> None:
    index = ModuleIndex(make_modules_dir(tmp_path))
    assert [m.name for m in index.resolve(["virtio_pci", "virtio_balloon"])] == [
        "virtio_ring", "virtio", "virtio_pci", "virtio_balloon",
    ]
    assert index.resolve(["virtio_mmio"]) == []  # built in
    assert read_module(index.resolve(["virtio"])[-1].source) == b"ELF virtio"

    driver = tmp_path / "balloond_balloon.ko"
    driver.write_bytes(b"\x7fELF\0depends=virtio_ring,virtio\0")
    assert index.add_extra(driver) == "balloond_balloon"
    assert index.dependencies("balloond_balloon") == ["virtio_ring", "virtio", "balloond_balloon"]

    with pytest.raises(SetupError):
        index.resolve(["no_such_module"])
