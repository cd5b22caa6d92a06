"""gRPC's proxyless client accepts (ACKs) every policy field we push, and still routes.

Policies that would change which backend answers are set so they never fire (a fault behind a
header the probe never sends, a generous rate limit), so the counts stay predictable.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from control_plane.main import start_control_plane
from tests.control_plane.test_proxyless import (
    PROBE,
    Counts,
    Recorder,
    _backend,
    _bootstrap,
    _finish,
    _round,
    _tell,
)

CALLS = 12
ECHO_POLICIES = {
    "least_request": """
    load_balancing: {policy: least_request, choice_count: 3, active_request_bias: 0.5}""",
    "ring_hash": """
    load_balancing: {policy: ring_hash, hash_on: header, hash_key: x-user}""",
    "maglev": """
    load_balancing: {policy: maglev}""",
    "random": """
    load_balancing: {policy: weighted_random}""",
    "peak_ewma": """
    load_balancing: {policy: peak_ewma, ewma_decay: 5s}""",
}


def _mesh(ports: list[int], lb: str) -> str:
    return f"""
telemetry:
  tracing: {{sampling: 1%, otlp_endpoint: "http://127.0.0.1:4317"}}
  access_log: {{sink: stdout}}
services:
  web:
    endpoints: [127.0.0.1:1]
    depends_on: [echo]
  echo:{lb}
    health_check: {{type: grpc, interval: 10s}}
    outlier_detection: {{consecutive_5xx: 7}}
    circuit_breakers: {{max_requests: 500}}
    retry_budget: {{percent: 30}}
    adaptive_throttling: {{enabled: true}}
    load_shedding: true
    endpoints: [127.0.0.1:{ports[0]}, 127.0.0.1:{ports[1]}]
    routes:
      - match: {{path: /echo.Echo/Canary}}
        cluster: echo-canary
        retry: off
        fallback: {{cluster: echo}}
      - match: {{prefix: /echo.Echo/}}
        retry: {{attempts: 2, retry_on: [unavailable, reset], per_try_timeout: 1s,
                 retriable_status_codes: [503], retry_non_idempotent: true}}
        rate_limit: {{max_tokens: 100000}}
        fault: {{header: {{name: x-never-sent}}, delay: {{duration: 1s, percentage: 50}},
                 abort: {{http_status: 503, grpc_status: unavailable, percentage: 12.5}}}}
  echo-canary:
    endpoints: [127.0.0.1:{ports[2]}]
    routes:
      - match: {{prefix: /}}
        rate_limit: {{max_tokens: 10, per_caller: {{header: x-user}}}}
        fallback: {{response: {{status: 503, body: busy}}}}
"""


@pytest.mark.parametrize("lb", sorted(ECHO_POLICIES))
def test_grpc_proxyless_client_accepts_every_policy(tmp_path: Path, lb: str) -> None:
    recorder = Recorder()

    async def scenario() -> Counts:
        backends = [await _backend(name) for name in ("a", "b", "canary")]
        ports = [port for _, port in backends]
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text(_mesh(ports, ECHO_POLICIES[lb]))
        plane = await start_control_plane(mesh, "127.0.0.1", 0, callbacks=recorder,
                                          poll_interval=0.05)
        bootstrap = tmp_path / "bootstrap.json"
        bootstrap.write_text(json.dumps(_bootstrap(plane.port)))
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(PROBE), "echo", str(CALLS), "/echo.Echo/Who", "/echo.Echo/Canary",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)},
        )
        try:
            counts = await _round(process)
            await _tell(process, "quit")
            _, stderr = await asyncio.wait_for(process.communicate(), 30)
            assert process.returncode == 0, stderr.decode()[-3000:]
        finally:
            await _finish(process, plane, backends)
        return counts

    counts = asyncio.run(asyncio.wait_for(scenario(), 50))
    assert recorder.nacks == []  # gRPC accepted every resource we sent
    assert sum(counts["/echo.Echo/Who"].values()) == CALLS
    assert set(counts["/echo.Echo/Who"]) <= {"a", "b"}
    assert counts["/echo.Echo/Canary"] == {"canary": CALLS}
