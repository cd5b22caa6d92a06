"""The TLS cost harness, run for real but tiny and without valgrind: every target starts, takes
new connections (TLS, mTLS with the SPIFFE ID check, or cleartext) and serves requests through
to the upstream; and the report's lines."""

from __future__ import annotations

from pathlib import Path

from bench.tls_connections import TARGETS, Cost, clock_meter, run
from bench.tls_handshake import format_costs


def test_every_target_takes_connections_and_serves_requests(tmp_path: Path) -> None:
    costs = run(TARGETS, connections=3, requests=4, workdir=tmp_path, meter=clock_meter)
    assert [c.target for c in costs] == list(TARGETS)
    for cost in costs:
        assert (cost.connections_ok, cost.requests_ok) == (3, 4), cost
        # Metered by the clock (no timing is asserted: only that each phase was measured).
        assert set(cost.per_connection) == set(cost.per_request) == {"cpu_s", "wall_s"}


def test_the_report_shows_each_unit() -> None:
    instructions = Cost("pilotfish", 2, 2, 4, 4, {"instructions": 2e6}, {"instructions": 4e5})
    clock = Cost("nghttpx-tls", 2, 2, 4, 3, {"cpu_s": 0.002, "wall_s": 0.004},
                 {"cpu_s": 5e-5, "wall_s": 1e-4})  # fmt: skip
    lines = format_costs([instructions, clock]).splitlines()
    assert "2,000,000 instructions per new connection" in lines[0]
    assert "400,000 per request" in lines[0]
    assert "2,000 CPU µs per new connection (250 connections/s" in lines[1]
    assert "50 CPU µs per request; 2/2 connections, 3/4 requests" in lines[1]
