"""Exceptions raised by the harness.

Why separate types: tests want to tell "the environment is not set up" (skip
or fail with the command to run) apart from "the guest misbehaved".
"""


class HarnessError(Exception):
    """Base class for harness failures."""


class SetupError(HarnessError):
    """A build artifact (QEMU, guest kernels, busybox) is missing.

    The message always says which command produces it.
    """


class GuestError(HarnessError):
    """The guest did not boot, died, or the command channel broke."""


class GuestTimeout(GuestError):
    """A guest command or boot did not finish in time."""
