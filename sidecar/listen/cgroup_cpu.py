"""The pod's CPU use from its cgroup v2, for inbound load shedding.

``cpu.stat`` counts the microseconds the cgroup's processes ran (``usage_usec``); ``cpu.max``
is its quota (``"200000 100000"``: two CPUs' worth per period, or ``max``: as many as the
cgroup may run on). Two readings give the share of the quota used in between. The parsing is
pure; ``CgroupCpu`` does the reading.
"""

from __future__ import annotations

import os
from pathlib import Path


def usage_usec(cpu_stat: str) -> int | None:
    for line in cpu_stat.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec" and value.strip().isdigit():
            return int(value)
    return None


def quota_cpus(cpu_max: str, available: int) -> float:
    """CPUs the quota allows; ``max`` (no quota): the ``available`` ones."""
    quota, _, period = cpu_max.strip().partition(" ")
    if quota == "max" or not quota.isdigit() or not period.strip().isdigit():
        return float(available)
    return max(int(quota) / max(int(period), 1), 1e-3)


class CgroupCpu:
    """Samples one cgroup directory; ``sample`` gives the share of its quota used since the
    previous call (None on the first call, or when the files cannot be read)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self._last: tuple[int, float] | None = None

    def sample(self, now: float) -> float | None:
        try:
            used = usage_usec((self.directory / "cpu.stat").read_text())
            max_text = (self.directory / "cpu.max").read_text()
        except OSError:
            return None
        if used is None:
            return None
        last, self._last = self._last, (used, now)
        if last is None or now <= last[1]:
            return None
        cpus = quota_cpus(max_text, len(os.sched_getaffinity(0)))
        return (used - last[0]) / 1e6 / (now - last[1]) / cpus
