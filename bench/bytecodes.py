"""Python bytecodes per proxied request, counted exactly and broken down by layer.

    python -m bench.bytecodes                          # h2-small and grpc-16, this codec
    python -m bench.bytecodes --workload grpc-16 --requests 2000 --json
    python -m bench.bytecodes --check                  # exit 1 if over bench/bytecode_budget.json

Runs one Pilotfish sidecar (the benchmark bootstrap: a route with a retry policy, metrics,
tracing sampled at 1%) on a uvloop event loop in a thread of this process, warms it up with the
workload's own load generator (h2load, or the gRPC client of ``bench.grpc_echo``, each in its
own process against its own upstream process), then counts every bytecode instruction the
sidecar's thread executes while ``--requests`` more requests go through, and divides.

The count comes from ``sys.settrace`` with per-opcode events (CPython 3.11; ``sys.monitoring``
would do the same on 3.12+), so only the sidecar's own thread is counted: the load generators and
upstreams are other processes, and uvloop's loop and the compiled codecs are C, invisible here.
Each instruction is attributed to the module of the code object executing it, and modules are
grouped into layers (``LAYERS``). Unlike a CPU figure, the count does not move with the
machine's load; what moves it a little is how requests batch into reads (several requests per
read share one read's cost), hence the budget's small tolerance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

from bench.h2load import H2LOAD, h2load_argv, parse_summary
from bench.procs import Pinning, free_port
from bench.targets import REPO, pilotfish_bootstrap, start_upstream
from bench.workloads import WORKLOADS, GrpcWorkload, H2loadWorkload, Workload, grpc_client_argv

BUDGET_FILE = Path(__file__).resolve().parent / "bytecode_budget.json"
GATED_WORKLOADS = ("h2-small", "grpc-16")
DEFAULT_REQUESTS = 2000
WARMUP_REQUESTS = 500
# How far over its budget a count may go before the gate fails: what batching (and, with our
# codec, HPACK decoding) moves it by between runs of the same code (up to about 2%).
TOLERANCE = 0.03

# Where a code object's instructions are counted, by path prefix (relative to the repository,
# or a site-packages package name); the first match wins, so the more specific come first.
LAYERS: tuple[tuple[str, str], ...] = (
    ("sidecar/codec/", "codec"),
    ("sidecar/http/", "http"),
    ("sidecar/route/policy/", "route-policies"),
    ("sidecar/route/", "router"),
    ("sidecar/upstream/", "upstream"),
    ("sidecar/listen/", "listener"),
    ("sidecar/observability/", "observability"),
    ("sidecar/", "sidecar-core"),
    ("pilotfish/", "config"),
    ("ngh2/", "ngh2"),
    ("opentelemetry/", "observability"),
    ("h2/", "h2-library"),
    ("uvloop/", "event-loop"),
    ("hpack/", "h2-library"),
    ("hyperframe/", "h2-library"),
)


def layer_of(filename: str) -> str:
    path = filename.replace(os.sep, "/")
    repo = str(REPO).replace(os.sep, "/") + "/"
    if "/site-packages/" in path:
        path = path.split("/site-packages/", 1)[1]
    elif path.startswith(repo):
        path = path[len(repo) :]
    else:
        return "stdlib"
    for prefix, layer in LAYERS:
        if path.startswith(prefix):
            return layer
    return "other"


class OpcodeCounter:
    """Counts the instructions executed in the thread it is started in, per code object."""

    def __init__(self) -> None:
        self.per_code: dict[CodeType, int] = {}

    def start(self) -> None:
        per_code = self.per_code

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                code = frame.f_code
                per_code[code] = per_code.get(code, 0) + 1
            elif event == "call":
                frame.f_trace_lines = False
                frame.f_trace_opcodes = True
            return trace

        sys.settrace(trace)

    def stop(self) -> None:
        sys.settrace(None)

    def by_module(self) -> dict[str, int]:
        modules: dict[str, int] = {}
        for code, n in self.per_code.items():
            modules[code.co_filename] = modules.get(code.co_filename, 0) + n
        return modules

    def by_layer(self) -> dict[str, int]:
        layers: dict[str, int] = {}
        for filename, n in self.by_module().items():
            layer = layer_of(filename)
            layers[layer] = layers.get(layer, 0) + n
        return layers


class SidecarThread:
    """The benchmark's sidecar on a uvloop loop in a thread, with a counter for that thread."""

    def __init__(self, config_text: str) -> None:
        import yaml

        from pilotfish.config.bootstrap import parse_bootstrap

        self.bootstrap = parse_bootstrap(yaml.safe_load(config_text))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.counter = OpcodeCounter()
        self._stop: Callable[[], None] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sidecar", daemon=True)

    def _run(self) -> None:
        import uvloop

        from sidecar.main import serve
        from sidecar.server import Sidecar

        loop = uvloop.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)

        def started(sidecar: Sidecar) -> None:
            self._stop = sidecar.request_stop
            self._ready.set()

        try:
            loop.run_until_complete(serve(self.bootstrap, signals=False, started=started))
        finally:
            loop.close()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("sidecar did not start")

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the sidecar's thread, between two callbacks of its loop."""
        assert self.loop is not None
        done: futures.Future[None] = futures.Future()

        def run() -> None:
            fn()
            done.set_result(None)

        self.loop.call_soon_threadsafe(run)
        done.result(10)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop)
            self._thread.join(15)


@dataclass(frozen=True, slots=True)
class Count:
    workload: str
    codec: str
    requests: int
    per_layer: dict[str, float]  # bytecodes per request
    per_module: dict[str, float]
    per_function: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.per_layer.values())


def current_codec() -> str:
    from sidecar.http.h2conn import H2_CODEC

    return H2_CODEC


def count(workload: Workload, requests: int, workdir: Path) -> Count:
    """Bytecodes per request the sidecar executes for ``requests`` requests of ``workload``."""
    pinning = Pinning(load_cpu=None, proxy_cpu=None)
    upstream = start_upstream(workload.upstream, pinning, workdir)
    admin, listen = free_port(), free_port()
    sidecar = SidecarThread(pilotfish_bootstrap(str(admin), str(listen), str(upstream.port)))
    try:
        sidecar.start()
        counter = sidecar.counter
        if isinstance(workload, H2loadWorkload):
            _h2load(workload, listen, WARMUP_REQUESTS)
            sidecar.call(counter.start)
            try:
                _h2load(workload, listen, requests)
            finally:
                sidecar.call(counter.stop)
        else:
            _grpc(workload, listen, requests, sidecar)
    finally:
        sidecar.stop()
        upstream.proc.stop()
    per_layer = {k: v / requests for k, v in sorted(counter.by_layer().items())}
    repo = str(REPO) + os.sep
    per_module = {
        name.removeprefix(repo): n / requests for name, n in counter.by_module().items()
    }
    per_function = {
        f"{code.co_filename.removeprefix(repo)}:{code.co_qualname}": n / requests
        for code, n in counter.per_code.items()
    }
    return Count(workload.key, current_codec(), requests, per_layer, per_module, per_function)


def _h2load(workload: H2loadWorkload, port: int, n: int) -> None:
    url = f"http://127.0.0.1:{port}{workload.path}"
    argv = h2load_argv(url=url, requests=str(n), clients=workload.clients, streams=workload.streams)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    summary = parse_summary(done.stdout)
    if summary.problems is not None or summary.status_2xx != n:
        raise RuntimeError(f"h2load: {summary.problems or done.stdout[-400:]}")


def _grpc(workload: GrpcWorkload, port: int, n: int, sidecar: SidecarThread) -> None:
    """Warms up, starts counting once the client is ready, stops after exactly ``n`` calls."""
    argv = grpc_client_argv(
        str(port), workload.in_flight, duration_s="300", max_calls=str(n),
        warmup_calls=str(WARMUP_REQUESTS), payload_bytes=workload.payload_bytes,
    )  # fmt: skip
    with subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
    ) as client:
        assert client.stdin is not None and client.stdout is not None
        if client.stdout.readline().strip() != "ready":
            raise RuntimeError("gRPC client: no warm-up")
        sidecar.call(sidecar.counter.start)
        try:
            client.stdin.write("go\n")
            client.stdin.flush()
            result = json.loads(client.stdout.readline())
        finally:
            sidecar.call(sidecar.counter.stop)
        if result["calls"] != n or result["errors"] or result["wrong_replies"]:
            raise RuntimeError(f"gRPC client: {result}")


# ---------------------------------------------------------------- the budget


def load_budget(path: Path = BUDGET_FILE) -> dict[str, dict[str, int]]:
    """``{workload: {codec: bytecodes per request}}``."""
    budget: dict[str, dict[str, int]] = json.loads(path.read_text())["budget"]
    return budget


def over_budget(result: Count, budget: dict[str, dict[str, int]]) -> str | None:
    """Why ``result`` breaks the budget, or None. A workload or codec with no budget fails:
    a new one must be measured and committed, not waved through."""
    limit = budget.get(result.workload, {}).get(result.codec)
    if limit is None:
        return f"no budget for {result.workload} with the {result.codec} codec in {BUDGET_FILE}"
    if result.total > limit * (1 + TOLERANCE):
        return (
            f"{result.workload} ({result.codec} codec): {result.total:,.0f} bytecodes per "
            f"request, over the budget of {limit:,} (+{TOLERANCE:.0%})\n{format_count(result)}"
        )
    return None


def format_count(result: Count, modules: int = 0, functions: int = 0) -> str:
    lines = [
        f"{result.workload}, {result.codec} codec: {result.total:,.0f} bytecodes per request "
        f"({result.requests} requests)"
    ]
    for layer, n in sorted(result.per_layer.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {layer:<16} {n:>8,.0f}  {n / result.total:6.1%}")
    if modules:
        lines.append("  top modules:")
        top = sorted(result.per_module.items(), key=lambda kv: -kv[1])[:modules]
        lines.extend(f"    {n:>8,.0f}  {name}" for name, n in top)
    if functions:
        lines.append("  top functions:")
        top = sorted(result.per_function.items(), key=lambda kv: -kv[1])[:functions]
        lines.extend(f"    {n:>8,.1f}  {name}" for name, n in top)
    return "\n".join(lines)


def missing_tools(workloads: list[Workload]) -> list[str]:
    if any(isinstance(w, H2loadWorkload) for w in workloads):
        return [t for t in (H2LOAD, "/usr/sbin/nghttpd") if not shutil.which(t)]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bytecodes", description=__doc__)
    workloads = {w.key: w for w in WORKLOADS}
    parser.add_argument("--workload", choices=sorted(workloads), action="append")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS)
    parser.add_argument("--modules", type=int, default=0, help="also list the top N modules")
    parser.add_argument("--functions", type=int, default=0, help="and the top N functions")
    parser.add_argument("--json", action="store_true", help="print one JSON line per workload")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if over {BUDGET_FILE.name}")
    args = parser.parse_args(argv)
    chosen = [workloads[key] for key in (args.workload or GATED_WORKLOADS)]
    missing = missing_tools(chosen)
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install -y nghttp2-client "
              "nghttp2-server)", file=sys.stderr)  # fmt: skip
        return 2
    failures = []
    for workload in chosen:
        with tempfile.TemporaryDirectory(prefix="bench-bytecodes-") as scratch:
            result = count(workload, args.requests, Path(scratch))
        if args.json:
            layers = {k: round(v, 1) for k, v in result.per_layer.items()}
            line = {"workload": result.workload, "codec": result.codec,
                    "total": round(result.total), "per_layer": layers}  # fmt: skip
            print(json.dumps(line))
        else:
            print(format_count(result, args.modules, args.functions), flush=True)
        if args.check:
            problem = over_budget(result, load_budget())
            if problem is not None:
                failures.append(problem)
    for problem in failures:
        print(problem, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
