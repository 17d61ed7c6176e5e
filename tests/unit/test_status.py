"""VmStatus.to_json builds the API's object by hand (a list of many VMs is
answered by one process): it must give exactly what dataclasses.asdict
gives, with the same fields left out, and share no container with the
status it was made from."""

from __future__ import annotations

import dataclasses
import json

from balloond.status import _OMIT_IF_NONE, _QEMU_ONLY, Disconnect, VmStatus, WorkerStatus


def reference(status: VmStatus) -> dict:
    out = dataclasses.asdict(status)
    for key in _QEMU_ONLY if status.kind not in ("qemu", "libvirt") else ():
        del out[key]
    for key in _OMIT_IF_NONE:
        if out[key] is None:
            del out[key]
    return out


def full() -> VmStatus:
    return VmStatus(
        name="vm0", socket="/run/vm0.sock", qmp="/run/vm0.qmp", connected=True, connections=3,
        guest_ram_bytes=1 << 30, target_bytes=1 << 20, stats_interval=2.5,
        last_disconnect=Disconnect(at=12.5, reason="frontend hung up"), qmp_connected=True,
        run_state="running", discard_inhibited="migration",
        discard_guard={"reason": None, "checks": [{"what": "vfio", "found": ["/machine/x"]}]},
        features=["MUST_TELL_HOST", "STATS_VQ"], actual_bytes=4096, ballooned_bytes=8192,
        host_freed_bytes=None, pending_discard_bytes=0, stats={"free": 1, "total": 2},
        stats_updated_at=1.5, migrations=None, running=True, counters={"guest_errors": 0},
        journal_persisting=True, worker=WorkerStatus(state="running", pid=7, restarts=1, last_exit="exit code 1"),
    )


def test_to_json_is_what_asdict_gives():
    for status in (full(), VmStatus(name="bare"), dataclasses.replace(full(), kind="qemu", device="virtio-balloon")):
        got = status.to_json()
        assert got == reference(status)
        assert list(got) == list(reference(status))  # same order of keys
        assert json.dumps(got) == json.dumps(reference(status))


def test_to_json_shares_no_container_with_the_status():
    status = full()
    out = status.to_json()
    out["stats"]["free"] = 99
    out["features"].append("X")
    out["discard_guard"]["checks"][0]["found"].append("/y")
    out["worker"]["pid"] = 0
    assert status.stats["free"] == 1 and status.features == ["MUST_TELL_HOST", "STATS_VQ"]
    assert status.discard_guard["checks"][0]["found"] == ["/machine/x"] and status.worker.pid == 7


def test_the_kinds_that_look_at_a_device_say_what_went_wrong():
    """A VM on QEMU's balloon, over QMP or through libvirt, shows its last
    error and device (`balloonctl status` prints why it is not connected);
    a VM on balloond's own device has neither field."""
    for kind in ("qemu", "libvirt"):
        out = VmStatus(name="q", kind=kind, last_error="no domain 'web1'").to_json()
        assert out["last_error"] == "no domain 'web1'" and "device" in out and "updated_at" in out
    out = VmStatus(name="v", last_error="ignored").to_json()
    assert not {"last_error", "device", "updated_at"} & set(out)
