"""The steps budget: bytecodes per proxied request may not grow past bench/bytecode_budget.json.

Real traffic (h2load against nghttpd, grpcio client against a grpcio server) through a real
sidecar; the count is exact per instruction, so the gate is a count, never a timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.bytecodes import (
    DEFAULT_REQUESTS,
    GATED_WORKLOADS,
    OpcodeCounter,
    count,
    format_count,
    layer_of,
    load_budget,
    missing_tools,
    over_budget,
)
from bench.targets import REPO
from bench.workloads import WORKLOADS

_WORKLOADS = {w.key: w for w in WORKLOADS}


def test_layers_follow_the_request_path() -> None:
    assert layer_of(str(REPO / "sidecar/codec/connection.py")) == "codec"
    assert layer_of(str(REPO / "sidecar/route/policy/retry.py")) == "route-policies"
    assert layer_of(str(REPO / "sidecar/route/exchange.py")) == "router"
    assert layer_of(str(REPO / "sidecar/server.py")) == "sidecar-core"
    assert layer_of(str(REPO / ".venv/lib/python3.11/site-packages/hpack/hpack.py")) == (
        "h2-library"
    )
    assert layer_of("/usr/lib/python3.11/asyncio/events.py") == "stdlib"


def test_counter_counts_the_instructions_of_its_thread() -> None:
    def loop(n: int) -> int:
        total = 0
        for i in range(n):
            total += i
        return total

    counts = []
    for n in (10, 20):
        counter = OpcodeCounter()
        counter.start()
        loop(n)
        counter.stop()
        counts.append(sum(n for code, n in counter.per_code.items() if code is loop.__code__))
    # Each iteration costs the same fixed handful of instructions: the count is exact.
    per_iteration = (counts[1] - counts[0]) / 10
    assert per_iteration == int(per_iteration) and 3 <= per_iteration <= 8


@pytest.mark.parametrize("workload", GATED_WORKLOADS)
def test_fast_path_stays_within_its_bytecode_budget(workload: str, tmp_path: Path) -> None:
    chosen = _WORKLOADS[workload]
    assert not missing_tools([chosen]), "apt-get install -y nghttp2-client nghttp2-server"
    result = count(chosen, DEFAULT_REQUESTS, tmp_path)  # as the budget was measured
    print(format_count(result, modules=15))
    assert result.per_layer["codec"] + result.per_layer.get("http", 0) > 0  # really proxied
    problem = over_budget(result, load_budget())
    assert problem is None, problem
