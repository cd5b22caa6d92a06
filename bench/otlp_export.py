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

    python -m bench.otlp_export --instructions --source before=DIR --source after=.

counts instead, with valgrind's callgrind, the instructions one process spends per span it
records and exports: a tracer alone (no sidecar, no requests) ends ``--spans`` spans (SERVER
and CLIENT pairs, with the attributes a proxied gRPC call gets) and flushes them to the
receiver, once with ``--spans`` and once with three times as many; the difference divided by
the difference in spans is the cost of one more span, start-up excluded. The ``null`` exporter
(it drops every batch) gives what recording alone costs. The same code gives the same count
within a few per cent, so this compares versions on a busy machine. It counts the process's
own instructions (grpcio's threads included), not the kernel's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
from bench.targets import REPO, pilotfish_bootstrap, python
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


def static_idle_rss(sources: Sequence[tuple[str, ...]], runs: int) -> str:
    """Idle RSS of a sidecar with a static bootstrap (no xDS: nothing else loads grpcio or
    protobuf), with tracing on (the benchmark bootstrap) and with its tracing line removed."""
    lines = [
        f"static bootstrap (`bench.targets.pilotfish_bootstrap`), idle RSS MB, median of {runs}",
        "",
        "| sidecar | tracing on | tracing off |",
        "|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-otlp-static-") as scratch:
        workdir = Path(scratch)
        for label, directory in sources:
            figures: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(runs):
                for tracing in (True, False):
                    admin, listen = free_port(), free_port()
                    text = pilotfish_bootstrap(str(admin), str(listen), str(free_port()))
                    if not tracing:
                        text = "\n".join(
                            line for line in text.splitlines() if not line.startswith("tracing:")
                        )
                    config = workdir / f"{label}-{tracing}.yaml"
                    config.write_text(text)
                    argv = [python(), "-m", "pilotfish", "sidecar", "--config", str(config)]
                    with started(f"static-{label}", argv, workdir,
                                 Path(directory).resolve()) as sidecar:  # fmt: skip
                        wait_until_serving(sidecar, listen, START_TIMEOUT_S, ready_port=admin)
                        time.sleep(1.0)
                        figures[tracing].append(rss_bytes([sidecar.pid]) / 1e6)
            lines.append(
                f"| {label} | {statistics.median(figures[True]):.1f} | "
                f"{statistics.median(figures[False]):.1f} |"
            )
    return "\n".join(lines)


# Runs in the checkout being measured (its own ``sidecar`` package), under callgrind.
TRACER_CHILD = """
import sys
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from sidecar.observability.tracing import Tracer
from sidecar.observability.tracing_config import TracingConfig

protocol, endpoint, pairs = sys.argv[1], sys.argv[2], int(sys.argv[3])


class Null(SpanExporter):
    def export(self, spans):
        return SpanExportResult.SUCCESS


config = TracingConfig(
    enabled=True, protocol="grpc" if protocol == "null" else protocol, endpoint=endpoint,
    schedule_delay_s=3600.0, max_queue_size=4096, max_export_batch_size=512,
)
tracer = Tracer(config, Null() if protocol == "null" else None)
request = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/bench.Echo/Call"),
           (b":authority", b"echo"), (b"content-type", b"application/grpc"),
           (b"user-agent", b"grpc-python-asyncio/1.85.3")]
for i in range(pairs):
    server = tracer.start_server_span(request, route="all")
    client = tracer.start_client_span(server, 1, upstream="127.0.0.1:50051", cluster="echo")
    tracer.end(client, 200, grpc_status=0)
    tracer.end(server, 200, grpc_status=0)
    if (i + 1) % 256 == 0:
        tracer.force_flush()  # batches of 512, exported in this thread
tracer.force_flush()
assert tracer.dropped_spans == 0, tracer.dropped_spans
tracer.shutdown()
"""
VALGRIND = "/usr/bin/valgrind"
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


def instructions(source: Path, protocol: str, endpoint: str, pairs: int, workdir: Path) -> int:
    out = workdir / f"callgrind-{protocol.replace('/', '-')}-{pairs}.out"
    argv = [
        VALGRIND, "--tool=callgrind", f"--callgrind-out-file={out}", python(), "-c",
        TRACER_CHILD, protocol, endpoint, str(pairs),
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=source, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{protocol}, {pairs} pairs: {done.stderr[-2000:]}")
    match = _TOTALS.search(out.read_text(errors="replace"))
    if match is None:
        raise RuntimeError(f"no totals in {out}")
    return int(match.group(1))


def measure_instructions(sources: Sequence[tuple[str, ...]], pairs: int) -> str:
    collectors = Collectors()
    lines = [
        f"instructions per span: ({pairs * 3} pairs - {pairs} pairs) / {pairs * 4} spans, "
        "callgrind",
        "",
        "| sidecar | exporter | instructions per span | of which export (over `null`) |",
        "|---|---|---|---|",
    ]
    try:
        with tempfile.TemporaryDirectory(prefix="bench-otlp-callgrind-") as scratch:
            for label, directory in sources:
                per_span: dict[str, float] = {}
                for protocol in ("null", "grpc", "http/protobuf"):
                    case = Case(protocol, "grpc" if protocol == "null" else protocol, "live")
                    counts = [
                        instructions(Path(directory).resolve(), protocol,
                                     collectors.endpoint(case), n, Path(scratch))
                        for n in (pairs, 3 * pairs)
                    ]  # fmt: skip
                    per_span[protocol] = (counts[1] - counts[0]) / (4 * pairs)
                    print(f"{label} {protocol}: {counts} -> {per_span[protocol]:,.0f} per span",
                          file=sys.stderr, flush=True)  # fmt: skip
                    export = per_span[protocol] - per_span["null"]
                    lines.append(
                        f"| {label} | {protocol} | {per_span[protocol]:,.0f} | "
                        f"{export:,.0f} |" if protocol != "null" else
                        f"| {label} | null | {per_span[protocol]:,.0f} | |"
                    )  # fmt: skip
    finally:
        collectors.stop()
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.otlp_export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", default=[], metavar="LABEL=DIR",
                        help="a checkout whose sidecar to measure (default: this one)")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per exported span with callgrind instead")
    parser.add_argument("--static", action="store_true",
                        help="idle RSS of a sidecar with a static bootstrap instead")
    parser.add_argument("--spans", type=int, default=400,
                        help="--instructions: span pairs of the shorter run")
    args = parser.parse_args(argv)
    sources = [tuple(s.split("=", 1)) for s in args.source] or [("this", str(REPO))]
    if args.instructions:
        print(measure_instructions(sources, args.spans))
        return 0
    if args.static:
        print(static_idle_rss(sources, args.runs))
        return 0
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
