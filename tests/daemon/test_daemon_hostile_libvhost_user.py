"""The hostile-frontend tests of test_daemon_hostile.py, on the
libvhost-user engine. At the protocol level it refuses what the pure engine
refuses (the binding runs the same checks of protocol.vhost_user before the
library sees a message), closes only the offending connection, NACKs
unknown requests without dropping the connection, and leaks no fd. At the
ring level it treats a bad chain as the pure engine does (the binding vets
each chain with the pure engine's rules before the library pops it): bad
descriptors, head indices, avail index jumps and indirect abuse are
returned or skipped and counted, and the ring goes on. Ring addresses
outside guest RAM, given or left behind by a smaller memory table, are kept
from the library (it would give up on the connection): the ring waits
stopped, as on the pure engine.
"""

from __future__ import annotations

from tests.daemon.test_daemon_hostile import (  # noqa: F401  (collected here on the other engine)
    bystander,
    test_a_buffer_the_extension_allows_is_taken_whole_and_a_larger_one_refused,
    test_avail_index_jump_then_recovery,
    test_descriptor_outside_ram,
    test_disable_enable_without_get_vring_base,
    test_double_inflate_and_stray_deflate,
    test_head_index_out_of_range,
    test_hostile_migrate_buffers,
    test_hostile_reports,
    test_indirect_abuse,
    test_indirect_without_the_feature,
    test_looping_and_broken_chains,
    test_memory_table_shrinking_under_a_running_device,
    test_pfns_outside_ram_are_refused,
    test_rejected_chain_keeps_the_ring_alive,
    test_ring_addresses_outside_ram,
    test_protocol_violation_drops_only_that_connection,
    test_protocol_violations_leak_no_fds,
    test_unknown_request_is_refused_without_dropping,
    test_unsupported_requests_with_fds_leak_nothing,
    victim,
)

DAEMON_ENGINES = ("libvhost-user",)
