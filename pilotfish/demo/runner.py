"""``pilotfish demo``: start the control plane and the mesh, drive traffic through it while the
phases change its policy through the control plane, report each phase, clean up.

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

from pilotfish.demo.api import demo_pb2_grpc
from pilotfish.demo.observe import (
    ControlPlaneStatus,
    MeshNotSettled,
    upstream_hosts,
    write_mesh,
)
from pilotfish.demo.phase_runner import ACK_TIMEOUT, PhaseRunner
from pilotfish.demo.phases import (
    PHASES,
    format_phase,
    judge,
)
from pilotfish.demo.processes import (
    Child,
    Children,
    StartupFailed,
    free_ports,
    sidecar_ready,
    tcp_accepts,
    wait_ready,
)
from pilotfish.demo.summary import (
    OK,
    CallLog,
    format_summary,
    format_traces,
    summarize,
)
from pilotfish.demo.topology import (
    LOOPBACK,
    V1,
    SidecarPlan,
    Topology,
    app_argv,
    control_plane_args,
    mesh_file,
    plan_topology,
    ports_needed,
    sidecar_args,
)
from pilotfish.demo.traffic import (
    CALL_TIMEOUT,
    LoadDriver,
    call_greeter,
    callers_for,
    greeter_channel,
)

EXIT_OK = 0
EXIT_PHASE_FAILED = 1
EXIT_STARTUP_FAILED = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
# A sidecar may be ready before its callers hold its app's endpoint; the first call may retry.
FIRST_CALL_WINDOW = 10.0
# Drain (1 s) plus the tracer's bounded flush (5 s at most).
SPAN_FLUSH_GRACE = 8.0
PROGRAM = (sys.executable, "-m", "pilotfish")

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    duration: float = 16.0  # seconds of measured traffic, split evenly over the phases
    rate: float = 50.0
    greeters: int = 2
    quotes: int = 3
    ready_timeout: float = 30.0  # a dozen Python processes starting on a busy machine
    otlp_endpoint: str | None = None  # where the sidecars export spans; None: no tracing
    keep: bool = False  # keep the folder of the mesh file and logs
    program: tuple[str, ...] = PROGRAM  # how to run `pilotfish`

    @property
    def phase_seconds(self) -> float:
        return self.duration / len(PHASES)

    @property
    def max_calls(self) -> int:
        # A bound, not a target: the phases end the traffic; waits for acks add to the time.
        return max(1, round(self.rate * (self.duration + len(PHASES) * ACK_TIMEOUT + 30)))


def run(options: DemoOptions) -> int:
    if options.duration <= 0 or options.rate <= 0:
        print("pilotfish demo: --duration and --rate must be positive", file=sys.stderr)
        return EXIT_STARTUP_FAILED
    workdir = Path(tempfile.mkdtemp(prefix="pilotfish-demo-"))
    mesh = Children(workdir)  # apps and sidecars
    plane = Children(workdir)  # the control plane, stopped last: draining sidecars ask it
    keep_workdir = False
    # SIGTERM takes the same way out as Ctrl-C, so the children are stopped either way. SIGINT
    # is set too, because a shell starts background jobs with it ignored.
    previous_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    status: ControlPlaneStatus | None = None
    try:
        ports = free_ports(ports_needed(options.greeters, options.quotes))
        topology = plan_topology(iter(ports), greeters=options.greeters, quotes=options.quotes)
        try:
            start_mesh(options, topology, workdir, mesh, plane)
            # Only now: a gRPC channel in this process breaks the children it forks later
            # (grpc/grpc#43055, its poller restarted in the child before exec).
            status = ControlPlaneStatus(topology.xds_address)
            check_path(topology)
        except StartupFailed as exc:
            keep_workdir = True
            print(f"pilotfish demo: the mesh did not start.\n{exc}", file=sys.stderr)
            print(f"the mesh file and logs are kept in {workdir}", file=sys.stderr)
            return EXIT_STARTUP_FAILED
        print_mesh(topology, workdir)
        code = drive(topology, options, workdir, mesh, status)
        if options.otlp_endpoint is not None:
            sidecar_logs = [c.log_path for c in mesh if c.name.endswith("-sidecar")]
            # The sidecars deregister, drain (1 s), flush their spans and log what became of
            # them.
            mesh.stop_all(grace=SPAN_FLUSH_GRACE)
            print(format_span_report(span_counts(sidecar_logs), options.otlp_endpoint))
        return code
    except KeyboardInterrupt:
        print("\npilotfish demo: interrupted before traffic started", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if status is not None:
                status.close()
            mesh.stop_all()
            plane.stop_all()
        finally:
            _restore(signal.SIGINT, previous_sigint)
            _restore(signal.SIGTERM, previous_sigterm)
            if options.keep:
                print(f"the mesh file and logs are kept in {workdir}")
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


# -- starting ---------------------------------------------------------------------------------


def start_mesh(
    options: DemoOptions,
    topology: Topology,
    workdir: Path,
    mesh: Children,
    plane: Children,
) -> None:
    """The control plane on the first phase's mesh file, then every app and sidecar; returns
    once every caller's sidecar holds the endpoints of every instance it should call.

    No gRPC here (see ``run``): the probes are TCP connects and the sidecars' admin pages."""
    mesh_path = workdir / "mesh.yaml"
    write_mesh(mesh_path, mesh_file(PHASES[0].policy))
    control_plane = plane.start(
        "control-plane",
        [*options.program, "control-plane", *control_plane_args(topology, str(mesh_path))],
    )
    wait_ready([(control_plane, _app_probe(topology.xds_port))], options.ready_timeout)
    probes: list[tuple[Child, Callable[[], bool]]] = []
    for app in topology.apps:
        child = mesh.start(app.name, app_argv(app))
        probes.append((child, _app_probe(app.port)))
    for sidecar in topology.sidecars:
        argv = [*options.program, "sidecar", *sidecar_args(topology, sidecar)]
        env = {}
        if options.otlp_endpoint is not None:
            # The load driver marks every call sampled; spans carry the node's name.
            argv += ["--otlp-endpoint", options.otlp_endpoint]
            env["OTEL_SERVICE_NAME"] = sidecar.node_id
        child = mesh.start(f"{sidecar.node_id}-sidecar", argv, env=env)
        probes.append((child, _sidecar_probe(sidecar.admin_port, sidecar.listener_ports)))
    wait_ready(probes, options.ready_timeout)
    # Each sidecar registers its app once the app is healthy; the callers learn it over EDS.
    sidecars = {child.name: child for child in mesh}
    wait_ready(
        [
            (sidecars[f"{node}-sidecar"], _holds_probe(admin, hosts))
            for node, admin, hosts in _expected_endpoints(topology)
        ],
        options.ready_timeout,
    )


def _expected_endpoints(topology: Topology) -> list[tuple[str, str, set[str]]]:
    """(node, admin, endpoints) that every caller must hold before traffic starts."""
    greeters = {g.sidecar.inbound_address for g in topology.greeters}
    quotes = {q.sidecar.inbound_address for q in topology.quotes_of(V1)}
    wanted = [(topology.client.node_id, topology.client.admin_address, greeters)]
    wanted += [(g.name, g.sidecar.admin_address, quotes) for g in topology.greeters]
    return [(node, admin, {h for h in hosts if h}) for node, admin, hosts in wanted]


def _holds_probe(admin: str, hosts: set[str]) -> Callable[[], bool]:
    def holds() -> bool:
        held = upstream_hosts(admin)
        return held is not None and hosts <= held

    return holds


def _app_probe(port: int) -> Callable[[], bool]:
    return lambda: tcp_accepts(port)


def _sidecar_probe(admin_port: int, listener_ports: list[int]) -> Callable[[], bool]:
    return lambda: sidecar_ready(admin_port, listener_ports)


def print_mesh(topology: Topology, workdir: Path) -> None:
    def addr(port: int | None) -> str:
        return f"{LOOPBACK}:{port}" if port is not None else "-"

    rows: list[tuple[str, str, SidecarPlan]] = [("load driver", "-", topology.client)]
    rows += [
        (f"{app.name} {app.version}", addr(app.port), app.sidecar)
        for app in topology.greeters + topology.quotes
    ]
    print(f"pilotfish demo: the mesh is up (mesh file and logs in {workdir})")
    print(f"control plane (xDS, status): {topology.xds_address}, mesh file {workdir}/mesh.yaml")
    print()
    print(
        f"  {'instance':<14} {'app':<16} {'sidecar inbound':<16} {'sidecar outbound':<17} "
        "sidecar admin"
    )
    for name, app_addr, sidecar in rows:
        print(
            f"  {name:<14} {app_addr:<16} {addr(sidecar.inbound_port):<16} "
            f"{addr(sidecar.outbound_port):<17} {sidecar.admin_url}"
        )
    print()
    print("while it runs, watch it from another terminal:")
    print(f"  pilotfish top --address {topology.xds_address}")
    print(f"  pilotfish proxy-status --address {topology.xds_address}")
    print(f"  curl {topology.greeters[0].sidecar.admin_url}/config_dump")
    print(flush=True)


def check_path(topology: Topology) -> None:
    """Call once through the whole mesh before measuring, so a broken path fails clearly."""
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


# -- the phases -------------------------------------------------------------------------------


def drive(
    topology: Topology,
    options: DemoOptions,
    workdir: Path,
    children: Children,
    status: ControlPlaneStatus,
) -> int:
    channel = greeter_channel(f"{LOOPBACK}:{topology.client.outbound_port}")
    log = CallLog()
    phases = PhaseRunner(
        topology, options.phase_seconds, workdir / "mesh.yaml", children, status, log
    )
    callers = callers_for(options.rate)
    print(
        f"sending SayHello calls at {options.rate:g}/s with {callers} callers through "
        f"{len(PHASES)} phases of {options.phase_seconds:g} s (Ctrl-C stops early and prints "
        "the summary so far)",
        flush=True,
    )
    driver = LoadDriver(channel, log, rate=options.rate, total=options.max_calls, callers=callers)
    started = time.monotonic()
    interrupted = False
    shown: list[bool] = []
    try:
        driver.start()
        for number, phase in enumerate(PHASES, start=1):
            print()
            print(f"phase {number}/{len(PHASES)}: {phase.title}", flush=True)
            try:
                observed = phases.run_phase(number, phase)
            except MeshNotSettled as exc:
                print(f"  the change did not reach every sidecar: {exc}", flush=True)
                shown.append(False)
                break
            verdict = judge(observed, topology)
            shown.append(verdict.ok)
            print(format_phase(observed, topology, verdict), flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\nstopping: waiting for the calls in flight...", flush=True)
    finally:
        driver.stop()
        # A second Ctrl-C skips the wait, not the summary.
        with contextlib.suppress(KeyboardInterrupt):
            driver.join(CALL_TIMEOUT + 1.0)
        channel.close()
    calls = log.snapshot()
    summary = summarize(calls, time.monotonic() - started)
    print()
    print("summary" + (" (interrupted)" if interrupted else "") + ":")
    print(format_summary(summary))
    print()
    print(format_traces(calls, options.otlp_endpoint))
    if interrupted:
        return EXIT_INTERRUPTED
    failed = len(PHASES) - sum(shown)
    print()
    if failed:
        print(f"pilotfish demo: {failed} of {len(PHASES)} phases did not show their effect")
        return EXIT_PHASE_FAILED
    print(f"pilotfish demo: all {len(PHASES)} phases showed their effect")
    return EXIT_OK

