"""Driving Debian's ``h2load`` (nghttp2-client) and reading what it prints.

nghttp2 1.52's h2load prints no latency percentiles, only mean and spread, so per-request
latencies come from its ``--log-file`` (one tab-separated row per request: start time in µs
since the epoch, status code or -1, µs until the end of the response).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bench.stats import percentile

H2LOAD = "/usr/bin/h2load"

_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s), ", re.MULTILINE)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout",
    re.MULTILINE,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)
_TRAFFIC = re.compile(
    r"^traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers .*?, .*?\((\d+)\) data", re.MULTILINE
)


class H2loadOutputError(ValueError):
    """h2load's summary did not have a line this parser needs (a crash, or a new format)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class H2loadSummary:
    elapsed_s: float
    total: int
    succeeded: int
    failed: int
    errored: int
    timed_out: int
    status_2xx: int
    data_bytes: int

    @property
    def requests_per_s(self) -> float:
        # Only 2xx count: a proxy answering 503 fast must not look fast.
        return self.status_2xx / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def data_mb_per_s(self) -> float:
        return self.data_bytes / 1e6 / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def problems(self) -> str | None:
        """A short description of any request that did not end in a 2xx, or ``None``."""
        bad = self.total - self.status_2xx
        if bad == 0:
            return None
        return (
            f"{bad} of {self.total} requests not 2xx (failed {self.failed}, "
            f"errored {self.errored}, timeout {self.timed_out})"
        )


def h2load_argv(
    *,
    url: str,
    requests: str,
    clients: int,
    streams: int,
    log_file: str | None = None,
    rate_per_client: int | None = None,
) -> list[str]:
    """h2load's arguments. ``requests`` is a string so the report can show a placeholder.
    ``rate_per_client``: requests per second each connection starts (``--rps``), else as fast
    as the responses come back."""
    argv = [H2LOAD, "-n", requests, "-c", str(clients), "-m", str(streams), "-t", "1"]
    if rate_per_client is not None:
        argv.append(f"--rps={rate_per_client}")
    if log_file is not None:
        argv.append(f"--log-file={log_file}")
    argv.append(url)
    return argv


def _group_ints(pattern: re.Pattern[str], text: str, what: str) -> list[int]:
    match = pattern.search(text)
    if match is None:
        raise H2loadOutputError(f"h2load printed no {what!r} line")
    return [int(g) for g in match.groups()]


def parse_summary(text: str) -> H2loadSummary:
    finished = _FINISHED.search(text)
    if finished is None:
        raise H2loadOutputError("h2load printed no 'finished in' line")
    elapsed = float(finished.group(1)) * _UNIT_SECONDS[finished.group(2)]
    total, _started, _done, succeeded, failed, errored, timed_out = _group_ints(
        _REQUESTS, text, "requests:"
    )
    status_2xx = _group_ints(_STATUS, text, "status codes:")[0]
    data_bytes = _group_ints(_TRAFFIC, text, "traffic:")[2]
    return H2loadSummary(
        elapsed_s=elapsed,
        total=total,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timed_out=timed_out,
        status_2xx=status_2xx,
        data_bytes=data_bytes,
    )


def parse_log_latencies_us(text: str) -> list[float]:
    """Sorted latencies (µs) of the 2xx rows of an h2load ``--log-file``."""
    latencies: list[float] = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        if 200 <= int(fields[1]) < 300:
            latencies.append(float(fields[2]))
    latencies.sort()
    return latencies


def read_log_percentiles(path: Path) -> tuple[float, float]:
    """p50 and p99 (µs) from an h2load log file."""
    latencies = parse_log_latencies_us(path.read_text(encoding="ascii"))
    if not latencies:
        raise H2loadOutputError(f"{path.name}: no 2xx rows in the h2load log")
    return percentile(latencies, 50), percentile(latencies, 99)
