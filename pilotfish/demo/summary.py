"""What the demo measured, and how it reads: pure functions over call results, no I/O."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from pilotfish.demo.topology import CLIENT_NODE_ID

OK = "OK"
PERCENTILES = (50.0, 90.0, 99.0)
TRACES_SHOWN = 3
JAEGER_UI_PORT = 16686


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFinished:
    """One SayHello call as the load driver saw it."""

    status: str  # a grpc.StatusCode name, e.g. "OK", "UNAVAILABLE"
    latency: float  # seconds
    greeter: str | None = None  # HelloReply.served_by
    quotes: str | None = None  # HelloReply.quote_served_by
    detail: str = ""  # the status details of a failed call
    trace_id: str | None = None  # 32 hex digits: the trace the load driver started for it
    started: float = 0.0  # time.monotonic() when the call was sent


class CallLog:
    """Thread-safe list of finished calls, appended to by the load driver's callers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list[CallFinished] = []

    def add(self, call: CallFinished) -> None:
        with self._lock:
            self._calls.append(call)

    def snapshot(self) -> list[CallFinished]:
        with self._lock:
            return list(self._calls)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of values at or below it."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    # The tolerance keeps float error from pushing an exact rank up by one (99.9% of 1000).
    rank = math.ceil(q / 100.0 * len(sorted_values) - 1e-9)
    return sorted_values[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    p50: float
    p90: float
    p99: float
    max: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    calls: int
    elapsed: float
    statuses: dict[str, int]  # most common first
    latency: Latency | None  # None when no call finished
    served: dict[tuple[str, str], int]  # (greeter, quotes) -> OK calls
    details: dict[str, str]  # status -> the details of its first failed call

    @property
    def ok(self) -> int:
        return self.statuses.get(OK, 0)

    @property
    def greeters(self) -> list[str]:
        return sorted({g for g, _ in self.served})

    @property
    def quotes(self) -> list[str]:
        return sorted({q for _, q in self.served})


def summarize(calls: Iterable[CallFinished], elapsed: float) -> Summary:
    calls = list(calls)
    statuses = Counter(c.status for c in calls)
    latencies = sorted(c.latency for c in calls)
    latency = None
    if latencies:
        p50, p90, p99 = (percentile(latencies, q) for q in PERCENTILES)
        latency = Latency(p50=p50, p90=p90, p99=p99, max=latencies[-1])
    served: Counter[tuple[str, str]] = Counter()
    details: dict[str, str] = {}
    for c in calls:
        if c.status != OK:
            details.setdefault(c.status, c.detail)
            continue
        served[(c.greeter or "?", c.quotes or "?")] += 1
    return Summary(
        calls=len(calls),
        elapsed=elapsed,
        statuses=dict(statuses.most_common()),
        latency=latency,
        served=dict(served),
        details=details,
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def format_progress(summary: Summary) -> str:
    rate = summary.calls / summary.elapsed if summary.elapsed > 0 else 0.0
    errors = summary.calls - summary.ok
    line = (
        f"[{summary.elapsed:5.1f}s] {summary.calls:6d} calls  {rate:6.1f}/s  "
        f"ok {summary.ok}  errors {errors}"
    )
    if summary.latency is not None:
        line += f"  p50 {_ms(summary.latency.p50)}  p99 {_ms(summary.latency.p99)}"
    return line


def format_summary(summary: Summary) -> str:
    rate = summary.calls / summary.elapsed if summary.elapsed > 0 else 0.0
    lines = [
        f"calls: {summary.calls} in {summary.elapsed:.1f} s ({rate:.1f}/s), "
        f"ok {summary.ok}, failed {summary.calls - summary.ok}",
        "",
        "status codes:",
    ]
    if not summary.statuses:
        lines.append("  (no calls finished)")
    for status, count in summary.statuses.items():
        share = 100.0 * count / summary.calls
        line = f"  {status:<20} {count:7d}  {share:5.1f}%"
        if summary.details.get(status):
            line += f"  e.g. {summary.details[status]}"
        lines.append(line)
    lines += ["", "latency (client -> sidecar -> greeter -> sidecar -> quotes, and back):"]
    if summary.latency is None:
        lines.append("  (no calls finished)")
    else:
        lat = summary.latency
        lines.append(
            f"  p50 {_ms(lat.p50)}   p90 {_ms(lat.p90)}   p99 {_ms(lat.p99)}   max {_ms(lat.max)}"
        )
    lines += ["", "served by (OK calls, greeter x quotes):"]
    lines += _served_table(summary) or ["  (no successful calls)"]
    return "\n".join(lines)


def _served_table(summary: Summary) -> list[str]:
    greeters, quotes = summary.greeters, summary.quotes
    if not greeters:
        return []
    first = max(len("total"), *(len(g) for g in greeters))
    width = max(8, *(len(q) for q in quotes))

    def row(label: str, cells: Iterable[int]) -> str:
        return f"  {label:<{first}}" + "".join(f"  {c:>{width}d}" for c in cells)

    header = f"  {'':<{first}}" + "".join(f"  {name:>{width}}" for name in [*quotes, "total"])
    lines = [header]
    for g in greeters:
        counts = [summary.served.get((g, q), 0) for q in quotes]
        lines.append(row(g, [*counts, sum(counts)]))
    totals = [sum(summary.served.get((g, q), 0) for g in greeters) for q in quotes]
    lines.append(row("total", [*totals, sum(totals)]))
    return lines


def traces_to_show(calls: Iterable[CallFinished], count: int = TRACES_SHOWN) -> list[str]:
    """Trace ids of the first few calls: successful ones first, then failed ones."""
    calls = [c for c in calls if c.trace_id]
    ordered = [c for c in calls if c.status == OK] + [c for c in calls if c.status != OK]
    return [c.trace_id for c in ordered[:count] if c.trace_id]


def jaeger_ui(otlp_endpoint: str) -> str:
    """Where Jaeger all-in-one's UI would be, next to this OTLP/gRPC endpoint."""
    host = urlsplit(otlp_endpoint if "//" in otlp_endpoint else f"//{otlp_endpoint}").hostname
    if not host or host in ("0.0.0.0", "::"):
        host = "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{JAEGER_UI_PORT}"


def format_traces(calls: Sequence[CallFinished], otlp_endpoint: str | None) -> str:
    """The trace ids of a few calls, and where to look them up."""
    ids = traces_to_show(calls)
    if not ids:
        return "traces: no calls were made"
    lines = ["trace ids of a few calls (the load driver starts a trace for each call):"]
    lines += [f"  {trace_id}" for trace_id in ids]
    if otlp_endpoint is None:
        lines.append("tracing is off: to see these traces, run with --otlp-endpoint URL (or set")
        lines.append("OTEL_EXPORTER_OTLP_ENDPOINT), e.g. to Jaeger: see docs/tracing.md")
        return "\n".join(lines)
    ui = jaeger_ui(otlp_endpoint)
    lines.append(f"the sidecars export their spans to {otlp_endpoint}; if that is Jaeger, open")
    lines.append(f"  {ui}/trace/{ids[0]}")
    lines.append(f"  or search {ui}/search for service {CLIENT_NODE_ID}")
    return "\n".join(lines)
