"""PeakAllocation: the largest allocation of each VM's RAM file seen while
something runs (a live migration), sampled from a thread every 20 ms.

What a migration allocates on either side lasts only as long as it runs
(the source's daemon discards the balloon again when logging ends), so a
figure read before and after misses it; the test and the benchmark of live
migration both need the peak.
"""

from __future__ import annotations

import threading

from .vm import Vm


class PeakAllocation:
    """`with PeakAllocation(src, dst) as p:` … then `p.peak[i]` (bytes) for
    the i-th VM and `p.samples`, how many looks that took."""

    def __init__(self, *vms: Vm, interval: float = 0.02) -> None:
        self.vms = vms
        self.interval = interval
        self.peak = [0] * len(vms)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for i, vm in enumerate(self.vms):
            try:
                self.peak[i] = max(self.peak[i], vm.memfd_allocated_bytes())
            except Exception:
                pass  # a QEMU going away at the end

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakAllocation:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # as the migration completed: the last pages may have come since the last sample
