"""The exposition, read back by Prometheus's own parser."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.observability.metrics import INBOUND, OUTBOUND, MeshMetrics
from sidecar.observability.registry import Registry


def parse(text: str) -> dict[str, Any]:
    """family name → family, as prometheus_client sees it (counters lose ``_total``)."""
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    family_name = name.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum")
    family_name = family_name.removesuffix("_count")
    for s in families[family_name].samples:
        if s.name == name and s.labels == labels:
            return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def test_request_metrics_round_trip_through_the_prometheus_parser() -> None:
    metrics = MeshMetrics()
    quotes = metrics.route(OUTBOUND, "quotes", "quotes-route")
    assert metrics.route(OUTBOUND, "quotes", "quotes-route") is quotes  # resolved once
    quotes.record(200, None, "", 0.003, bytes_in=10, bytes_out=250)
    quotes.record(200, None, "", 0.2, bytes_out=50)
    quotes.record(503, None, "UF", 0.0004)
    grpc = metrics.route(INBOUND, "ledger", 'odd "name"\\x')
    grpc.record(200, 14, "", 12.0)
    cluster = metrics.cluster("quotes")
    cluster.retries.inc()
    cluster.timeouts.inc(2)
    cluster.healthy_hosts.set(3)
    metrics.active_connections.labels(INBOUND).add(5)
    metrics.active_streams.labels(OUTBOUND).add(2)
    metrics.xds_update("RouteConfiguration", accepted=True)
    metrics.xds_update("Cluster", accepted=False)
    metrics.read_span_drops(lambda: 7)

    families = parse(metrics.render())
    ok = {
        "direction": "outbound",
        "service": "quotes",
        "route": "quotes-route",
        "response_code": "200",
        "grpc_status": "",
        "response_flags": "",
    }
    assert families["pilotfish_requests"].type == "counter"
    assert families["pilotfish_request_duration_seconds"].type == "histogram"
    assert families["pilotfish_requests"].documentation == "Requests completed by the proxy."
    assert sample(families, "pilotfish_requests_total", **ok) == 2
    uf = {**ok, "response_code": "503", "response_flags": "UF"}
    assert sample(families, "pilotfish_requests_total", **uf) == 1
    duration = "pilotfish_request_duration_seconds"
    assert sample(families, f"{duration}_count", **ok) == 2
    assert sample(families, f"{duration}_sum", **ok) == pytest.approx(0.203)
    assert sample(families, f"{duration}_bucket", **ok, le="0.0025") == 0
    assert sample(families, f"{duration}_bucket", **ok, le="0.005") == 1
    assert sample(families, f"{duration}_bucket", **ok, le="0.25") == 2
    assert sample(families, f"{duration}_bucket", **ok, le="+Inf") == 2
    assert sample(families, f"{duration}_bucket", **uf, le="0.0005") == 1
    odd = {
        "direction": "inbound",
        "service": "ledger",
        "route": 'odd "name"\\x',  # escaping survives the round trip
        "response_code": "200",
        "grpc_status": "14",
        "response_flags": "",
    }
    assert sample(families, f"{duration}_bucket", **odd, le="10") == 0
    assert sample(families, f"{duration}_bucket", **odd, le="30") == 1
    route = {"direction": "outbound", "service": "quotes", "route": "quotes-route"}
    assert sample(families, "pilotfish_request_bytes_total", **route) == 10
    assert sample(families, "pilotfish_response_bytes_total", **route) == 300
    assert sample(families, "pilotfish_upstream_retries_total", cluster="quotes") == 1
    assert sample(families, "pilotfish_upstream_timeouts_total", cluster="quotes") == 2
    assert sample(families, "pilotfish_upstream_hosts", cluster="quotes", health="healthy") == 3
    assert sample(families, "pilotfish_active_connections", direction="inbound") == 5
    assert sample(families, "pilotfish_active_streams", direction="outbound") == 2
    assert sample(families, "pilotfish_xds_updates_total", type="Cluster", result="rejected") == 1
    assert sample(families, "pilotfish_tracing_spans_dropped_total") == 7


def test_process_metrics_come_from_proc() -> None:
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc")
    families = parse(MeshMetrics().render())
    cpu = sample(families, "pilotfish_process_cpu_seconds_total")
    rss = sample(families, "pilotfish_process_resident_memory_bytes")
    assert cpu > 0
    assert 10 * 2**20 < rss < 16 * 2**30
    assert sample(families, "pilotfish_process_open_fds") >= 3


def test_process_metrics_from_a_fake_proc(tmp_path: Path) -> None:
    # The command name may hold spaces and parentheses; fields are counted after the last ')'.
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 30
    (tmp_path / "stat").write_text("42 (odd) name) " + " ".join(fields) + "\n")
    (tmp_path / "statm").write_text("1000 300 0 0 0 0 0\n")
    (tmp_path / "fd").mkdir()
    families = parse(MeshMetrics(proc=str(tmp_path)).render())
    ticks = os.sysconf("SC_CLK_TCK")
    assert sample(families, "pilotfish_process_cpu_seconds_total") == pytest.approx(400 / ticks)
    rss = sample(families, "pilotfish_process_resident_memory_bytes")
    assert rss == 300 * os.sysconf("SC_PAGE_SIZE")
    assert sample(families, "pilotfish_process_open_fds") == 0
    # Off Linux the families are still declared, without samples.
    families = parse(MeshMetrics(proc=str(tmp_path / "missing")).render())
    assert families["pilotfish_process_cpu_seconds"].samples == []


def test_exposition_format_details() -> None:
    registry = Registry()
    c = registry.counter("x_total", "Help with a \\ and a\nnewline.", ("a",))
    c.labels("v").inc(1.5)
    g = registry.gauge("y", "A gauge.")
    g.labels().set(math.inf)
    text = registry.render()
    assert text.splitlines() == [
        "# HELP x_total Help with a \\\\ and a\\nnewline.",
        "# TYPE x_total counter",
        'x_total{a="v"} 1.5',
        "# HELP y A gauge.",
        "# TYPE y gauge",
        "y +Inf",
    ]
    assert text.endswith("\n")
    with pytest.raises(ValueError, match="already registered"):
        registry.gauge("y", "again")
    with pytest.raises(ValueError, match="reserved"):
        registry.histogram("h", "h", ("le",), (1.0,))
    with pytest.raises(ValueError, match="not a valid"):
        registry.counter("1bad", "bad")
    with pytest.raises(ValueError, match="wants labels"):
        c.labels("v", "w")


def test_hot_path_update_is_cheap() -> None:
    import timeit

    metrics = MeshMetrics()
    stats = metrics.route(OUTBOUND, "quotes", "r")
    per_call = min(timeit.repeat(lambda: stats.record(200, None, "", 0.01, 100, 200), number=2000))
    assert per_call / 2000 < 20e-6  # a few microseconds; generous for loaded CI machines
