"""Smoke tests of the VM harness itself, before any balloond code is involved.

They prove that each guest kernel boots, that the command channel, QMP and
host-memory metrics work, and that QEMU's built-in virtio-balloon (the
reference our backend is compared with) behaves as expected with the guest
image the harness builds.
"""

from __future__ import annotations

import time

import pytest

from harness import BuiltinBalloon, find_kernel

pytestmark = pytest.mark.vm

MiB = 1024 * 1024


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.5):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def test_boot_without_balloon(make_vm, kernel):  # type: ignore[no-untyped-def]
    vm = make_vm(kernel, memory_mib=384)

    assert vm.sh("uname -r").strip() == find_kernel(kernel).release

    status, out = vm.run("echo out; echo err >&2; exit 3")
    assert (status, out) == (3, "out\nerr\n")

    mounts = vm.sh("cat /proc/mounts")
    for fs, mountpoint in (("proc", "/proc"), ("sysfs", "/sys"), ("devtmpfs", "/dev"),
                           ("debugfs", "/sys/kernel/debug"), ("tmpfs", "/tmp")):
        assert f" {mountpoint} {fs} " in mounts, mounts

    # The virtio transport is up; no balloon device and no balloon driver.
    assert vm.sh("ls /sys/bus/virtio/devices | wc -l").strip() == "0"
    assert vm.run("test -d /sys/module/virtio_balloon")[0] != 0

    # Guest-side timeout kills the command; the channel keeps working.
    status, _ = vm.run("sleep 30", timeout=1)
    assert status == 124
    assert vm.sh("echo alive") == "alive\n"

    # Host-side metrics see the guest RAM memfd.
    before = vm.memfd_allocated_bytes()
    assert 0 < before <= 384 * MiB
    assert vm.rss_shmem() > 0
    vm.sh("guesttool dirty 128")
    assert vm.memfd_allocated_bytes() >= before + 64 * MiB

    # The checksummed hold pattern survives, and damage would be detected.
    pid = vm.start_hold(32, seed=1234)
    assert vm.verify_hold(pid) == (True, 0)

    assert vm.qmp("query-status")["status"] == "running"


def test_builtin_balloon(make_vm, kernel):  # type: ignore[no-untyped-def]
    total_mib = 512
    vm = make_vm(kernel, memory_mib=total_mib, balloon=BuiltinBalloon())

    # The device is there, but the driver only binds when loaded.
    assert vm.sh("cat /sys/bus/virtio/devices/*/device").split() == ["0x0005"]
    vm.load_module("virtio_balloon")
    bound = vm.sh("ls /sys/bus/virtio/drivers/virtio_balloon/")
    assert "virtio0" in bound

    pid = vm.start_hold(48, seed=99)
    vm.sh("guesttool dirty 200")
    mem_total_before = vm.meminfo()["MemTotal"]
    allocated_before = vm.memfd_allocated_bytes()
    assert vm.qmp("query-balloon")["actual"] == total_mib * MiB

    target = total_mib // 2 * MiB
    vm.qmp("balloon", value=target)
    assert wait_until(lambda: vm.qmp("query-balloon")["actual"] <= target, timeout=120)

    # Without deflate-on-oom the guest gives the pages up for good: MemTotal
    # drops by the balloon size, and QEMU discards them on the host.
    mem_total_after = vm.meminfo()["MemTotal"]
    assert mem_total_before - mem_total_after >= (total_mib // 2 - 8) * 1024
    allocated_after = vm.memfd_allocated_bytes()
    assert allocated_after <= allocated_before - 128 * MiB, (allocated_before, allocated_after)

    # The balloon never takes pages in use.
    assert vm.verify_hold(pid) == (True, 0)

    # Deflate: the guest gets its memory back.
    vm.qmp("balloon", value=total_mib * MiB)
    assert wait_until(lambda: vm.qmp("query-balloon")["actual"] == total_mib * MiB, timeout=120)
    assert wait_until(lambda: vm.meminfo()["MemTotal"] >= mem_total_before - 1024, timeout=30)
    assert vm.verify_hold(pid) == (True, 0)
