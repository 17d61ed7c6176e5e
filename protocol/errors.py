"""Errors raised by the protocol layer.

They are split by who broke the rules, because the daemon reacts differently:
a frontend that breaks vhost-user loses its connection; a guest that puts a
bad buffer on a ring gets that buffer dropped and counted, and the device goes
on serving it and every other guest.
"""


class ProtocolError(Exception):
    """Base class: some peer sent something this layer cannot accept."""


class FrontendError(ProtocolError):
    """The vhost-user frontend (QEMU) sent a malformed or unexpected message."""


class GuestError(ProtocolError):
    """The guest driver placed something invalid on a virtqueue."""


class GuestAddressError(GuestError):
    """A guest-physical or frontend-virtual address lies outside mapped guest RAM."""
