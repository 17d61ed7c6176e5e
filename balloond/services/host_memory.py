"""The host's memory: MemAvailable from /proc/meminfo, PSI from /proc/pressure/memory.

Both paths can be changed (tests give files of their own). A kernel without
PSI (CONFIG_PSI off, or booted with psi=0, where reading the file fails with
EOPNOTSUPP) gives None for the PSI figures; a missing /proc/meminfo or a
MemAvailable line is an error, since without it there is nothing to decide on.

`SimulatedHost` pretends the host has `total_bytes` of memory of which the
VMs' resident guest RAM (and `other_used_bytes`) is in use: a test on a big
machine can so make the policy see a host short of memory, and see it get
memory back as balloons grow (resident_bytes is measured by the daemon).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .policy import HostSample

MEMINFO = "/proc/meminfo"
PSI_MEMORY = "/proc/pressure/memory"


class HostMemoryError(OSError):
    pass


def read_meminfo(path: str = MEMINFO) -> dict[str, int]:
    """/proc/meminfo as {field: bytes} ("kB" values converted; counts kept)."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError as exc:
        raise HostMemoryError(exc.errno, f"cannot read {path}: {exc.strerror}") from None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts:
            continue
        try:
            value = int(parts[0])
        except ValueError:
            continue
        if len(parts) > 1 and parts[1] == "kB":
            value *= 1024
        out[key.strip()] = value
    return out


def read_psi(path: str = PSI_MEMORY) -> tuple[float | None, float | None]:
    """(some avg10, full avg10) in percent, or (None, None) without PSI."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:  # absent, or EOPNOTSUPP with psi=0
        return None, None
    found: dict[str, float] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for item in rest.split():
            key, sep, value = item.partition("=")
            if sep and key == "avg10":
                try:
                    found[kind] = float(value)
                except ValueError:
                    pass
    return found.get("some"), found.get("full")


class HostMemorySampler:
    """The real host, read at each sample."""

    source = "proc"

    def __init__(self, meminfo_path: str = MEMINFO, psi_path: str = PSI_MEMORY) -> None:
        self.meminfo_path = meminfo_path
        self.psi_path = psi_path

    def sample(self, summaries: Sequence[Mapping[str, Any]] = ()) -> HostSample:
        info = read_meminfo(self.meminfo_path)
        if "MemAvailable" not in info:
            raise HostMemoryError(0, f"{self.meminfo_path} has no MemAvailable line")
        some, full = read_psi(self.psi_path)
        return HostSample(
            available_bytes=info["MemAvailable"],
            total_bytes=info.get("MemTotal", 0),
            psi_some_avg10=some,
            psi_full_avg10=full,
            source=self.source,
        )

    __call__ = sample


class SimulatedHost:
    """A pretend host of `total_bytes`: available = total - other_used -
    the resident guest RAM of every VM (from their summaries).

    `other_used_bytes` may be changed while running (a test raising and
    lowering "host pressure"). PSI is never reported.
    """

    source = "simulated"

    def __init__(self, total_bytes: int, other_used_bytes: int = 0) -> None:
        if total_bytes <= 0:
            raise ValueError("a simulated host needs a positive size")
        self.total_bytes = total_bytes
        self.other_used_bytes = other_used_bytes

    def sample(self, summaries: Sequence[Mapping[str, Any]] = ()) -> HostSample:
        resident = sum(int(s.get("resident_bytes") or 0) for s in summaries)
        return HostSample(
            available_bytes=max(0, self.total_bytes - self.other_used_bytes - resident),
            total_bytes=self.total_bytes,
            source=self.source,
        )

    __call__ = sample
