"""QEMU's config cache (config-cache=on, qemu-patches/0002) with Linux's
stock driver: the guest's config reads no longer reach the daemon, and the
guest still follows every target, also after the daemon was killed and
QEMU reconnected.

Why: the stock virtio_balloon reads num_pages after every 256-page buffer.
Without the cache each read is a GET_CONFIG round trip to the daemon, made
in the vCPU thread; with it QEMU answers from its copy, which it refreshes
on the daemon's CONFIG_CHANGE_MSG and at (re)connect. A copy that is not
refreshed leaves the guest on a stale target, so each target here must be
reached, and the GET_CONFIG count must stay near the number of changes,
not of buffers. So must the count of requests QEMU wants acknowledged:
the guest's config writes (one per buffer) are forwarded from QEMU's main
loop without waiting for an answer (qemu-patches/0005).
"""

from __future__ import annotations

import pytest

from harness import VhostUserBalloon
from harness.daemon import DaemonProcess
from tests.e2e.conftest import ENGINES, assert_served_by
from tests.e2e.waiting import MIB, wait_for

pytestmark = [pytest.mark.vm]

#: Config changes go out through the backend channel of either engine.
E2E_ENGINES = ENGINES

#: 256 pages a buffer: each MiB of balloon is one buffer each way.
TARGETS_MIB = (64, 16, 96, 0)
#: GET_CONFIG the daemon may answer per target change: QEMU's refresh on
#: the CONFIG_CHANGE_MSG, plus slack for a refresh at a device start.
READS_PER_CHANGE = 3
#: Requests QEMU may want acknowledged per target change: none is expected
#: in a running device; slack for a ring restarted meanwhile.
ACKS_PER_CHANGE = 2


def counters(daemon: DaemonProcess) -> dict[str, int]:
    return daemon.api.vm("guest")["counters"]


def follow(daemon: DaemonProcess, targets_mib: tuple[int, ...], what: str) -> tuple[int, int, int]:
    """Set each target and wait for the guest to reach it; return the
    (GET_CONFIG, inflate + deflate buffers, requests QEMU wanted
    acknowledged) the daemon saw meanwhile."""
    before = counters(daemon)
    for mib in targets_mib:
        daemon.api.set_target("guest", mib * MIB)
        wait_for(f"{what}: the guest to reach {mib} MiB",
                 lambda: (v := daemon.api.vm("guest"))["actual_bytes"] == mib * MIB
                 and v["ballooned_bytes"] == mib * MIB, 120, 0.05)
    after = counters(daemon)
    buffers = sum(after[k] - before[k] for k in ("inflate_buffers", "deflate_buffers"))
    return after["config_reads"] - before["config_reads"], buffers, after["acks_requested"] - before["acks_requested"]


def test_stock_driver_follows_targets_without_a_config_read_per_buffer(make_vm, tmp_path, engine):
    daemon = DaemonProcess(tmp_path / "daemon", vms=("guest",), log_level="info",
                           extra_args=["--state-dir", str(tmp_path / "state"), "--engine", engine])
    daemon.start()
    try:
        vm = make_vm("6.1", memory_mib=512, load_balloon=True,
                     balloon=VhostUserBalloon(daemon.sockets["guest"], chardev_options="reconnect-ms=200"))
        wait_for("the device to start", lambda: daemon.api.vm("guest")["running"])

        reads, buffers, acks = follow(daemon, TARGETS_MIB, "first daemon")
        assert buffers >= 2 * 96, f"only {buffers} buffers: the guest did not move the balloon"
        assert reads <= READS_PER_CHANGE * len(TARGETS_MIB), \
            f"{reads} GET_CONFIG for {buffers} buffers: the guest's config reads reach the daemon"
        # The guest writes `actual` after every buffer; QEMU forwards those
        # writes without waiting for an acknowledgement (qemu-patches/0005),
        # which it would otherwise wait for holding the BQL.
        assert acks <= ACKS_PER_CHANGE * len(TARGETS_MIB), \
            f"{acks} acknowledgements asked for over {buffers} buffers: QEMU waits for each config write"

        # The daemon dies with a balloon in place; QEMU reconnects to the
        # new one, which restores the balloon and its target from --state-dir.
        follow(daemon, (32,), "before the restart")
        daemon.kill()
        daemon.start()
        wait_for("QEMU to reconnect and the device to start",
                 lambda: (v := daemon.api.vm("guest"))["connected"] and v["running"], 60)
        assert vm.running, "QEMU died when the daemon restarted"
        reads, buffers, acks = follow(daemon, TARGETS_MIB, "after the restart")
        assert buffers >= 2 * 96
        assert acks <= ACKS_PER_CHANGE * len(TARGETS_MIB), f"{acks} acknowledgements after the restart"
        assert reads <= READS_PER_CHANGE * len(TARGETS_MIB), \
            f"{reads} GET_CONFIG for {buffers} buffers after the restart"
        assert_served_by(daemon, engine)
    finally:
        daemon.stop()
