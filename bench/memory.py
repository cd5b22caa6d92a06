"""Resident memory of a proxy at rest and after a burst of requests.

    python -m bench.memory                     # pilotfish (both codecs) and nghttpx, static
    python -m bench.memory --config xds        # pilotfish driven by a real control plane
    python -m bench.memory --runs 3 --requests 20000 --targets pilotfish,nghttpx

Each target is started as ``python -m bench`` starts it (``bench.targets``: the benchmark
bootstrap, with routing, a retry policy, metrics and tracing sampled at 1% with an OTLP/gRPC
exporter to a port nobody listens on), in front of nghttpd, and read from ``/proc``:

- **idle**: 1 s after it reported ready, before any request;
- **peak**: the high-water mark of the burst, from the kernel's own count (``VmHWM``, summed
  over the process tree: exact for one process, an upper bound for nghttpx's two);
- **after**: once ``--requests`` h2load requests (128-byte responses, 8 connections x 16
  streams) have completed and the connections are closed.

With ``--config xds`` the sidecar runs as ``pilotfish sidecar --xds`` against a
``pilotfish control-plane`` whose mesh has the same upstream and turns tracing on at 1%, and the
load goes to its outbound listener with the service's name as ``:authority``.

RSS is VmRSS; RssAnon is memory the process wrote (heaps, stacks), RssFile the pages of
mapped files (the interpreter, shared libraries), which other processes mapping the same files
share. Memory does not depend on how busy the machine is, so the figures are taken as they
come: the same code gives the same figures within a few hundred kB. Nothing is timed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.h2load import h2load_argv, parse_summary
from bench.procs import (
    IDLE_SETTLE_S,
    Pinning,
    Spawned,
    free_port,
    process_tree,
    wait_until_serving,
)
from bench.targets import (
    NGHTTPD,
    REPO,
    SMALL_PATH,
    Nghttpx,
    Pilotfish,
    Running,
    Target,
    nghttpd_argv,
    python,
    write_docroot,
)

START_TIMEOUT_S = 60.0
BURST_TIMEOUT_S = 300.0  # the burst is bounded by its count; this only stops a hung one
CLIENTS, STREAMS = 8, 16
MESH_SERVICE = "upstream"
KIB = 1024  # /proc's "kB"

TARGETS: dict[str, Target] = {
    "pilotfish": Pilotfish(workers=1),
    "pilotfish-python-codec": Pilotfish(workers=1, codec="python"),
    "pilotfish-mypyc": Pilotfish(workers=1, mypyc=True),  # the compiled build, when asked for
    "nghttpx": Nghttpx(),
}


@dataclass(frozen=True, slots=True)
class Memory:
    """From /proc/PID/status, in KiB (its "kB"), summed over a process tree."""

    rss: int
    anon: int
    file: int
    hwm: int
    threads: int

    @classmethod
    def of(cls, root: int) -> Memory:
        totals = dict.fromkeys(("VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads"), 0)
        for pid in process_tree(root):
            try:
                lines = Path(f"/proc/{pid}/status").read_text().splitlines()
            except OSError:
                continue  # it ended between the listing and the reading
            for line in lines:
                key, _, value = line.partition(":")
                if key in totals:
                    totals[key] += int(value.split()[0])
        return cls(
            totals["VmRSS"], totals["RssAnon"], totals["RssFile"], totals["VmHWM"],
            totals["Threads"],
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Sample:
    idle: Memory
    after: Memory
    requests_ok: int


def mesh(upstream_port: int) -> str:
    """The control plane's mesh: the bench bootstrap's cluster, route, retry and tracing."""
    return yaml.safe_dump(
        {
            "services": {
                "bench": {"protocol": "http2", "endpoints": []},
                MESH_SERVICE: {
                    "protocol": "http2",
                    "endpoints": [f"127.0.0.1:{upstream_port}"],
                    "routes": [{
                        "name": "all", "match": {"prefix": "/"}, "timeout": "15s",
                        "retry": {"attempts": 1, "retry_on": [
                            "connect-failure", "refused-stream", "reset", "unavailable"]},
                    }],
                },
            },
            "telemetry": {
                "tracing": {"sampling": "1%", "otlp_endpoint": "http://127.0.0.1:9"},
                "access_log": {"sink": "file", "path": "/dev/null"},
            },
        },
        sort_keys=False,
    )  # fmt: skip


@contextmanager
def spawned(name: str, argv: Sequence[str], workdir: Path) -> Iterator[Spawned]:
    proc = Spawned(name, argv, workdir / f"{name}.log", cwd=REPO)
    try:
        yield proc
    finally:
        proc.stop()


def start_xds_sidecar(target: Target, control_plane: int, workdir: Path) -> Running:
    assert isinstance(target, Pilotfish)
    admin, outbound = free_port(), free_port()
    argv = [
        python(), "-m", "pilotfish", "sidecar", "--xds", f"127.0.0.1:{control_plane}",
        "--node-id", f"memory-{target.name}", "--service", "bench",
        "--outbound-address", f"127.0.0.1:{outbound}", "--admin-address", f"127.0.0.1:{admin}",
    ]  # fmt: skip
    if target.codec is not None:
        argv = ["env", f"PILOTFISH_H2_CODEC={target.codec}", *argv]
    proc = Spawned(target.name, Pinning.for_this_machine().proxy() + argv,
                   workdir / f"{target.name}-xds.log", cwd=REPO)  # fmt: skip
    try:
        readiness = wait_until_serving(proc, outbound, START_TIMEOUT_S, ready_port=admin)
    except BaseException:
        proc.stop()
        raise
    return Running(port=outbound, proc=proc, readiness=readiness)


def burst(port: int, requests: int, authority: str | None) -> int:
    """``requests`` h2load requests through ``port``; how many got a 2xx."""
    argv = h2load_argv(
        url=f"http://127.0.0.1:{port}{SMALL_PATH}", requests=str(requests), clients=CLIENTS,
        streams=STREAMS,
    )  # fmt: skip
    if authority is not None:
        argv[-1:-1] = ["-H", f":authority: {authority}"]
    done = subprocess.run(
        Pinning.for_this_machine().load() + argv, capture_output=True, text=True,
        timeout=BURST_TIMEOUT_S, check=False,
    )  # fmt: skip
    summary = parse_summary(done.stdout)
    if summary.problems is not None:
        raise RuntimeError(f"h2load: {summary.problems}")
    return summary.status_2xx


def measure(running: Running, requests: int, authority: str | None) -> Sample:
    assert running.proc is not None
    time.sleep(IDLE_SETTLE_S)
    idle = Memory.of(running.proc.pid)
    ok = burst(running.port, requests, authority)
    time.sleep(IDLE_SETTLE_S)  # h2load has closed its connections; let the proxy see it
    return Sample(idle, Memory.of(running.proc.pid), ok)


def run(targets: Sequence[str], config: str, runs: int, requests: int) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {name: [] for name in targets}
    pinning = Pinning.for_this_machine()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        workdir = Path(scratch)
        upstream_port, cp_port = free_port(), free_port()
        write_docroot(workdir / "docroot")
        upstream_argv = pinning.load() + nghttpd_argv(str(workdir / "docroot"), str(upstream_port))
        (workdir / "mesh.yaml").write_text(mesh(upstream_port))
        cp_argv = [python(), "-m", "pilotfish", "control-plane", "--config",
                   str(workdir / "mesh.yaml"), "--port", str(cp_port)]  # fmt: skip
        with spawned("upstream", upstream_argv, workdir) as upstream:
            wait_until_serving(upstream, upstream_port, START_TIMEOUT_S)
            with optional_process(config == "xds", "control-plane", cp_argv, workdir) as cp:
                if cp is not None:
                    wait_until_serving(cp, cp_port, START_TIMEOUT_S)
                for run_index in range(runs):
                    for name in targets:
                        target = TARGETS[name]
                        xds = config == "xds" and isinstance(target, Pilotfish)
                        running = (
                            start_xds_sidecar(target, cp_port, workdir) if xds
                            else target.start(upstream_port, pinning, workdir)
                        )  # fmt: skip
                        try:
                            sample = measure(running, requests, MESH_SERVICE if xds else None)
                        finally:
                            running.stop()
                        samples[name].append(sample)
                        idle, after = sample.idle, sample.after
                        print(
                            f"run {run_index + 1} {name:<24} idle {idle.rss * KIB / 1e6:5.1f} "
                            f"MB peak {after.hwm * KIB / 1e6:5.1f} MB after "
                            f"{after.rss * KIB / 1e6:5.1f} MB ({sample.requests_ok} ok)",
                            file=sys.stderr, flush=True,
                        )  # fmt: skip
    return samples


@contextmanager
def optional_process(
    wanted: bool, name: str, argv: Sequence[str], workdir: Path
) -> Iterator[Spawned | None]:
    if not wanted:
        yield None
        return
    with spawned(name, argv, workdir) as proc:
        yield proc


def render(samples: dict[str, list[Sample]], config: str, requests: int) -> str:
    def mb(values: Sequence[int]) -> str:
        return f"{statistics.median(values) * KIB / 1e6:.1f}"

    runs = min(len(s) for s in samples.values())
    lines = [
        f"{config} config, {requests:,} requests (h2load, c{CLIENTS} x m{STREAMS}, 128 B), "
        f"MB (10^6 bytes), medians of {runs} run(s)",
        "",
        "| target | idle RSS | idle anon / file | peak RSS (VmHWM) | RSS after | "
        "after anon / file | threads idle / after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, got in samples.items():
        idle = [s.idle for s in got]
        after = [s.after for s in got]
        lines.append(
            f"| {name} | {mb([m.rss for m in idle])} | {mb([m.anon for m in idle])} / "
            f"{mb([m.file for m in idle])} | {mb([m.hwm for m in after])} | "
            f"{mb([m.rss for m in after])} | {mb([m.anon for m in after])} / "
            f"{mb([m.file for m in after])} | {statistics.median(m.threads for m in idle):.0f} / "
            f"{statistics.median(m.threads for m in after):.0f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--targets", default="pilotfish,pilotfish-python-codec,nghttpx",
                        help=f"comma-separated, from {', '.join(TARGETS)}")  # fmt: skip
    parser.add_argument("--config", choices=("static", "xds"), default="static")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}")
    if not Path(NGHTTPD).exists():
        parser.error(f"{NGHTTPD} is missing: apt-get install -y nghttp2-server nghttp2-client")
    print(render(run(targets, args.config, args.runs, args.requests), args.config, args.requests))
    return 0


if __name__ == "__main__":
    sys.exit(main())
