"""``pilotfish top``'s pure core: scrapes parsed, windows and percentiles computed, the table
drawn; no sockets. The scrape text is the sidecar's own rendering of its metrics."""

from __future__ import annotations

import json
import math

import pytest

from pilotfish.top.core import (
    ALL_ROUTES,
    Counts,
    RouteKey,
    ScrapeError,
    parse_scrape,
    quantile,
    succeeded,
    window_rows,
)
from pilotfish.top.run import Target, admin_targets
from pilotfish.top.view import Frame, format_json, format_table
from sidecar.observability.metrics import MeshMetrics

INF = math.inf


def _metrics() -> MeshMetrics:
    return MeshMetrics(proc="/nonexistent")


def _record(m: MeshMetrics, direction: str, service: str, route: str, *outcomes: tuple[
    int, int | None, str, float, int
]) -> None:
    stats = m.route(direction, service, route)
    for status, grpc_status, flag, seconds, times in outcomes:
        for _ in range(times):
            stats.record(status, grpc_status, flag, seconds)


@pytest.mark.parametrize(
    ("code", "grpc_status", "ok"),
    [
        ("200", "0", True),
        ("200", "", True),
        ("404", "", True),  # an answer, if not the one hoped for (Linkerd's rule)
        ("503", "", False),
        ("200", "14", False),
        ("200", "5", False),
        ("0", "", False),  # no response at all
        ("x", "", False),
    ],
)
def test_what_counts_as_success(code: str, grpc_status: str, ok: bool) -> None:
    assert succeeded(code, grpc_status) is ok


def test_a_scrape_sums_outcomes_per_route() -> None:
    m = _metrics()
    _record(m, "outbound", "quotes", "0", (200, 0, "", 0.003, 7), (200, 14, "FI", 0.0001, 3))
    _record(m, "inbound", "local_app", "", (200, 0, "", 0.02, 2))
    scrape = parse_scrape(m.render(), at=5.0)

    quotes = scrape.routes[RouteKey("outbound", "quotes", "0")]
    assert (quotes.requests, quotes.successes) == (10, 7)
    # Cumulative, as scraped: 3 under 0.5 ms, all 10 under 5 ms.
    assert quotes.buckets[0.0005] == 3 and quotes.buckets[0.005] == 10 and quotes.buckets[INF] == 10
    assert scrape.routes[RouteKey("inbound", "local_app", "")].requests == 2
    assert scrape.at == 5.0


def test_text_that_is_not_prometheus_is_refused() -> None:
    with pytest.raises(ScrapeError):
        parse_scrape('pilotfish_requests_total{direction="outbound" 1\n', at=0.0)


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        # Linear inside the bucket: the 50th of 100 requests, all in (0.01, 0.025].
        (0.5, {0.01: 0, 0.025: 100, INF: 100}, 0.0175),
        (0.99, {0.01: 0, 0.025: 100, INF: 100}, 0.02485),
        # From 0 in the first bucket.
        (0.5, {0.001: 10, INF: 10}, 0.0005),
        # In the +Inf bucket: the highest finite bound.
        (0.99, {0.001: 10, 1.0: 10, INF: 20}, 1.0),
        (0.5, {0.001: 5, 0.002: 5, 0.004: 10, INF: 10}, 0.001),
        (0.75, {0.001: 5, 0.002: 5, 0.004: 10, INF: 10}, 0.003),
        (0.5, {0.001: 0, INF: 0}, None),
        (0.5, {}, None),
        (0.5, {0.001: 3}, None),  # no +Inf bucket: not a histogram
    ],
)
def test_quantiles_as_histogram_quantile_computes_them(
    q: float, buckets: dict[float, float], expected: float | None
) -> None:
    got = quantile(q, buckets)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_quantile_outside_0_to_1_is_an_error() -> None:
    with pytest.raises(ValueError):
        quantile(1.5, {INF: 1})


def test_a_window_is_the_growth_between_two_scrapes_of_each_sidecar() -> None:
    a, b = _metrics(), _metrics()
    _record(a, "outbound", "quotes", "0", (200, 0, "", 0.003, 100))
    _record(b, "outbound", "quotes", "0", (200, 0, "", 0.003, 50))
    before = {"a": parse_scrape(a.render(), 10.0), "b": parse_scrape(b.render(), 10.5)}
    # In the window: a 40 OK (2 s), b 15 OK and 5 aborted (2 s), on two routes of quotes.
    _record(a, "outbound", "quotes", "0", (200, 0, "", 0.02, 40))
    _record(b, "outbound", "quotes", "0", (200, 0, "", 0.02, 15), (200, 14, "FI", 0.0001, 5))
    _record(b, "outbound", "quotes", "slow", (200, 0, "", 2.0, 4))
    _record(a, "inbound", "local_app", "", (200, 0, "", 0.01, 9))
    after = {"a": parse_scrape(a.render(), 12.0), "b": parse_scrape(b.render(), 12.5)}

    rows = window_rows(before, after, ["outbound"])

    assert [(r.service, r.route) for r in rows] == [
        ("quotes", ALL_ROUTES), ("quotes", "0"), ("quotes", "slow")
    ]
    total, route0, slow = rows
    assert route0.requests == 60 and route0.rps == pytest.approx(30.0)
    assert route0.success_rate == pytest.approx(55 / 60)
    # 5 of 60 under 0.5 ms, 55 in (10 ms, 25 ms]: the median is interpolated in that bucket.
    assert route0.p50 == pytest.approx(0.01 + 0.015 * (30 - 5) / 55)
    assert slow.requests == 4 and slow.success_rate == 1.0
    assert slow.p50 == pytest.approx(1.0 + 1.5 * 0.5)  # (1 s, 2.5 s]
    assert total.requests == 64 and total.rps == pytest.approx(32.0)
    assert total.success_rate == pytest.approx(59 / 64)
    assert [r.service for r in window_rows(before, after, ["inbound"])] == ["local_app"] * 2


def test_a_restarted_sidecar_counts_from_zero_and_a_new_one_waits_for_its_second_scrape() -> None:
    old, new, late = _metrics(), _metrics(), _metrics()
    _record(old, "outbound", "quotes", "0", (200, 0, "", 0.003, 100))
    before = {"s": parse_scrape(old.render(), 0.0)}
    _record(new, "outbound", "quotes", "0", (200, 0, "", 0.003, 8))  # the restarted process
    _record(late, "outbound", "quotes", "0", (200, 0, "", 0.003, 1000))
    after = {"s": parse_scrape(new.render(), 2.0), "t": parse_scrape(late.render(), 2.0)}
    (_, route) = window_rows(before, after)
    assert route.requests == 8 and route.rps == pytest.approx(4.0)


def test_requests_no_route_matched_have_no_service_row() -> None:
    m = _metrics()
    before = {"s": parse_scrape(m.render(), 0.0)}
    _record(m, "outbound", "", "", (404, 12, "NR", 0.001, 3))
    assert window_rows(before, {"s": parse_scrape(m.render(), 1.0)}) == []


def test_counts_minus_and_add() -> None:
    later = Counts(10, 9, {0.1: 5, INF: 10})
    delta = later.minus(Counts(4, 4, {0.1: 2, INF: 4}))
    assert (delta.requests, delta.successes, delta.buckets) == (6, 5, {0.1: 3, INF: 6})
    delta.add(Counts(1, 0, {INF: 1}))
    assert (delta.requests, delta.buckets[INF]) == (7, 7)


def _frame() -> Frame:
    m = _metrics()
    before = {"greeter-1": parse_scrape(m.render(), 0.0)}
    _record(m, "outbound", "quotes", "0", (200, 0, "", 0.003, 18), (200, 14, "FI", 0.0001, 2))
    after = {"greeter-1": parse_scrape(m.render(), 2.0)}
    return Frame(
        rows=window_rows(before, after),
        sidecars=["greeter-1"],
        unreachable=[("quotes-2", "127.0.0.1:1: connection refused")],
        window=2.0,
        clock="12:00:00",
    )


def test_the_table() -> None:
    assert format_table(_frame()) == (
        "pilotfish top  12:00:00  1 sidecar, last 2.0 s\n"
        "  unreachable: quotes-2: 127.0.0.1:1: connection refused\n"
        "\n"
        "DIRECTION  SERVICE  ROUTE  SUCCESS   RPS    P50    P99  REQUESTS\n"
        "outbound   quotes   (all)   90.00%  10.0  3.6ms  5.0ms        20\n"
        "outbound   quotes     0     90.00%  10.0  3.6ms  5.0ms        20\n"
    )


def test_the_json() -> None:
    doc = json.loads(format_json(_frame()))
    assert doc["sidecars"] == ["greeter-1"] and doc["window_s"] == 2.0
    assert doc["unreachable"] == [
        {"sidecar": "quotes-2", "error": "127.0.0.1:1: connection refused"}
    ]
    assert doc["rows"][1] == {
        "direction": "outbound", "service": "quotes", "route": "0", "requests": 20, "rps": 10.0,
        "success_rate": 0.9, "p50_ms": pytest.approx(3.611, abs=0.001),
        "p99_ms": pytest.approx(4.972, abs=0.001),
    }


def test_an_empty_window_says_so() -> None:
    frame = Frame(rows=[], sidecars=[], unreachable=[], window=2.0, clock="12:00:00")
    assert format_table(frame).endswith("no requests in this window\n")


def test_admin_addresses_repeated_or_comma_separated() -> None:
    assert admin_targets(["127.0.0.1:15000,http://127.0.0.1:15100/", " 10.0.0.2:15000 "]) == [
        Target("127.0.0.1:15000", "127.0.0.1:15000"),
        Target("127.0.0.1:15100", "127.0.0.1:15100"),
        Target("10.0.0.2:15000", "10.0.0.2:15000"),
    ]
