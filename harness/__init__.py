"""balloond's real-VM test harness.

Boots small Debian-kernel guests under QEMU (TCG) with an optional balloon
device (our vhost-user backend or QEMU's built-in virtio-balloon), drives a
shell in them, talks QMP, and measures host memory.  Used by the end-to-end
tests, the demo and the benchmarks.

Prerequisites (once per machine): ``scripts/setup.sh`` as root.

Modules, one concept each:
  paths      cache and repository locations
  qemu       finding QEMU and its generic vhost-user device
  modules    kernel module lookup and load order
  cpio       newc archive writer
  guesttool  building the static guest tool
  guest      kernels and the initramfs image
  channel    the guest command channel
  qmp        synchronous QMP session
  devices    balloon device choices
  vm         the Vm class
  daemon     balloond as a process, and its API client
  scenarios  workloads shared by tests and benchmarks (compaction)
  libvirt    a private libvirtd, and guests defined as its domains
"""

from .devices import BuiltinBalloon, VhostUserBalloon
from .errors import GuestError, GuestTimeout, HarnessError, SetupError
from .guest import Kernel, available_kernels, build_initramfs, find_kernel
from .qemu import QemuInfo, find_qemu
from .vm import Vm

__all__ = [
    "BuiltinBalloon",
    "GuestError",
    "GuestTimeout",
    "HarnessError",
    "Kernel",
    "QemuInfo",
    "SetupError",
    "VhostUserBalloon",
    "Vm",
    "available_kernels",
    "build_initramfs",
    "find_kernel",
    "find_qemu",
]
