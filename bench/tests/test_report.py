"""The report renders medians, ratios and failures from a hand-made result."""

from __future__ import annotations

from datetime import UTC, datetime

from bench.procs import Pinning
from bench.report import medians, raw_json, render_markdown
from bench.runner import BenchResult, Failure, Machine
from bench.targets import Direct, Nghttpx, Pilotfish, PilotfishTcp
from bench.workloads import WORKLOADS, Measurement, Settings


def _m(rps: float, p50: float, cpu: float | None = None) -> Measurement:
    return Measurement(
        requests=1000, elapsed_s=1.0, requests_per_s=rps, mb_per_s=None, p50_us=p50,
        p99_us=p50 * 2, proxy_cpu_us_per_request=cpu, proxy_rss_mb=None if cpu is None else 30.0,
        proxy_processes=None if cpu is None else 1, others_on_proxy_core_pct=0.0,
    )


def _result() -> BenchResult:
    c1 = next(w for w in WORKLOADS if w.key == "h2-small-c1")
    result = BenchResult(
        started=datetime(2026, 1, 1, tzinfo=UTC),
        finished=datetime(2026, 1, 1, 0, 5, tzinfo=UTC),
        invocation=["python", "-m", "bench"],
        settings=Settings(runs=3, duration_s=5, probe_s=0.4, max_requests=10, grpc_warmup_calls=1),
        machine=Machine(
            cpus=2, cpu_model="cpu", kernel="Linux 6", python="3.11", tools={},
            pilotfish_commit="abc", load_average="0 0 0",
        ),
        pinning=Pinning(load_cpu=0, proxy_cpu=1),
        targets=[Direct(), Pilotfish(workers=1), Pilotfish(workers=2), Nghttpx()],
        workloads=(c1,),
    )
    result.outcomes[("direct", c1.key)] = [_m(100, 20), _m(90, 22), _m(110, 21)]
    result.outcomes[("pilotfish", c1.key)] = [
        _m(10, 520, 500.0), Failure("boom"), _m(12, 500, 400.0)
    ]
    result.outcomes[("pilotfish-2w", c1.key)] = [Failure("did not start: nope")]
    result.outcomes[("nghttpx", c1.key)] = [_m(50, 60, 45.0)]
    return result


def test_medians_ignore_failed_runs() -> None:
    m = medians(_result(), "pilotfish", "h2-small-c1")
    assert (m.runs, m.runs_ok) == (3, 2)
    assert m.p50_us == 510
    assert m.failure == "boom"


def test_markdown_has_ratios_added_latency_and_failures() -> None:
    text = render_markdown(_result())
    # The last such row is the per-workload table's (the first is "At a glance").
    row = [line for line in text.splitlines() if line.startswith("| pilotfish |")][-1]
    assert "+489" in row  # p50 510 against direct's 21
    assert "0.11x" in row  # 11 req/s against direct's 100
    assert "10.00x" in row  # CPU 450 µs/req against nghttpx's 45
    assert "2/3" in row
    assert "| pilotfish-2w | failed |" in text
    assert "did not start: nope" in text


def test_raw_json_is_json() -> None:
    assert '"workload": "h2-small-c1"' in raw_json(_result())


def test_passthrough_target_is_set_against_nghttpx() -> None:
    result = _result()
    result.targets.insert(-1, PilotfishTcp())
    result.outcomes[("pilotfish-tcp", "h2-small-c1")] = [_m(30, 80, 20.0), _m(26, 90, 22.0)]
    text = render_markdown(result)
    assert "| h2-small-c1 | 28 | 50 | 0.56x | 21.0 | 45.0 |" in text
    assert "`BOOTSTRAP-TCP.yaml` for pilotfish-tcp:" in text
    assert "--config BOOTSTRAP-TCP.yaml" in text
    assert "mode: tcp" in text


def test_no_passthrough_table_without_the_target() -> None:
    assert "TCP passthrough" not in render_markdown(_result())


def test_idle_rss_is_the_median_over_starts_beside_the_peak() -> None:
    result = _result()
    result.idle_rss["pilotfish"] = [30 * 2**20, 34 * 2**20, 31 * 2**20]
    text = render_markdown(result)
    glance = text.split("## At a glance")[1].split("## Results")[0]
    rows = {line.split(" | ")[0]: line for line in glance.splitlines() if line.startswith("| ")}
    assert rows["| proxy"].endswith("| idle RSS MB | max peak RSS MB |")
    # pilotfish: idle median 31 MiB, then the largest per-workload peak (30 MiB in _m).
    assert rows["| pilotfish"].endswith("| 31.0 | 30.0 |")
    # nghttpx was not sampled idle in this result: no figure rather than a made-up one.
    assert rows["| nghttpx"].endswith("| — | 30.0 |")
    assert '"idle_rss_bytes": {' in raw_json(result)
