"""Every config change the daemon makes on its own is announced with
CONFIG_CHANGE_MSG.

Why: QEMU's generic vhost-user device with config-cache=on serves the
guest's config reads from a copy it refreshes only on that message (and at
connect and start). A change left unannounced would leave the copy stale,
and the copy is what QEMU echoes back in every SET_CONFIG."""

from __future__ import annotations

from tests.daemon.harness import crash_and_restart, reconnect
from tests.frontend import GuestRam, TestFrontend
from tests.daemon.conftest import ENGINES

#: Device behaviour: the same tests on both vhost-user engines.
DAEMON_ENGINES = ENGINES


def test_target_change_is_announced(stateful):
    fe = TestFrontend(stateful.sockets["vm0"])
    try:
        fe.start()
        fe.poll_backend(0.2)  # whatever the start sent
        stateful.api.set_target("vm0", 8 << 20)
        assert fe.wait_config_change(), "a new target was not announced"
        assert fe.num_pages() == 2048
    finally:
        fe.close()


def test_config_restored_from_the_state_directory_is_announced(stateful):
    """A restarted daemon that adopts its journal sets `actual` and
    poison_val itself (the driver wrote them to the daemon that died): the
    frontend must be told, or its copy keeps the fresh daemon's zeros."""
    ram = GuestRam(96 << 20)
    try:
        fe = TestFrontend(stateful.sockets["vm0"], ram=ram)
        fe.start()
        fe.set_poison(0xAA)
        held = list(range(fe.first_free_pfn, fe.first_free_pfn + 300))
        ram.touch(held)
        fe.inflate(held)
        fe.set_actual(len(held))
        stateful.wait_vm("vm0", lambda s: s["ballooned_bytes"] == len(held) * 4096)

        crash_and_restart(stateful)
        reconnect(fe)
        stateful.wait_vm("vm0", lambda s: s["running"] and s["ballooned_bytes"] == len(held) * 4096)
        assert fe.wait_config_change(), "the restored config was not announced"
        config = fe.get_config()
        assert (config.actual, config.poison_val) == (len(held), 0xAA)
        fe.close()
    finally:
        ram.close()
