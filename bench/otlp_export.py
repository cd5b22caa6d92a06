"""Span export in an xDS-configured sidecar: memory, CPU per exported span, a dead collector.

    python -m bench.otlp_export                       # this checkout, 3 runs of 3,000 calls
    python -m bench.otlp_export --source before=/tmp/pilotfish-7616f2d --source after=.

Starts a real ``pilotfish control-plane`` whose mesh turns tracing on (100% sampled, OTLP/gRPC
to a receiver in this process), a gRPC echo upstream, and for every case one ``pilotfish
sidecar --xds`` (one worker) from each ``--source`` checkout, so two versions of the exporter
are compared under the same control plane, upstream, client and receiver. Each case drives
``--calls`` unary calls (two spans each: SERVER and CLIENT) through the sidecar's outbound
listener with ``bench.grpc_echo``'s client and reads, from ``/proc``:

- **RSS**: resident memory once ready (before any call), and after the calls;
- **CPU**: utime+stime of the sidecar over the measured calls and the export of their spans
  (its exporter threads included). ``off`` (tracing configured, nothing sampled) is the
  baseline: a case's CPU minus ``off``'s, divided by the spans, is the cost of recording and
  exporting one span. Process CPU time moves with the machine's load, so the cases run
  interleaved, ``--runs`` times, and the medians are reported;
- **a dead collector**: ``refused`` (nothing listens: every connect fails at once) and
  ``silent`` (a socket that accepts connections and never answers, so an export waits for its
  timeout): calls that failed (must be none), spans dropped as the sidecar counts them
  (``pilotfish_tracing_spans_dropped_total``), and RSS (the span queue is bounded).

Wall-clock figures are not taken: the point is CPU and memory, which a busy machine disturbs
far less than latency.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench.procs import Spawned, cpu_seconds, free_port, rss_bytes, wait_until_serving
from bench.targets import REPO, python
from bench.workloads import grpc_client_argv
from tests.observability.otlp_receiver import OtlpHttpReceiver, OtlpReceiver

START_TIMEOUT_S = 60.0
CLIENT_TIMEOUT_S = 300.0
SCHEDULE_DELAY_MS = 100  # the span queue is drained ten times a second
EXPORT_TIMEOUT_MS = 1000  # so a silent collector holds each batch for a second
WARMUP_CALLS = 200
DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    protocol: str  # "grpc" or "http/protobuf"
    collector: str  # "live", "refused", "silent", or "off" (nothing sampled)


CASES = (
    Case("off", "grpc", "off"),
    Case("grpc", "grpc", "live"),
    Case("http", "http/protobuf", "live"),
    Case("grpc-refused", "grpc", "refused"),
    Case("http-refused", "http/protobuf", "refused"),
    Case("grpc-silent", "grpc", "silent"),
    Case("http-silent", "http/protobuf", "silent"),
)


@dataclass(slots=True)
class Figures:
    idle_rss_mb: list[float] = field(default_factory=list)
    after_rss_mb: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    spans_received: list[int] = field(default_factory=list)
    spans_dropped: list[int] = field(default_factory=list)
    failed_calls: list[int] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)


class Collectors:
    """The live receivers, a port nobody listens on, and one that never answers."""

    def __init__(self) -> None:
        self.grpc = OtlpReceiver().start()
        self.http = OtlpHttpReceiver().start()
        self.refused_port = free_port()
        self._silent = socket.socket()
        self._silent.bind(("127.0.0.1", 0))
        self._silent.listen(64)  # never accepted: the kernel completes the handshakes
        self.silent_port = self._silent.getsockname()[1]

    def endpoint(self, case: Case) -> str:
        if case.collector in ("live", "off"):
            receiver = self.grpc if case.protocol == "grpc" else self.http
            port = receiver.port
        else:
            port = self.refused_port if case.collector == "refused" else self.silent_port
        path = "/v1/traces" if case.protocol == "http/protobuf" else ""
        return f"http://127.0.0.1:{port}{path}"

    def received(self, case: Case) -> int:
        return len((self.grpc if case.protocol == "grpc" else self.http).spans)

    def stop(self) -> None:
        self.grpc.stop()
        self.http.stop()
        self._silent.close()


def mesh(upstream_port: int, collector_port: int) -> str:
    return yaml.safe_dump(
        {
            "services": {
                "bench": {"endpoints": []},
                "echo": {
                    "protocol": "grpc",
                    "endpoints": [f"127.0.0.1:{upstream_port}"],
                    "routes": [{"name": "all", "match": {"prefix": "/"}, "timeout": "10s"}],
                },
            },
            "telemetry": {
                "tracing": {"sampling": "100%", "otlp_endpoint": f"http://127.0.0.1:{collector_port}"},
                "access_log": {"sink": "file", "path": "/dev/null"},
            },
        },
        sort_keys=False,
    )


def sidecar_env(case: Case, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(
        OTEL_BSP_SCHEDULE_DELAY=str(SCHEDULE_DELAY_MS),
        OTEL_EXPORTER_OTLP_TRACES_TIMEOUT=str(EXPORT_TIMEOUT_MS),
        # The control plane names the gRPC receiver; these pick the case's protocol and port.
        OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=case.protocol,
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=endpoint,
    )
    if case.collector == "off":
        env["OTEL_TRACES_SAMPLER"] = "always_off"
    return env


def dropped_spans(admin_port: int) -> int:
    url = f"http://127.0.0.1:{admin_port}/stats/prometheus"
    with urllib.request.urlopen(url, timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("pilotfish_tracing_spans_dropped_total"):
                return int(float(line.split()[-1]))
    return 0


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@contextmanager
def started(
    name: str, argv: Sequence[str], workdir: Path, cwd: Path, env: dict[str, str] | None = None
) -> Iterator[Spawned]:
    proc = Spawned(name, argv, workdir / f"{name}.log", cwd=cwd, env=env)
    try:
        yield proc
    finally:
        proc.stop()


def run_case(
    case: Case, source: Path, control_plane: str, collectors: Collectors, calls: int,
    workdir: Path,
) -> tuple[float, float, float, int, int, int, int]:
    admin, outbound = free_port(), free_port()
    argv = [
        python(), "-m", "pilotfish", "sidecar", "--xds", control_plane, "--node-id",
        f"bench-{case.name}", "--service", "bench", "--outbound-address",
        f"127.0.0.1:{outbound}", "--admin-address", f"127.0.0.1:{admin}",
    ]  # fmt: skip
    env = sidecar_env(case, collectors.endpoint(case))
    with started(f"sidecar-{case.name}", argv, workdir, source, env) as sidecar:
        wait_until_serving(sidecar, outbound, START_TIMEOUT_S, ready_port=admin)
        time.sleep(1.0)  # settle, as bench.procs.idle_rss_bytes does
        idle_rss = rss_bytes([sidecar.pid])
        before_received = collectors.received(case)
        client_argv = [
            *grpc_client_argv(
                str(outbound), 4, duration_s="3600", max_calls=str(calls),
                warmup_calls=str(WARMUP_CALLS), payload_bytes=16,
            ),
            "--authority", "echo",
        ]  # fmt: skip
        with subprocess.Popen(
            client_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
        ) as client:
            assert client.stdin is not None and client.stdout is not None
            line = client.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"{case.name}: the client did not warm up: {line}")
            # The warm-up's spans leave with the next drain; then the measured window opens.
            time.sleep(3 * SCHEDULE_DELAY_MS / 1000)
            cpu_before = cpu_seconds([sidecar.pid])
            client.stdin.write("go\n")
            client.stdin.flush()
            result = json.loads(client.stdout.readline())
        wanted = before_received + 2 * (WARMUP_CALLS + calls)
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        if case.collector == "live":
            while collectors.received(case) < wanted and time.monotonic() < deadline:
                time.sleep(0.05)
        else:
            # Long enough for every batch to be tried: each waits at most the export timeout.
            time.sleep(EXPORT_TIMEOUT_MS / 1000 * 2)
        cpu = cpu_seconds([sidecar.pid]) - cpu_before
        after_rss = rss_bytes([sidecar.pid])
        threads = threads_of(sidecar.pid)
        dropped = dropped_spans(admin)
        received = collectors.received(case) - before_received
    failed = result.get("errors", 0) + (calls - result.get("calls", 0) - result.get("errors", 0))
    return idle_rss, after_rss, cpu, received, dropped, failed, threads


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", default=[], metavar="LABEL=DIR",
                        help="a checkout whose sidecar to measure (default: this one)")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    args = parser.parse_args(argv)
    sources = [tuple(s.split("=", 1)) for s in args.source] or [("this", str(REPO))]
    cases = [c for c in CASES if c.name in args.cases.split(",")]
    figures = {(label, c.name): Figures() for label, _ in sources for c in cases}
    collectors = Collectors()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-otlp-") as scratch:
            workdir = Path(scratch)
            upstream_port, cp_port = free_port(), free_port()
            mesh_file = workdir / "mesh.yaml"
            mesh_file.write_text(mesh(upstream_port, collectors.grpc.port))
            upstream_argv = [python(), "-m", "bench.grpc_echo", "server", "--port",
                             str(upstream_port)]
            cp_argv = [python(), "-m", "pilotfish", "control-plane", "--config", str(mesh_file),
                       "--port", str(cp_port)]
            with started("upstream", upstream_argv, workdir, REPO) as upstream, \
                    started("control-plane", cp_argv, workdir, REPO) as cp:
                wait_until_serving(upstream, upstream_port, START_TIMEOUT_S)
                wait_until_serving(cp, cp_port, START_TIMEOUT_S)
                for run in range(args.runs):
                    for case in cases:
                        for label, directory in sources:
                            got = run_case(case, Path(directory).resolve(), f"127.0.0.1:{cp_port}",
                                           collectors, args.calls, workdir)
                            f = figures[(label, case.name)]
                            idle, after, cpu, received, dropped, failed, threads = got
                            f.idle_rss_mb.append(idle / 1e6)
                            f.after_rss_mb.append(after / 1e6)
                            f.cpu_s.append(cpu)
                            f.spans_received.append(received)
                            f.spans_dropped.append(dropped)
                            f.failed_calls.append(failed)
                            f.threads.append(threads)
                            print(f"run {run + 1} {label:>8} {case.name:<13} idle "
                                  f"{idle / 1e6:5.1f} MB after {after / 1e6:5.1f} MB cpu "
                                  f"{cpu:6.2f} s received {received} dropped {dropped} "
                                  f"failed calls {failed} threads {threads}",
                                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        collectors.stop()
    print(render(figures, sources, cases, args.calls, args.runs))
    return 0


def render(
    figures: dict[tuple[str, str], Figures], sources: Sequence[tuple[str, ...]],
    cases: Sequence[Case], calls: int, runs: int,
) -> str:
    spans = 2 * calls
    lines = [
        f"{calls} calls ({spans} spans measured) per case, medians of {runs} runs",
        "",
        "| sidecar | case | idle RSS MB | RSS after MB | CPU ms | CPU µs per span over `off` "
        "| spans received | spans dropped | failed calls | threads |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, _ in sources:
        off = figures.get((label, "off"))
        off_cpu = statistics.median(off.cpu_s) if off is not None and off.cpu_s else None
        for case in cases:
            f = figures[(label, case.name)]
            cpu = statistics.median(f.cpu_s)
            per_span = (
                f"{(cpu - off_cpu) / spans * 1e6:.0f}"
                if off_cpu is not None and case.name != "off" else ""
            )
            lines.append(
                f"| {label} | {case.name} | {statistics.median(f.idle_rss_mb):.1f} | "
                f"{statistics.median(f.after_rss_mb):.1f} | {cpu * 1000:.0f} | {per_span} | "
                f"{statistics.median(f.spans_received):.0f} | "
                f"{statistics.median(f.spans_dropped):.0f} | {max(f.failed_calls)} | "
                f"{statistics.median(f.threads):.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
