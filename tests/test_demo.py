"""``pilotfish demo``: its pure parts with tables, its services without a mesh, and the real thing
end to end (sidecars included) as a user runs it."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

try:
    import psutil
except ImportError:  # a dev dependency; without it the orphan checks are skipped
    psutil = None

from control_plane.mesh import MeshRoute, parse_mesh
from control_plane.validate import validate_file
from pilotfish.cli import build_parser
from pilotfish.demo import otlp_endpoint
from pilotfish.demo.api import demo_pb2_grpc
from pilotfish.demo.phases import (
    PHASES,
    Acked,
    Observed,
    Phase,
    format_acked,
    format_phase,
    judge,
)
from pilotfish.demo.processes import free_ports, tcp_accepts
from pilotfish.demo.summary import (
    CallFinished,
    format_progress,
    format_summary,
    format_traces,
    jaeger_ui,
    percentile,
    summarize,
)
from pilotfish.demo.topology import (
    QUOTES,
    QUOTES_CANARY,
    Topology,
    control_plane_args,
    mesh_file,
    plan_topology,
    ports_needed,
    sidecar_args,
)
from pilotfish.demo.traffic import call_greeter, callers_for, new_traceparent
from pilotfish.top.core import Row
from sidecar.observability.propagation import parse_traceparent
from tests.observability.otlp_receiver import OtlpReceiver

# --- percentiles and the summary --------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([7.0], 50, 7.0),
        ([7.0], 99, 7.0),
        ([1.0, 2.0], 50, 1.0),
        ([1.0, 2.0], 51, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 25, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 75, 3.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([float(i) for i in range(1, 101)], 50, 50.0),
        ([float(i) for i in range(1, 101)], 90, 90.0),
        ([float(i) for i in range(1, 101)], 99, 99.0),
        ([float(i) for i in range(1, 1001)], 99.9, 999.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


@pytest.mark.parametrize(("values", "q"), [([], 50), ([1.0], -1), ([1.0], 100.5)])
def test_percentile_rejects_nonsense(values: list[float], q: float) -> None:
    with pytest.raises(ValueError):
        percentile(values, q)


def _ok(ms: float, greeter: str, quotes: str, started: float = 0.0) -> CallFinished:
    return CallFinished(
        status="OK", latency=ms / 1000, greeter=greeter, quotes=quotes, started=started
    )


def test_summarize_counts_statuses_latency_and_who_served() -> None:
    calls = [
        _ok(1, "greeter-1", "quotes-1"),
        _ok(2, "greeter-1", "quotes-2"),
        _ok(3, "greeter-2", "quotes-2"),
        _ok(4, "greeter-2", "quotes-2"),
        CallFinished(status="UNAVAILABLE", latency=0.010, detail="no healthy upstream"),
        CallFinished(status="UNAVAILABLE", latency=0.005, detail="connection reset"),
        CallFinished(status="DEADLINE_EXCEEDED", latency=0.100),
    ]
    summary = summarize(calls, elapsed=2.0)

    assert summary.calls == 7
    assert summary.ok == 4
    assert list(summary.statuses.items()) == [
        ("OK", 4), ("UNAVAILABLE", 2), ("DEADLINE_EXCEEDED", 1)
    ]
    assert summary.details["UNAVAILABLE"] == "no healthy upstream"
    assert summary.latency is not None
    assert (summary.latency.p50, summary.latency.max) == (0.004, 0.100)
    assert summary.served == {
        ("greeter-1", "quotes-1"): 1,
        ("greeter-1", "quotes-2"): 1,
        ("greeter-2", "quotes-2"): 2,
    }


def test_format_summary_shows_the_served_by_matrix() -> None:
    calls = [_ok(1, "greeter-1", "quotes-1")] * 3 + [_ok(2, "greeter-2", "quotes-2")] * 2
    text = format_summary(summarize(calls, elapsed=1.0))

    assert "calls: 5 in 1.0 s (5.0/s), ok 5, failed 0" in text
    assert "p50 1.0 ms   p90 2.0 ms   p99 2.0 ms   max 2.0 ms" in text
    table = _served_table(text)
    assert table == {
        "greeter-1": {"quotes-1": 3, "quotes-2": 0, "total": 3},
        "greeter-2": {"quotes-1": 0, "quotes-2": 2, "total": 2},
        "total": {"quotes-1": 3, "quotes-2": 2, "total": 5},
    }


def test_an_empty_run_still_formats() -> None:
    summary = summarize([], elapsed=0.0)
    assert "(no calls finished)" in format_summary(summary)
    assert "0 calls" in format_progress(summary)


def test_callers_stay_few_but_keep_up_with_the_rate() -> None:
    assert callers_for(1) == 4
    assert callers_for(50) == 4
    assert callers_for(500) == 20
    assert callers_for(1e6) == 32


# --- the topology and the mesh file of each phase, checked against the real parsers ------------


def _topology() -> Topology:
    return plan_topology(iter(range(20000, 20000 + ports_needed(2, 3))), greeters=2, quotes=3)


def test_every_process_gets_its_own_ports_and_the_last_quotes_is_the_canary() -> None:
    topology = _topology()
    ports = [topology.xds_port]
    ports += [p for s in topology.sidecars for p in (s.admin_port, *s.listener_ports)]
    ports += [a.port for a in topology.apps]
    assert len(set(ports)) == len(ports) == ports_needed(2, 3)
    assert [(q.name, q.version) for q in topology.quotes] == [
        ("quotes-1", "v1"), ("quotes-2", "v1"), ("quotes-3", "v2")
    ]
    with pytest.raises(ValueError):
        plan_topology(iter(range(100)), greeters=1, quotes=1)


def test_every_sidecar_takes_its_config_over_xds_and_registers_its_app() -> None:
    topology = _topology()
    parser = build_parser()
    for sidecar in topology.sidecars:
        args = parser.parse_args(["sidecar", *sidecar_args(topology, sidecar)])
        assert (args.xds, args.node_id, args.service) == (
            topology.xds_address, sidecar.node_id, sidecar.service
        )
        assert args.admin_address == sidecar.admin_address
        assert args.outbound_address == f"127.0.0.1:{sidecar.outbound_port}"
    for app in topology.apps:
        args = parser.parse_args(["sidecar", *sidecar_args(topology, app.sidecar)])
        assert args.register and args.register_label == [f"version={app.version}"]
        assert args.app_address == f"127.0.0.1:{app.port}"
        assert args.inbound_address == app.sidecar.inbound_address
    client = parser.parse_args(["sidecar", *sidecar_args(topology, topology.client)])
    assert not client.register and client.app_address == ""
    plane = parser.parse_args(["control-plane", *control_plane_args(topology, "mesh.yaml")])
    assert (plane.config, plane.port) == ("mesh.yaml", topology.xds_port)


def _quote_route(phase: Phase) -> MeshRoute:
    mesh = parse_mesh(mesh_file(phase.policy))
    (route,) = mesh.services[QUOTES].routes
    return route


def test_each_phase_is_a_valid_mesh_file_that_changes_what_it_says(tmp_path: Path) -> None:
    baseline, canary, fault, drain = PHASES
    for phase in PHASES:
        path = tmp_path / "mesh.yaml"
        path.write_text(yaml.safe_dump(mesh_file(phase.policy)), encoding="utf-8")
        report = validate_file(path)
        assert report.findings == (), report.findings  # Envoy's own rules included
    def split(route: MeshRoute) -> dict[str, int]:
        return {c.name: c.weight for c in route.clusters}

    assert split(_quote_route(baseline)) == {QUOTES: 1}
    assert split(_quote_route(canary)) == {QUOTES: 90, QUOTES_CANARY: 10}
    assert _quote_route(canary).policy.fault is None
    faults = _quote_route(fault).policy.fault
    assert faults is not None and faults.abort is not None
    assert (faults.abort.percentage, faults.abort.grpc_status) == (10, 14)
    assert _quote_route(drain).policy.fault is None and drain.drain
    mesh = parse_mesh(mesh_file(canary.policy))
    selector = mesh.services[QUOTES_CANARY].registry
    assert selector is not None
    assert (selector.service, dict(selector.labels)) == (QUOTES, {"version": "v2"})


# --- each phase's verdict, from the calls and the metrics of its window -----------------------


def _calls(*served: tuple[str, int], failed: int = 0) -> list[CallFinished]:
    calls = [_ok(5, "greeter-1", name) for name, n in served for _ in range(n)]
    return calls + [CallFinished(status="UNAVAILABLE", latency=0.001)] * failed


def _quotes_row(requests: float, success_rate: float) -> Row:
    return Row(
        direction="outbound", service=QUOTES, route="(all)", requests=requests, rps=50.0,
        success_rate=success_rate, p50=0.005, p99=0.02,
    )


@pytest.mark.parametrize(
    ("index", "calls", "extra", "ok"),
    [
        (0, _calls(("quotes-1", 100), ("quotes-2", 100)), {}, True),
        (0, _calls(("quotes-1", 190), ("quotes-2", 10)), {}, False),  # not round robin
        (0, _calls(("quotes-1", 99), ("quotes-2", 99), ("quotes-3", 2)), {}, False),
        (1, _calls(("quotes-1", 90), ("quotes-2", 90), ("quotes-3", 20)), {}, True),
        (1, _calls(("quotes-1", 100), ("quotes-2", 100)), {}, False),  # the split did nothing
        (1, _calls(("quotes-1", 50), ("quotes-2", 50), ("quotes-3", 100)), {}, False),
        (2, _calls(("quotes-1", 200), failed=1),
         {"rows": [_quotes_row(220, 0.9)], "quotes_failed": 22, "retries": 21}, True),
        (2, _calls(("quotes-1", 200)), {"quotes_failed": 0, "retries": 0}, False),
        (2, _calls(("quotes-1", 200)), {"quotes_failed": 22, "retries": 0}, False),
        (2, _calls(("quotes-1", 178), failed=22),
         {"quotes_failed": 22, "retries": 5}, False),  # nothing absorbed
        (3, _calls(("quotes-1", 180), ("quotes-3", 20)), {"drained": "quotes-2"}, True),
        (3, _calls(("quotes-1", 180), ("quotes-3", 19), failed=1), {"drained": "quotes-2"},
         False),
        (3, _calls(("quotes-1", 180), ("quotes-3", 20)),
         {"drained": "quotes-2", "drained_after_removal": 3}, False),
        (0, [], {}, False),
    ],
)
def test_a_phase_shows_its_effect_or_says_what_is_missing(
    index: int, calls: list[CallFinished], extra: dict[str, Any], ok: bool
) -> None:
    observed = Observed(phase=PHASES[index], acked=(), calls=calls, seconds=4.0, **extra)
    verdict = judge(observed, _topology())
    assert verdict.ok is ok, verdict.text
    text = format_phase(observed, _topology(), verdict)
    assert text.endswith(": OK" if ok else ": NOT SHOWN")


def test_a_phase_report_names_the_acked_versions() -> None:
    acked = Acked(
        what="mesh file rewritten", generation=3, in_sync=6, connected=6, seconds=0.25,
        sample_node="greeter-1", changed=[("RDS", "8a4c354a11111111", "6ff7150a22222222")],
    )
    assert format_acked(acked) == [
        "  control plane: mesh file rewritten; mesh generation 3, acked by 6/6 sidecars "
        "within 0.2 s",
        "    greeter-1 acked RDS 6ff7150a (was 8a4c354a)",
    ]
    first = Acked(
        what="the mesh file as started", generation=1, in_sync=6, connected=6, seconds=0.0,
        sample_node="greeter-1", changed=[("LDS", "", "f2c305a0aaaa"), ("RDS", "", "e53b99ef")],
    )
    assert format_acked(first)[1] == "    greeter-1 acked LDS f2c305a0, RDS e53b99ef"


def test_each_call_starts_a_sampled_w3c_trace() -> None:
    trace_id, header = new_traceparent()
    parent = parse_traceparent(header.encode())
    assert parent is not None and parent.sampled
    assert f"{parent.trace_id:032x}" == trace_id
    assert new_traceparent()[0] != trace_id


def test_the_otlp_endpoint_comes_from_the_flag_or_the_environment() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert otlp_endpoint("http://flag:4317", env) == "http://flag:4317"
    assert otlp_endpoint(None, env) == "http://collector:4317"
    traces_env = {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317"}
    assert otlp_endpoint(None, traces_env) == "http://traces:4317"
    assert otlp_endpoint(None, {}) is None
    assert jaeger_ui("http://127.0.0.1:4317") == "http://127.0.0.1:16686"
    assert jaeger_ui("jaeger:4317") == "http://jaeger:16686"


def test_trace_ids_are_printed_with_a_hint_where_to_look() -> None:
    calls = [
        CallFinished(status="UNAVAILABLE", latency=0.1, trace_id="f" * 32),
        CallFinished(status="OK", latency=0.1, trace_id="a" * 32),
    ]
    on = format_traces(calls, "http://127.0.0.1:4317")
    assert on.index("a" * 32) < on.index("f" * 32)  # successful calls first
    assert f"http://127.0.0.1:16686/trace/{'a' * 32}" in on
    off = format_traces(calls, None)
    assert "a" * 32 in off and "--otlp-endpoint" in off and "16686" not in off


# --- the sample services, without any sidecar -------------------------------------------------


@contextmanager
def _process(argv: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not tcp_accepts(port):
            assert process.poll() is None, process.communicate()[0].decode()
            assert time.monotonic() < deadline, f"{argv} did not listen on {port}"
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(10)


def test_greeter_asks_quotes_and_reports_who_served() -> None:
    quotes_port, greeter_port = free_ports(2)
    quotes_argv = [
        sys.executable, "-m", "pilotfish.demo.services", "quotes", "--port", str(quotes_port),
        "--name", "quotes-1",
    ]
    greeter_argv = [
        sys.executable, "-m", "pilotfish.demo.services", "greeter", "--port", str(greeter_port),
        "--name", "greeter-7", "--quotes-target", f"127.0.0.1:{quotes_port}",
    ]
    with _process(quotes_argv, quotes_port), _process(greeter_argv, greeter_port) as greeter:
        with grpc.insecure_channel(f"127.0.0.1:{greeter_port}") as channel:
            result = call_greeter(demo_pb2_grpc.GreeterStub(channel), "tester")
        assert (result.status, result.greeter, result.quotes) == ("OK", "greeter-7", "quotes-1")
    assert greeter.returncode == 0  # SIGTERM is a clean stop


def test_greeter_passes_a_quotes_failure_through() -> None:
    (greeter_port, nothing_there) = free_ports(2)
    greeter_argv = [
        sys.executable, "-m", "pilotfish.demo.services", "greeter", "--port", str(greeter_port),
        "--quotes-target", f"127.0.0.1:{nothing_there}",
    ]
    with (
        _process(greeter_argv, greeter_port),
        grpc.insecure_channel(f"127.0.0.1:{greeter_port}") as channel,
    ):
        result = call_greeter(demo_pb2_grpc.GreeterStub(channel), "tester")
    assert result.status == "UNAVAILABLE"
    assert result.detail.startswith("quotes call failed")


# --- end to end: the command as a user runs it ------------------------------------------------

DEMO = [sys.executable, "-m", "pilotfish", "demo"]


def _served_table(text: str) -> dict[str, dict[str, int]]:
    lines = text.split("served by", 1)[1].splitlines()[1:]
    header = lines[0].split()
    table: dict[str, dict[str, int]] = {}
    for line in lines[1:]:
        cells = line.split()
        if len(cells) != len(header) + 1:
            break
        table[cells[0]] = dict(zip(header, map(int, cells[1:]), strict=True))
    return table


def _descendants(pid: int) -> list[int] | None:
    """The demo's child processes (None without psutil, which only the orphan checks need)."""
    if psutil is None:
        return None
    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def _alive(pids: list[int] | None) -> list[int]:
    if psutil is None or pids is None:
        return []
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _start_demo(*args: str) -> tuple[subprocess.Popen[str], list[str], list[int] | None]:
    """Start the demo and read its output until traffic starts; return what it printed so far
    and its child processes at that moment."""
    demo = subprocess.Popen(
        [*DEMO, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert demo.stdout is not None
    head: list[str] = []
    for line in demo.stdout:
        head.append(line)
        if line.startswith("sending "):
            return demo, head, _descendants(demo.pid)
    _, err = demo.communicate(timeout=30)
    pytest.fail(f"the demo exited with {demo.returncode} before traffic:\n{''.join(head)}{err}")


def test_demo_runs_every_phase_through_the_control_plane_and_shows_its_effect() -> None:
    receiver = OtlpReceiver().start()
    try:
        demo, head, children = _start_demo("--otlp-endpoint", receiver.endpoint, "--keep")
        try:
            rest, err = demo.communicate(timeout=120)
        finally:
            demo.kill()
    finally:
        receiver.stop()
    out = "".join(head) + rest
    assert demo.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    # The control plane, 5 apps and 6 sidecars, all stopped at the end.
    assert children is None or len(children) >= 12
    assert _alive(children) == []
    kept = re.search(r"^the mesh file and logs are kept in (\S+)$", out, re.M)
    assert kept, out
    folder = Path(kept.group(1))
    try:
        assert (folder / "greeter-1-sidecar.log").is_file()
        # The last phase's mesh file: the split stays, the fault is gone.
        last = yaml.safe_load((folder / "mesh.yaml").read_text())
        assert last == mesh_file(PHASES[-1].policy)
    finally:
        shutil.rmtree(folder)

    assert "pilotfish demo: all 4 phases showed their effect" in out
    assert len(re.findall(r"^  effect: .*: OK$", out, re.M)) == 4, out
    # Each change is acked by every sidecar, with the versions a caller of quotes now runs.
    acks = re.findall(r"^  control plane: (.*); mesh generation (\d+), acked by (\d+)/(\d+)", out,
                      re.M)
    assert [(g, n, m) for _, g, n, m in acks] == [
        ("1", "6", "6"), ("2", "6", "6"), ("3", "6", "6"), ("4", "6", "6"), ("4", "5", "5")
    ], out
    assert acks[0][0] == "the mesh file as started"
    assert "quotes-2 deregistered itself on SIGTERM" in acks[-1][0]
    assert re.search(r"^    greeter-1 acked .*RDS [0-9a-f]{8} \(was [0-9a-f]{8}\)", out, re.M), out
    assert re.search(r"^    greeter-1 acked EDS [0-9a-f]{8}", out, re.M), out
    assert re.search(r"^  effect: v2 answered [\d.]+% of the quotes calls", out, re.M), out
    # The fault, as the sidecars counted it: quotes calls failed, greeter calls hardly did.
    fault = out.split("phase 3/4", 1)[1].split("phase 4/4", 1)[0]
    quotes_ok = re.search(r"^  sidecars' metrics \(outbound\): greeter .*; quotes ([\d.]+)% ok",
                          fault, re.M)
    assert quotes_ok and float(quotes_ok.group(1)) < 100.0, fault
    drain = out.split("phase 4/4", 1)[1]
    assert re.search(r"^  traffic: \d+ calls in [\d.]+ s, (\d+) ok \(100\.0%\)", drain, re.M)
    table = _served_table(out)
    assert all(table["total"][q] > 0 for q in ("quotes-1", "quotes-2", "quotes-3")), out
    assert {"greeter-1", "greeter-2"} <= set(table)
    # Every sidecar's admin address is printed, for users to poke at while it runs.
    assert len(set(re.findall(r"http://127\.0\.0\.1:\d+", "".join(head)))) == 6
    assert "pilotfish top --address 127.0.0.1:" in out

    # Each printed trace id is one trace through every hop: 4 sidecar listeners, a SERVER and a
    # CLIENT span each, nested, because the greeter forwards the trace headers to quotes.
    shown = re.findall(r"^  ([0-9a-f]{32})$", out, re.M)
    assert len(shown) == 3, out
    assert f"http://127.0.0.1:16686/trace/{shown[0]}" in out
    for trace_id in shown:
        spans = [s for s in receiver.spans if f"{s.trace_id:032x}" == trace_id]
        assert len(spans) == 8, spans
        services = sorted(str(s.resource["service.name"]).rstrip("0123456789") for s in spans)
        assert services == ["demo-client"] * 2 + ["greeter-"] * 4 + ["quotes-"] * 2
        ids = {s.span_id for s in spans}
        roots = [s for s in spans if s.parent_span_id not in ids]
        assert len(roots) == 1  # under the load driver's span, which is not exported
        assert roots[0].resource["service.name"] == "demo-client"
    # What the sidecars say they exported is what the collector received: at least 8 spans for
    # each successful call (retried ones have more).
    ok = re.search(r"^calls: \d+ in [\d.]+ s \([\d.]+/s\), ok (\d+), failed \d+$", out, re.M)
    exported = re.search(r"^spans: (\d+) exported to \S+, 0 dropped$", out, re.M)
    assert ok and exported, out
    assert int(exported.group(1)) == len(receiver.spans) >= 8 * int(ok.group(1)), out


def _closed_port() -> int:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_ctrl_c_prints_the_summary_so_far_and_stops_every_process() -> None:
    # Spans go nowhere: the demo must say they were dropped, not exported, even when cut short.
    nowhere = f"http://127.0.0.1:{_closed_port()}"
    demo, _, children = _start_demo(
        "--duration", "60", "--rate", "20", "--otlp-endpoint", nowhere
    )
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if line.lstrip().startswith("["):  # the first progress line
                break
        demo.send_signal(signal.SIGINT)
        rest, err = demo.communicate(timeout=60)
    finally:
        demo.kill()
    assert demo.returncode == 130, err
    assert "summary (interrupted):" in rest
    match = re.search(r"^calls: (\d+) in .*, ok (\d+), failed 0$", rest, re.M)
    assert match and 0 < int(match.group(1)) < 1200, rest
    assert _alive(children) == []
    dropped = re.search(r"^spans: 0 exported to \S+, (\d+) dropped$", rest, re.M)
    assert dropped, rest
    # 8 spans for each call, and for the first call that checks the path before traffic.
    assert int(dropped.group(1)) >= 8 * (int(match.group(2)) + 1), rest
    assert f"nothing was accepted: is a collector listening at {nowhere}?" in rest
    assert "kept in" not in rest  # no --keep: the run folder is gone
