"""The measured attacks of test_daemon_attacks.py on the libvhost-user
engine: the frontend's shared fds abused (a call eventfd at its maximum
with O_NONBLOCK cleared, a full backend channel, a memfd shrunk under the
mapping), rings built to be expensive, huge memory tables, replies never
read, floods of unsupported requests. vm1, the bystander, keeps its
usual service throughout, and vm0's worker is never hung.

The call eventfd attack found two blocking writes the library makes to that
fd (its interrupts, and one at every SET_VRING_CALL); the binding now makes
them itself, never blocking, as the pure engine does. The long chains run
here with 4-byte descriptors only: a zero-length one makes a bad chain, on
which libvhost-user gives up the connection where the pure engine returns
the chain empty (docs/architecture.md, "Two engines")."""

from __future__ import annotations

from tests.daemon.test_daemon_attacks import (  # noqa: F401  (collected here on the other engine)
    bystander,
    test_a_call_eventfd_at_its_maximum_does_not_block_the_daemon,
    test_a_flood_of_unsupported_requests_is_logged_rate_limited,
    test_a_frontend_cannot_shrink_guest_ram_under_the_daemon,
    test_a_frontend_that_never_reads_replies_cannot_grow_the_daemon,
    test_a_full_blocking_backend_channel_does_not_block_the_daemon,
    test_huge_sparse_memory_tables_are_refused_quickly,
)
from tests.daemon import test_daemon_attacks as attacks

DAEMON_ENGINES = ("libvhost-user",)


def test_long_4_byte_chains_in_every_slot_cost_a_bounded_time_per_turn(daemon, connect, bystander):
    attacks.test_long_chains_in_every_slot_cost_a_bounded_time_per_turn(daemon, connect, bystander, 4)
