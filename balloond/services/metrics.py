"""Prometheus metrics, read from the VMs at scrape time.

A custom collector asks each VM for its status when scraped, so there is no
second copy of any number to keep in step with the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..vm import ManagedVm

_GAUGES = {
    "guest_ram_bytes": "Guest RAM mapped by the frontend",
    "target_bytes": "Balloon size asked of the guest",
    "actual_bytes": "Balloon size the guest reports",
    "ballooned_bytes": "Guest memory in the balloon (our device: frames tracked; QEMU's: RAM minus its actual)",
    "resident_bytes": "Host memory allocated to guest RAM (QEMU's balloon: QEMU's resident set)",
}
_COUNTERS = {
    "host_freed_bytes": "Host memory released by balloon discards (measured)",
    "reported_freed_bytes": "Host memory released by free page reporting (measured)",
    "migrations": "Balloon page migrations seen",
}
_DEVICE_COUNTERS = (
    "guest_errors",
    "invalid_pfn",
    "double_inflate",
    "stray_deflate",
    "bad_migration",
    "discard_errors",
    "inflate_buffers",
    "deflate_buffers",
    "report_buffers",
    "migrate_buffers",
    "driver_resets",
    "config_changes_sent",
    "discard_inhibits",
    "reports_skipped_inhibit",
    "targets_sent",
    # live migration: device states saved (out) and adopted (in), and balloons
    # discarded again after a migration that left the VM here
    "migrations_out",
    "migrations_in",
    "rediscards_after_migration",
    # the engine's: what a frontend's shared fds kept it from doing (status.EngineCounters)
    "calls_skipped",
    "backend_full",
    # requests the frontend wanted acknowledged (REPLY_ACK)
    "acks_requested",
    # buffers found waiting with no kick and served by the periodic look
    "lost_kicks",
)


class _VmCollector:
    def __init__(self, vms: dict[str, ManagedVm]) -> None:
        self.vms = vms

    def collect(self) -> Iterator[Any]:
        summaries = {name: vm.status() for name, vm in self.vms.items()}
        up = GaugeMetricFamily("balloond_vm_connected", "1 while a frontend is connected", labels=["vm"])
        for name, s in summaries.items():
            up.add_metric([name], 1.0 if s.connected else 0.0)
        yield up
        info = GaugeMetricFamily("balloond_vm_info", "Which device backs the VM's balloon (vhost-user: ours; "
                                 "qemu: QEMU's built-in, over QMP; libvirt: a libvirt domain's built-in, "
                                 "through libvirt)", labels=["vm", "kind"])
        inhibited = GaugeMetricFamily("balloond_vm_discard_inhibited",
                                      "1 while discards are refused (VFIO device, migration, QMP unknown)",
                                      labels=["vm"])
        for name, s in summaries.items():
            info.add_metric([name, s.kind], 1.0)
            inhibited.add_metric([name], 1.0 if s.discard_inhibited else 0.0)
        yield info
        yield inhibited
        for key, doc in _GAUGES.items():
            g = GaugeMetricFamily(f"balloond_vm_{key}", doc, labels=["vm"])
            for name, s in summaries.items():
                value = getattr(s, key)
                if value is not None:  # None: this kind of VM cannot tell
                    g.add_metric([name], float(value))
            yield g
        for key, doc in _COUNTERS.items():
            metric = key[: -len("_total")] if key.endswith("_total") else key
            c = CounterMetricFamily(f"balloond_vm_{metric}", doc, labels=["vm"])
            for name, s in summaries.items():
                value = getattr(s, key)
                if value is not None:
                    c.add_metric([name], float(value))
            yield c
        worker_up = GaugeMetricFamily("balloond_vm_worker_up", "1 while the VM's worker process runs "
                                      "(process isolation only)", labels=["vm"])
        restarts = CounterMetricFamily("balloond_vm_worker_restarts", "Times the VM's worker process was restarted",
                                       labels=["vm"])
        for name, s in summaries.items():
            if s.worker is not None:
                worker_up.add_metric([name], 1.0 if s.worker.state == "running" else 0.0)
                restarts.add_metric([name], float(s.worker.restarts))
        yield worker_up
        yield restarts
        events = CounterMetricFamily("balloond_vm_events", "Device events and refusals, by kind", labels=["vm", "kind"])
        for name, s in summaries.items():
            counters = s.counters
            for kind in _DEVICE_COUNTERS:
                events.add_metric([name, kind], float(counters.get(kind, 0)))
        yield events
        stats = GaugeMetricFamily("balloond_guest_stat", "Guest statistics from the stats queue", labels=["vm", "stat"])
        for name, s in summaries.items():
            for stat, value in s.stats.items():
                stats.add_metric([name, stat], float(value))
        yield stats


def render_metrics(vms: dict[str, ManagedVm], policy: Any = None) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_VmCollector(vms))  # type: ignore[arg-type]
    if policy is not None:
        from .policy_loop import PolicyCollector

        registry.register(PolicyCollector(policy))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
