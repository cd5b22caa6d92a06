"""The TLS cost harness, run for real but tiny and without valgrind: every target starts, takes
new connections (TLS, mTLS with the SPIFFE ID check, or cleartext) and serves requests through
to the upstream."""

from __future__ import annotations

from pathlib import Path

from bench.tls_connections import TARGETS, run


def test_every_target_takes_connections_and_serves_requests(tmp_path: Path) -> None:
    costs = run(TARGETS, connections=3, requests=4, workdir=tmp_path)
    assert [c.target for c in costs] == list(TARGETS)
    for cost in costs:
        assert (cost.connections_ok, cost.requests_ok) == (3, 4), cost
        assert cost.instructions_per_connection is None  # nothing counted without valgrind
