"""``pilotfish demo``: start the local mesh, drive traffic through it, report, clean up.

Whatever happens (calls fail, a child dies, Ctrl-C, SIGTERM, a bug here), every child process
is stopped before this returns.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from pilotfish.demo.api import demo_pb2_grpc
from pilotfish.demo.processes import (
    Children,
    StartupFailed,
    describe_exit,
    free_ports,
    sidecar_ready,
    tcp_accepts,
    wait_ready,
)
from pilotfish.demo.summary import (
    OK,
    CallLog,
    format_progress,
    format_summary,
    format_traces,
    summarize,
)
from pilotfish.demo.topology import (
    LOOPBACK,
    Topology,
    app_argv,
    plan_topology,
    ports_needed,
    sidecar_bootstrap,
)
from pilotfish.demo.traffic import (
    CALL_TIMEOUT,
    LoadDriver,
    call_greeter,
    callers_for,
    greeter_channel,
)

EXIT_OK = 0
EXIT_CALLS_FAILED = 1
EXIT_STARTUP_FAILED = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
# A sidecar may be ready before it has connected upstream; the first call may need a retry.
FIRST_CALL_WINDOW = 5.0
PROGRESS_INTERVAL = 1.0
# Drain (1 s) plus the tracer's bounded flush (5 s at most).
SPAN_FLUSH_GRACE = 8.0

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    duration: float = 10.0
    rate: float = 50.0
    greeters: int = 2
    quotes: int = 2
    ready_timeout: float = 10.0
    otlp_endpoint: str | None = None  # where the sidecars export spans; None: no tracing
    keep: bool = False  # keep the folder of configs and logs
    sidecar_argv: tuple[str, ...] = (sys.executable, "-m", "pilotfish", "sidecar")

    @property
    def total_calls(self) -> int:
        return max(1, round(self.rate * self.duration))


def run(options: DemoOptions) -> int:
    if options.duration <= 0 or options.rate <= 0:
        print("pilotfish demo: --duration and --rate must be positive", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    workdir = Path(tempfile.mkdtemp(prefix="pilotfish-demo-"))
    children = Children(workdir)
    keep_workdir = False
    # SIGTERM takes the same way out as Ctrl-C, so the children are stopped either way. SIGINT
    # is set too, because a shell starts background jobs with it ignored.
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        try:
            topology = start_mesh(options, workdir, children)
            check_path(topology)
        except StartupFailed as exc:
            keep_workdir = True
            print(f"pilotfish demo: the mesh did not start.\n{exc}", file=sys.stderr)
            print(f"configs and logs are kept in {workdir}", file=sys.stderr)
            return EXIT_STARTUP_FAILED
        print_mesh(topology, workdir)
        code = drive(topology, options, children)
        if options.otlp_endpoint is not None:
            sidecar_logs = [c.log_path for c in children if c.name.endswith("-sidecar")]
            # The sidecars drain (1 s), flush their spans and log what became of them.
            children.stop_all(grace=SPAN_FLUSH_GRACE)
            print(format_span_report(span_counts(sidecar_logs), options.otlp_endpoint))
        return code
    except KeyboardInterrupt:
        print("\npilotfish demo: interrupted before traffic started", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            children.stop_all()
        finally:
            _restore(signal.SIGINT, previous_sigint)
            _restore(signal.SIGTERM, previous_sigterm)
            if options.keep:
                print(f"configs and logs are kept in {workdir}")
            elif not keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)


_SPANS_LINE = re.compile(r"tracing: (\d+) spans exported to \S+, (\d+) dropped")


@dataclass(frozen=True, slots=True)
class SpanCounts:
    exported: int
    dropped: int
    unreported: int  # sidecars that stopped without saying (killed before their flush ended)


def span_counts(sidecar_logs: list[Path]) -> SpanCounts:
    """What the sidecars logged, on their way out, about the spans they exported or lost."""
    exported = dropped = unreported = 0
    for path in sidecar_logs:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        found = _SPANS_LINE.findall(text)
        if not found:
            unreported += 1
        for done, lost in found:
            exported += int(done)
            dropped += int(lost)
    return SpanCounts(exported, dropped, unreported)


def format_span_report(counts: SpanCounts, endpoint: str) -> str:
    line = f"spans: {counts.exported} exported to {endpoint}, {counts.dropped} dropped"
    if counts.unreported:
        line += f" ({counts.unreported} sidecars stopped before reporting theirs)"
    if counts.exported == 0 and counts.dropped:
        line += f"\n  nothing was accepted: is a collector listening at {endpoint}?"
    return line


def _restore(signum: signal.Signals, handler: Handler) -> None:
    # None means the handler was not set from Python; the default is the closest we can do.
    signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def start_mesh(options: DemoOptions, workdir: Path, children: Children) -> Topology:
    ports = free_ports(ports_needed(options.greeters, options.quotes))
    topology = plan_topology(iter(ports), greeters=options.greeters, quotes=options.quotes)
    probes = []
    for app in topology.apps:
        child = children.start(app.name, app_argv(app))
        probes.append((child, _app_probe(app.port)))
    for sidecar in topology.sidecars:
        config = workdir / f"{sidecar.node_id}.yaml"
        bootstrap = sidecar_bootstrap(topology, sidecar, otlp_endpoint=options.otlp_endpoint)
        config.write_text(yaml.safe_dump(bootstrap, sort_keys=False), encoding="utf-8")
        argv = [*options.sidecar_argv, "--config", str(config)]
        child = children.start(f"{sidecar.node_id}-sidecar", argv)
        probes.append((child, _sidecar_probe(sidecar.admin_port, sidecar.listener_ports)))
    wait_ready(probes, options.ready_timeout)
    return topology


def _app_probe(port: int) -> Callable[[], bool]:
    return lambda: tcp_accepts(port)


def _sidecar_probe(admin_port: int, listener_ports: list[int]) -> Callable[[], bool]:
    return lambda: sidecar_ready(admin_port, listener_ports)


def print_mesh(topology: Topology, workdir: Path) -> None:
    def addr(port: int | None) -> str:
        return f"{LOOPBACK}:{port}" if port is not None else "-"

    rows = [("load driver", "-", topology.client)] + [
        (app.name, addr(app.port), app.sidecar) for app in topology.greeters + topology.quotes
    ]
    print(f"pilotfish demo: the mesh is up (configs and logs in {workdir})")
    print()
    print(
        f"  {'service':<12} {'app':<16} {'sidecar inbound':<16} {'sidecar outbound':<17} "
        "sidecar admin"
    )
    for name, app_addr, sidecar in rows:
        print(
            f"  {name:<12} {app_addr:<16} {addr(sidecar.inbound_port):<16} "
            f"{addr(sidecar.outbound_port):<17} {sidecar.admin_url}"
        )
    admin = (topology.greeters[0].sidecar if topology.greeters else topology.client).admin_url
    print()
    print("while it runs, look inside any sidecar through its admin address above, e.g.:")
    for path in ("stats", "clusters", "config_dump"):
        print(f"  curl {admin}/{path}")
    print(flush=True)


def drive(topology: Topology, options: DemoOptions, children: Children) -> int:
    assert topology.client.outbound_port is not None
    channel = greeter_channel(f"{LOOPBACK}:{topology.client.outbound_port}")
    try:
        total = options.total_calls
        callers = callers_for(options.rate)
        print(
            f"sending {total} SayHello calls at {options.rate:g}/s for {options.duration:g} s "
            f"with {callers} callers (Ctrl-C stops early and prints the summary so far)",
            flush=True,
        )
        log = CallLog()
        driver = LoadDriver(channel, log, rate=options.rate, total=total, callers=callers)
        started = time.monotonic()
        driver.start()
        interrupted = False
        reported_dead: set[str] = set()
        try:
            next_tick = started + PROGRESS_INTERVAL
            while not driver.join(max(0.0, next_tick - time.monotonic())):
                next_tick += PROGRESS_INTERVAL
                progress = summarize(log.snapshot(), time.monotonic() - started)
                print(format_progress(progress), flush=True)
                report_dead_children(children, reported_dead)
        except KeyboardInterrupt:
            interrupted = True
            driver.stop()
            print("\nstopping: waiting for the calls in flight...", flush=True)
            # A second Ctrl-C skips the wait, not the summary.
            with contextlib.suppress(KeyboardInterrupt):
                driver.join(CALL_TIMEOUT + 1.0)
        calls = log.snapshot()
        summary = summarize(calls, time.monotonic() - started)
    finally:
        channel.close()
    print()
    print("summary" + (" (interrupted)" if interrupted else "") + ":")
    print(format_summary(summary))
    print()
    print(format_traces(calls, options.otlp_endpoint))
    achieved = summary.calls / summary.elapsed if summary.elapsed > 0 else 0.0
    if not interrupted and achieved < 0.9 * options.rate:
        print(
            f"\nnote: {achieved:.0f}/s is below the {options.rate:g}/s asked for: the callers were "
            "waiting for replies, so the mesh (or this machine) is at its limit.",
        )
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if summary.ok == summary.calls else EXIT_CALLS_FAILED


def check_path(topology: Topology) -> None:
    """Call once through the whole mesh before measuring, so a broken path fails clearly."""
    assert topology.client.outbound_port is not None
    channel = greeter_channel(f"{LOOPBACK}:{topology.client.outbound_port}")
    try:
        stub = demo_pb2_grpc.GreeterStub(channel)
        deadline = time.monotonic() + FIRST_CALL_WINDOW
        while True:
            result = call_greeter(stub, "first caller", timeout=2.0)
            if result.status == OK:
                return
            if time.monotonic() > deadline:
                raise StartupFailed(
                    "every process is up, but a call through the mesh failed: "
                    f"{result.status}: {result.detail}"
                )
            time.sleep(0.2)
    finally:
        channel.close()


def report_dead_children(children: Children, reported: set[str]) -> None:
    for child in children:
        code = child.exit_code()
        if code is not None and child.name not in reported:
            reported.add(child.name)
            print(
                f"warning: {child.name} {describe_exit(code)}; last lines of its output:\n"
                f"{child.tail(5)}",
                file=sys.stderr,
                flush=True,
            )

