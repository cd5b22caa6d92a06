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

import grpc
import pytest

try:
    import psutil
except ImportError:  # a dev dependency; without it the orphan checks are skipped
    psutil = None

from pilotfish.config.bootstrap import parse_bootstrap
from pilotfish.demo import otlp_endpoint
from pilotfish.demo.api import demo_pb2_grpc
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
    GREETER,
    QUOTES,
    SERVED_BY_HEADER,
    plan_topology,
    ports_needed,
    sidecar_bootstrap,
)
from pilotfish.demo.traffic import call_greeter, callers_for, new_traceparent
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


def _ok(ms: float, greeter: str, quotes: str, sidecar: str | None = None) -> CallFinished:
    return CallFinished(
        status="OK", latency=ms / 1000, greeter=greeter, quotes=quotes, sidecar=sidecar
    )


def test_summarize_counts_statuses_latency_and_who_served() -> None:
    calls = [
        _ok(1, "greeter-1", "quotes-1", "greeter-1"),
        _ok(2, "greeter-1", "quotes-2", "greeter-1"),
        _ok(3, "greeter-2", "quotes-2", "greeter-2"),
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
    assert summary.sidecars == {"greeter-1": 2, "greeter-2": 1}


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


# --- the topology, checked against the sidecar's own bootstrap loader --------------------------


def test_every_sidecar_bootstrap_loads_and_points_at_the_right_ports() -> None:
    topology = plan_topology(iter(range(20000, 20000 + ports_needed(2, 2))), greeters=2, quotes=2)
    all_ports = [p for s in topology.sidecars for p in (s.admin_port, *s.listener_ports)]
    all_ports += [a.port for a in topology.apps]
    assert len(set(all_ports)) == len(all_ports) == ports_needed(2, 2)

    boots = {s.node_id: parse_bootstrap(sidecar_bootstrap(topology, s)) for s in topology.sidecars}

    client = boots["demo-client"]
    assert [listener.name for listener in client.listeners] == ["outbound"]
    assert {e.port for e in client.clusters[GREETER].endpoints} == {
        g.sidecar.inbound_port for g in topology.greeters
    }
    for greeter in topology.greeters:
        boot = boots[greeter.name]
        assert {e.port for e in boot.clusters[QUOTES].endpoints} == {
            q.sidecar.inbound_port for q in topology.quotes
        }
        assert [e.port for e in boot.clusters["local_app"].endpoints] == [greeter.port]
        inbound = boot.route_configs["inbound"].virtual_hosts[0].routes[0]
        assert inbound.response_headers.add == ((SERVED_BY_HEADER, greeter.name, False),)
        outbound = boot.route_configs["outbound"].virtual_hosts[0]
        assert outbound.domains == ("quotes", "quotes:*")
    for quotes in topology.quotes:
        boot = boots[quotes.name]
        assert [listener.name for listener in boot.listeners] == ["inbound"]
        assert set(boot.clusters) == {"local_app"}
    for sidecar in topology.sidecars:
        assert boots[sidecar.node_id].admin.port == sidecar.admin_port
        assert all(listener.host == "127.0.0.1" for listener in boots[sidecar.node_id].listeners)


def test_sidecars_trace_only_when_an_otlp_endpoint_is_given() -> None:
    topology = plan_topology(iter(range(20000, 20000 + ports_needed(1, 1))), greeters=1, quotes=1)
    for sidecar in topology.sidecars:
        plain = parse_bootstrap(sidecar_bootstrap(topology, sidecar))
        assert not plain.telemetry.tracing.enabled
        boot = sidecar_bootstrap(topology, sidecar, otlp_endpoint="http://127.0.0.1:4317")
        tracing = parse_bootstrap(boot).telemetry.tracing
        assert tracing.enabled and tracing.endpoint == "http://127.0.0.1:4317"
        assert (tracing.sample_ratio, tracing.service_name) == (1.0, sidecar.node_id)


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


def test_demo_runs_the_mesh_and_every_call_succeeds() -> None:
    receiver = OtlpReceiver().start()
    try:
        demo, head, children = _start_demo(
            "--duration", "3", "--rate", "20", "--otlp-endpoint", receiver.endpoint
        )
        try:
            rest, err = demo.communicate(timeout=60)
        finally:
            demo.kill()
    finally:
        receiver.stop()
    out = "".join(head) + rest
    assert demo.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    assert children is None or len(children) >= 9  # 4 services and 5 sidecars
    assert _alive(children) == []

    assert re.search(r"^calls: 60 in [\d.]+ s \([\d.]+/s\), ok 60, failed 0$", out, re.M), out
    assert re.search(r"^  OK +60  100\.0%$", out, re.M), out
    table = _served_table(out)
    assert table["total"]["quotes-1"] > 0 and table["total"]["quotes-2"] > 0, out
    assert table["total"]["total"] == 60
    assert {"greeter-1", "greeter-2"} <= set(table)
    # Every sidecar's admin address is printed, for users to poke at while it runs.
    assert len(set(re.findall(r"http://127\.0\.0\.1:\d+", "".join(head)))) == 5
    assert "/config_dump" in out

    # Each printed trace id is one trace through every hop: 4 sidecar listeners, a SERVER and a
    # CLIENT span each, nested, because the greeter forwards the trace headers to quotes.
    shown = re.findall(r"^  ([0-9a-f]{32})$", out, re.M)
    assert len(shown) == 3, out
    assert f"http://127.0.0.1:16686/trace/{shown[0]}" in out
    for trace_id in shown:
        spans = [s for s in receiver.spans if f"{s.trace_id:032x}" == trace_id]
        assert len(spans) == 8, spans
        services = sorted(str(s.resource["service.name"]).rstrip("12") for s in spans)
        assert services == ["demo-client"] * 2 + ["greeter-"] * 4 + ["quotes-"] * 2
        ids = {s.span_id for s in spans}
        roots = [s for s in spans if s.parent_span_id not in ids]
        assert len(roots) == 1  # under the load driver's span, which is not exported
        assert roots[0].resource["service.name"] == "demo-client"
    # What the sidecars say they exported is what the collector received: 8 spans for each of
    # the 60 calls and the first call that checks the path before traffic.
    exported = re.search(r"^spans: (\d+) exported to \S+, 0 dropped$", out, re.M)
    assert exported and int(exported.group(1)) == len(receiver.spans) >= 61 * 8, out


def test_spans_sent_nowhere_are_reported_dropped_and_the_folder_kept() -> None:
    result = subprocess.run(
        [*DEMO, "--duration", "1", "--rate", "10", "--otlp-endpoint", f"http://127.0.0.1:{_closed_port()}",
         "--keep"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    dropped = re.search(r"^spans: 0 exported to \S+, (\d+) dropped$", result.stdout, re.M)
    assert dropped, result.stdout
    assert int(dropped.group(1)) >= 11 * 8 and int(dropped.group(1)) % 8 == 0, result.stdout
    assert "nothing was accepted: is a collector listening at" in result.stdout
    kept = re.search(r"^configs and logs are kept in (\S+)$", result.stdout, re.M)
    assert kept, result.stdout
    folder = Path(kept.group(1))
    try:
        assert (folder / "greeter-1-sidecar.log").is_file()
        assert (folder / "greeter-1.yaml").is_file()
    finally:
        shutil.rmtree(folder)


def _closed_port() -> int:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_ctrl_c_prints_the_summary_so_far_and_stops_every_process() -> None:
    demo, _, children = _start_demo("--duration", "60", "--rate", "20")
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            if line.startswith("["):  # the first progress line
                break
        demo.send_signal(signal.SIGINT)
        rest, err = demo.communicate(timeout=30)
    finally:
        demo.kill()
    assert demo.returncode == 130, err
    assert "summary (interrupted):" in rest
    match = re.search(r"^calls: (\d+) in .*, failed 0$", rest, re.M)
    assert match and 0 < int(match.group(1)) < 1200, rest
    assert _alive(children) == []
