"""The load that is put through each target, and one measurement of it.

Every load loop is bounded twice: by a request count (h2load ``-n``, the gRPC client's
``--max-calls``) sized from a short probe run, and by a wall-clock cap after which the load
generator is killed and the measurement is reported as failed.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.grpc_echo import CALL_TIMEOUT_S
from bench.h2load import (
    H2loadOutputError,
    H2loadSummary,
    h2load_argv,
    parse_summary,
    read_log_percentiles,
)
from bench.procs import LoadWindow, Pinning, WindowFigures
from bench.targets import LARGE_BODY_BYTES, LARGE_PATH, REPO, SMALL_BODY_BYTES, SMALL_PATH, python


class MeasurementError(RuntimeError):
    """One measurement could not be made; the message is shown in the report."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    runs: int
    duration_s: float
    probe_s: float
    max_requests: int
    grpc_warmup_calls: int
    # A measurement during which other processes kept the proxy's core busier than this is
    # repeated (up to noise_retries times) and the least disturbed attempt is kept.
    noise_limit_pct: float = 10.0
    noise_retries: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class H2loadWorkload:
    key: str
    title: str
    path: str
    body_bytes: int
    clients: int
    streams: int
    at_concurrency_1: bool = False
    reports_mb_per_s: bool = False
    upstream: str = "h2"
    # A fixed offered load (h2load --rps, per connection) instead of a closed loop: the
    # figures to read are the latency percentiles at that rate, and the CPU per request.
    rate_per_client: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class GrpcWorkload:
    key: str
    title: str
    in_flight: int
    payload_bytes: int = 16
    at_concurrency_1: bool = False
    reports_mb_per_s: bool = False
    upstream: str = "grpc"


Workload = H2loadWorkload | GrpcWorkload

WORKLOADS: tuple[Workload, ...] = (
    H2loadWorkload(
        key="h2-small", title="h2load, 128 B responses, 8 connections x 16 streams",
        path=SMALL_PATH, body_bytes=SMALL_BODY_BYTES, clients=8, streams=16,
    ),
    H2loadWorkload(
        key="h2-small-c1", title="h2load, 128 B responses, 1 connection x 1 stream",
        path=SMALL_PATH, body_bytes=SMALL_BODY_BYTES, clients=1, streams=1, at_concurrency_1=True,
    ),
    H2loadWorkload(
        key="h2-small-1k", title="h2load, 128 B responses, 1,000 requests/s on 1 connection",
        # One stream: h2load --rps starts up to -m requests at once, and bursts are not pacing.
        path=SMALL_PATH, body_bytes=SMALL_BODY_BYTES, clients=1, streams=1, rate_per_client=1000,
    ),
    H2loadWorkload(
        key="h2-small-5k", title="h2load, 128 B responses, 5,000 requests/s on 5 connections",
        # CPU per request at a rate every target sustains: busy-loop effects (batching under
        # saturation) do not flatter anyone.
        path=SMALL_PATH, body_bytes=SMALL_BODY_BYTES, clients=5, streams=1, rate_per_client=1000,
    ),
    H2loadWorkload(
        key="h2-64k", title="h2load, 64 KiB responses, 4 connections x 4 streams",
        path=LARGE_PATH, body_bytes=LARGE_BODY_BYTES, clients=4, streams=4, reports_mb_per_s=True,
    ),
    GrpcWorkload(
        key="grpc-c1", title="gRPC unary (16 B echo), 1 call in flight",
        in_flight=1, at_concurrency_1=True,
    ),
    GrpcWorkload(
        key="grpc-16", title="gRPC unary (16 B echo), 16 calls in flight", in_flight=16
    ),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
    requests: int
    elapsed_s: float
    requests_per_s: float
    mb_per_s: float | None
    p50_us: float
    p99_us: float
    proxy_cpu_us_per_request: float | None
    proxy_rss_mb: float | None
    proxy_processes: int | None
    # Other processes' (and hypervisor steal's) share of the proxy's core during the run.
    others_on_proxy_core_pct: float | None


def measure(
    workload: Workload, port: int, proxy_pid: int | None, settings: Settings, pinning: Pinning
) -> Measurement:
    if isinstance(workload, H2loadWorkload):
        return _measure_h2load(workload, port, proxy_pid, settings, pinning)
    return _measure_grpc(workload, port, proxy_pid, settings, pinning)


def _window_figures(window: WindowFigures, requests: int) -> dict[str, Any]:
    cpu = window.proxy_cpu_s
    rss = window.proxy_peak_rss_bytes
    return {
        "proxy_cpu_us_per_request": cpu * 1e6 / requests if cpu is not None and requests else None,
        "proxy_rss_mb": rss / 2**20 if rss is not None else None,
        "proxy_processes": window.proxy_processes,
        "others_on_proxy_core_pct": window.others_on_proxy_core_pct,
    }


# ---------------------------------------------------------------- h2load


def _run_h2load(
    argv: list[str], timeout_s: float, pinning: Pinning
) -> H2loadSummary:
    try:
        done = subprocess.run(
            pinning.load() + argv, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise MeasurementError(f"h2load did not finish within its {timeout_s:.0f}s cap") from None
    try:
        summary = parse_summary(done.stdout)
    except H2loadOutputError as exc:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise MeasurementError(f"{exc} (exit {done.returncode}): {' | '.join(tail)}") from None
    if summary.problems is not None:
        raise MeasurementError(summary.problems)
    return summary


def _size_run(w: H2loadWorkload, url: str, settings: Settings, pinning: Pinning) -> int:
    """Requests for a main run of about ``duration_s``, from probes that also warm up."""
    in_flight = w.clients * w.streams
    requests = max(4 * in_flight, 100)
    probe_cap = max(10.0, settings.probe_s * 20)
    summary = None
    for _ in range(8):
        argv = h2load_argv(url=url, requests=str(requests), clients=w.clients, streams=w.streams)
        summary = _run_h2load(argv, probe_cap, pinning)
        if summary.elapsed_s >= settings.probe_s or requests >= settings.max_requests:
            break
        growth = settings.probe_s * 1.5 / max(summary.elapsed_s, 1e-4)
        requests = min(settings.max_requests, int(requests * min(max(growth, 2.0), 20.0)))
    assert summary is not None
    rate = summary.status_2xx / max(summary.elapsed_s, 1e-6)
    return max(4 * in_flight, min(settings.max_requests, int(rate * settings.duration_s)))


def _measure_h2load(
    w: H2loadWorkload, port: int, proxy_pid: int | None, settings: Settings, pinning: Pinning
) -> Measurement:
    url = f"http://127.0.0.1:{port}{w.path}"
    if w.rate_per_client is None:
        requests = _size_run(w, url, settings, pinning)
    else:
        rate = w.rate_per_client * w.clients
        warmup = h2load_argv(
            url=url, requests=str(max(100, rate // 10)), clients=w.clients, streams=w.streams,
            rate_per_client=w.rate_per_client,
        )
        _run_h2load(warmup, settings.duration_s + 10, pinning)
        requests = min(settings.max_requests, max(100, int(rate * settings.duration_s)))
    with tempfile.TemporaryDirectory(prefix="bench-h2load-") as scratch:
        log = Path(scratch) / "requests.tsv"
        argv = h2load_argv(
            url=url, requests=str(requests), clients=w.clients, streams=w.streams,
            log_file=str(log), rate_per_client=w.rate_per_client,
        )
        window = LoadWindow(proxy_pid, pinning.proxy_cpu)
        window.start()
        try:
            summary = _run_h2load(argv, settings.duration_s * 4 + 10, pinning)
        finally:
            figures = window.stop()
        if summary.data_bytes != summary.status_2xx * w.body_bytes:
            # A proxy that answers 200 with a short body must not count as fast.
            raise MeasurementError(
                f"{summary.data_bytes} body bytes for {summary.status_2xx} responses of "
                f"{w.body_bytes} bytes"
            )
        try:
            p50, p99 = read_log_percentiles(log)
        except (OSError, H2loadOutputError) as exc:
            raise MeasurementError(f"h2load latency log: {exc}") from None
    return Measurement(
        requests=summary.status_2xx,
        elapsed_s=summary.elapsed_s,
        requests_per_s=summary.requests_per_s,
        mb_per_s=summary.data_mb_per_s if w.reports_mb_per_s else None,
        p50_us=p50,
        p99_us=p99,
        **_window_figures(figures, summary.status_2xx),
    )


# ---------------------------------------------------------------- gRPC


def grpc_client_argv(
    port: str, in_flight: int, duration_s: str, max_calls: str, warmup_calls: str,
    payload_bytes: int,
) -> list[str]:
    return [
        python(), "-m", "bench.grpc_echo", "client", "--port", port,
        "--concurrency", str(in_flight), "--duration", duration_s, "--max-calls", max_calls,
        "--warmup-calls", warmup_calls, "--payload", str(payload_bytes),
    ]


def _read_line(proc: subprocess.Popen[str], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise MeasurementError(f"gRPC client said nothing for {timeout_s:.0f}s")
    return proc.stdout.readline()


def _client_failure(proc: subprocess.Popen[str], line: str) -> MeasurementError:
    proc.kill()
    _, err = proc.communicate()
    try:
        reported = json.loads(line).get("error")
    except ValueError:
        reported = None
    detail = reported or (err.strip().splitlines() or ["(no output)"])[-1]
    return MeasurementError(f"gRPC client: {detail}")


def _measure_grpc(
    w: GrpcWorkload, port: int, proxy_pid: int | None, settings: Settings, pinning: Pinning
) -> Measurement:
    argv = pinning.load() + grpc_client_argv(
        str(port), w.in_flight, str(settings.duration_s), str(settings.max_requests),
        str(settings.grpc_warmup_calls), w.payload_bytes,
    )
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO,
    )
    try:
        line = _read_line(proc, 30.0 + 2 * CALL_TIMEOUT_S)
        if line.strip() != "ready":
            raise _client_failure(proc, line)
        window = LoadWindow(proxy_pid, pinning.proxy_cpu)
        window.start()
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        try:
            line = _read_line(proc, settings.duration_s * 4 + 2 * CALL_TIMEOUT_S)
        finally:
            figures = window.stop()
        result = json.loads(line) if line.startswith("{") else None
        if result is None or "calls" not in result:
            raise _client_failure(proc, line)
        # The result is in; let the client close its channel before reaping it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=15)
    finally:
        if proc.returncode is None:  # failed, or hung while closing
            proc.kill()
            proc.communicate()
    calls: int = result["calls"]
    bad = result["errors"] + result["wrong_replies"]
    if bad or not calls:
        raise MeasurementError(
            f"{bad} of {calls + result['errors']} calls failed; first: {result['first_error']}"
            if result["errors"] else f"{result['wrong_replies']} calls got a wrong reply"
        )
    return Measurement(
        requests=calls,
        elapsed_s=result["elapsed_s"],
        requests_per_s=calls / result["elapsed_s"],
        mb_per_s=None,
        p50_us=result["p50_us"],
        p99_us=result["p99_us"],
        **_window_figures(figures, calls),
    )
