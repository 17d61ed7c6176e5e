"""The hostile-frontend tests of the protocol level, on the libvhost-user
engine: it refuses what the pure engine refuses (the binding runs the same
checks of protocol.vhost_user before the library sees a message), closes
only the offending connection, NACKs unknown requests without dropping
the connection, and leaks no fd.

Not here: the ring-level tests of test_daemon_hostile.py (bad descriptors,
head indices, avail index jumps, indirect abuse, ring addresses outside
RAM, a memory table shrunk under running rings). There the engines differ
by design: the pure engine hands a bad chain back empty and carries on,
libvhost-user gives up on the connection (QEMU reconnects);
test_daemon_libvhost_user.py pins that.
"""

from __future__ import annotations

from tests.daemon.test_daemon_hostile import (  # noqa: F401  (collected here on the other engine)
    bystander,
    test_protocol_violation_drops_only_that_connection,
    test_protocol_violations_leak_no_fds,
    test_unknown_request_is_refused_without_dropping,
    test_unsupported_requests_with_fds_leak_nothing,
    victim,
)

DAEMON_ENGINES = ("libvhost-user",)
