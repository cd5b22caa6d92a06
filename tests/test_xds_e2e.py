"""Live config end to end: a real control plane process pushing xDS to a real sidecar process.

Real grpcio servers (the backends) and clients run in the test process; the control plane and
the sidecar run as ``python -m pilotfish ...`` processes with their logs in temporary files
(printed when a test fails). Traffic goes through the sidecar's outbound listener by authority,
the way an app in the mesh calls a service.

What is pinned down: a mesh edit is followed within the watcher's poll plus a second, without a
failed call; a bad edit is reported with its field path and changes nothing; the sidecar rides
out a control plane crash and resyncs; a listener the sidecar cannot bind is NACKed once and the
last good config stays, and once the port is free the next edit heals it;
readiness waits for the first config; the inbound listener reaches the app.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.support import STARTUP_TIMEOUT, GrpcServer, free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
SERVICE = "pilotfish.test.Echo"
METHOD = f"/{SERVICE}/Whoami"
# The watcher polls every 200 ms; a valid edit is then served within a second.
POLL = 0.2
APPLY_WITHIN = 1.0 + POLL
BAD_TIMEOUT_MESSAGE = "services.echo.routes[0].timeout: expected a duration like 250ms"


# -- backends ---------------------------------------------------------------------------------


class Backend:
    """A grpcio server that answers every call with its own name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        self._lock = threading.Lock()

        def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.calls += 1
            return name.encode()

        handler = grpc.unary_unary_rpc_method_handler(whoami)
        self.server = GrpcServer(SERVICE, {"Whoami": handler})
        self.address = self.server.address


@pytest.fixture
def backends() -> Iterator[dict[str, Backend]]:
    servers = {name: Backend(name) for name in ("a", "b", "app")}
    yield servers
    for backend in servers.values():
        backend.server.stop()


# -- processes --------------------------------------------------------------------------------


class Process:
    """A ``python -m pilotfish`` child with its output in a log file."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pilotfish", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


class ControlPlane:
    def __init__(self, processes: Processes, mesh: Path, port: int) -> None:
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.process = processes.start(
            "control-plane", ["control-plane", "--config", str(mesh), "--port", str(port)]
        )

    def wait_serving(self) -> None:
        def serving() -> bool:
            assert self.process.proc.poll() is None, self.process.log()
            return "control plane serving" in self.process.log()

        assert wait_for(serving, STARTUP_TIMEOUT), self.process.log()

    def status(self, check: bool = True) -> str:
        """``pilotfish status`` as a user runs it (its error instead, unless ``check``)."""
        result = subprocess.run(
            [sys.executable, "-m", "pilotfish", "status", "--address", self.address,
             "--timeout", "3"],
            cwd=ROOT, capture_output=True, text=True, timeout=15,
        )
        assert result.returncode == 0 or not check, result.stderr
        return result.stdout or result.stderr

    def log(self) -> str:
        return self.process.log()


class Sidecar:
    def __init__(
        self, processes: Processes, xds: str, node_id: str, service: str, *extra: str
    ) -> None:
        self.node_id = node_id
        self.outbound = f"127.0.0.1:{free_port()}"
        self.admin_url = f"http://127.0.0.1:{free_port()}"
        self.process = processes.start(
            f"sidecar-{node_id}",
            ["sidecar", "--xds", xds, "--node-id", node_id, "--service", service,
             "--outbound-address", self.outbound,
             "--admin-address", self.admin_url.removeprefix("http://"), *extra],
        )

    def admin(self, path: str) -> tuple[int, str]:
        assert self.process.proc.poll() is None, self.process.log()
        try:
            return http_get(self.admin_url + path)
        except OSError as exc:  # not listening yet
            return 0, str(exc)

    def wait_ready(self) -> None:
        assert wait_for(lambda: self.admin("/ready")[0] == 200, STARTUP_TIMEOUT), (
            self.process.log()
        )

    def stat(self, name: str) -> int:
        status, text = self.admin("/stats")
        assert status == 200, text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    def config_dump(self) -> dict[str, Any]:
        status, text = self.admin("/config_dump")
        assert status == 200, text
        dump: dict[str, Any] = json.loads(text)
        return dump

    def log(self) -> str:
        return self.process.log()


class Processes:
    """Every process a test starts; all are stopped, and their logs printed, at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Process] = []

    def start(self, name: str, args: list[str]) -> Process:
        process = Process(f"{len(self.started)}-{name}", args, self.log_dir)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        # All at once: a control plane waits for open streams to end before it exits.
        for process in self.started:
            if process.proc.poll() is None:
                process.proc.terminate()
        for process in self.started:
            process.stop()
        for process in self.started:
            print(f"----- {process.name}: pilotfish {' '.join(process.args)}\n{process.log()}")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


# -- the mesh file ----------------------------------------------------------------------------


class MeshFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, services: dict[str, Any]) -> float:
        return self.write_text(yaml.safe_dump({"services": services}, sort_keys=False))

    def write_text(self, text: str) -> float:
        """Replace the file in one step, so the watcher never reads half of it."""
        with tempfile.NamedTemporaryFile(
            "w", dir=self.path.parent, suffix=".tmp", delete=False
        ) as tmp:
            tmp.write(text)
        os.replace(tmp.name, self.path)
        return time.monotonic()


@pytest.fixture
def mesh(tmp_path: Path) -> MeshFile:
    return MeshFile(tmp_path / "mesh.yaml")


# -- traffic ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Call:
    started: float
    backend: str | None
    error: str | None = None


@dataclass
class Traffic:
    """One client thread calling ``authority`` through ``target`` until stopped (bounded)."""

    target: str
    authority: str = "echo"
    interval: float = 0.006
    max_calls: int = 2000
    max_seconds: float = 15.0
    calls: list[Call] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        options = [("grpc.default_authority", self.authority)]
        deadline = time.monotonic() + self.max_seconds
        with grpc.insecure_channel(self.target, options=options) as channel:
            whoami = channel.unary_unary(METHOD)
            while (
                not self._stop.is_set()
                and len(self.calls) < self.max_calls
                and time.monotonic() < deadline
            ):
                started = time.monotonic()
                try:
                    reply = whoami(b"", timeout=5)
                    self.calls.append(Call(started, reply.decode()))
                except grpc.RpcError as exc:
                    error = f"{exc.code().name}: {exc.details()}"
                    self.calls.append(Call(started, None, error))
                self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            assert not self._thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def failures(self) -> list[Call]:
        return [call for call in self.calls if call.error is not None]

    def since(self, start: float) -> list[Call]:
        return [call for call in list(self.calls) if call.started >= start]

    def last(self, n: int) -> list[Call]:
        return list(self.calls)[-n:]

    def wait_calls(self, n: int, start: float, timeout: float = 10.0) -> list[Call]:
        """At least ``n`` calls started after ``start``."""
        assert wait_for(lambda: len(self.since(start)) >= n or not self.running, timeout)
        calls = self.since(start)
        assert len(calls) >= n, f"traffic stopped early: {len(calls)} calls"
        return calls

    def wait_settled(self, backends: set[str], start: float, n: int = 30) -> None:
        """The last ``n`` calls after ``start`` all landed on ``backends``."""

        def settled() -> bool:
            recent = self.since(start)[-n:]
            return len(recent) == n and {c.backend for c in recent} <= backends

        assert wait_for(settled, 5), self.summary(start)

    def summary(self, start: float) -> str:
        calls = self.since(start)
        seen: dict[str | None, int] = {}
        for call in calls:
            seen[call.backend] = seen.get(call.backend, 0) + 1
        return f"{len(calls)} calls since the edit: {seen}; failures: {self.failures()[:5]}"


@contextlib.contextmanager
def traffic_through(sidecar: Sidecar, authority: str = "echo") -> Iterator[Traffic]:
    traffic = Traffic(sidecar.outbound, authority).start()
    try:
        yield traffic
    finally:
        traffic.stop()


def last_start_on(calls: list[Call], backends: set[str]) -> float:
    """When the last of ``calls`` that landed on one of ``backends`` started (0 if none)."""
    return max((c.started for c in calls if c.backend in backends), default=0.0)


def first_start_on(calls: list[Call], backends: set[str]) -> float:
    return min((c.started for c in calls if c.backend in backends), default=float("inf"))


# -- meshes -----------------------------------------------------------------------------------


def echo_service(*endpoints: str, **extra: Any) -> dict[str, Any]:
    return {"protocol": "grpc", "endpoints": list(endpoints), **extra}


def prefix_route(timeout: str = "5s", **action: Any) -> dict[str, Any]:
    return {"name": "all", "match": {"prefix": "/"}, "timeout": timeout, **action}


def basic_mesh(*echo_endpoints: str, **more: dict[str, Any]) -> dict[str, Any]:
    return {
        "client": {"endpoints": []},
        "echo": echo_service(*echo_endpoints, routes=[prefix_route()]),
        **more,
    }


@dataclass
class Mesh:
    """A running control plane, and one sidecar (node ``n1``) in sync with it."""

    mesh: MeshFile
    control_plane: ControlPlane
    sidecar: Sidecar


@pytest.fixture
def make_mesh(processes: Processes, mesh: MeshFile) -> Callable[..., Mesh]:
    def make(services: dict[str, Any], *sidecar_args: str, service: str = "client") -> Mesh:
        mesh.write(services)
        control_plane = ControlPlane(processes, mesh.path, free_port())
        control_plane.wait_serving()
        sidecar = Sidecar(processes, control_plane.address, "n1", service, *sidecar_args)
        sidecar.wait_ready()
        return Mesh(mesh, control_plane, sidecar)

    return make


@dataclass(frozen=True, slots=True)
class TypeRow:
    acked: str
    in_sync: bool
    last_nack: str


def proxy_status(status: str, node_id: str) -> dict[str, TypeRow]:
    """One proxy's rows of ``pilotfish status`` output, by resource type (LDS, RDS, ...)."""
    rows: dict[str, TypeRow] = {}
    mine = False
    for line in status.splitlines():
        words = line.split()
        if not words:
            continue
        if not line.startswith(" "):
            mine = words[0] == node_id
        kinds = [i for i, word in enumerate(words) if word in ("LDS", "RDS", "CDS", "EDS")]
        if mine and kinds:
            i = kinds[0]
            rows[words[i]] = TypeRow(words[i + 1], words[i + 2] == "yes", " ".join(words[i + 3:]))
    return rows


def in_sync(status: str, node_id: str) -> bool:
    rows = proxy_status(status, node_id)
    return len(rows) == 4 and all(row.in_sync for row in rows.values())


# -- tests ------------------------------------------------------------------------------------


def test_mesh_edits_are_followed_under_traffic_without_a_failed_call(
    backends: dict[str, Backend], make_mesh: Callable[..., Mesh]
) -> None:
    a, b = backends["a"].address, backends["b"].address
    m = make_mesh(basic_mesh(a, b))
    with traffic_through(m.sidecar) as traffic:
        begin = time.monotonic()
        traffic.wait_calls(40, begin)
        assert {c.backend for c in traffic.since(begin)} == {"a", "b"}, traffic.summary(begin)

        # Endpoints: everything to b.
        edited = m.mesh.write(basic_mesh(b))
        traffic.wait_settled({"b"}, edited)
        on_a = last_start_on(traffic.since(edited), {"a"})
        assert on_a - edited < APPLY_WITHIN, f"a still used {on_a - edited:.2f}s after the edit"
        print(f"endpoint edit followed within {on_a - edited:.3f}s")

        # Routes: a new service and a weighted split to it, in one edit; 3 of 4 calls to it.
        split = basic_mesh(b, **{"echo-canary": echo_service(a)})
        split["echo"]["routes"] = [prefix_route(split={"echo": 1, "echo-canary": 3})]
        edited = m.mesh.write(split)
        assert wait_for(lambda: first_start_on(traffic.since(edited), {"a"}) < float("inf"), 5)
        applied = first_start_on(traffic.since(edited), {"a"})
        assert applied - edited < APPLY_WITHIN, f"split applied {applied - edited:.2f}s late"
        print(f"split edit followed within {applied - edited:.3f}s")
        calls = traffic.wait_calls(300, applied)[:300]
        share = sum(c.backend == "a" for c in calls) / len(calls)
        assert 0.6 < share < 0.9, f"canary share {share:.2f}, expected about 0.75"

    assert traffic.failures() == [], traffic.summary(begin)
    assert len(traffic.calls) <= traffic.max_calls


def test_a_bad_edit_is_reported_with_its_field_path_and_changes_nothing(
    backends: dict[str, Backend], make_mesh: Callable[..., Mesh]
) -> None:
    a, b = backends["a"].address, backends["b"].address
    m = make_mesh(basic_mesh(b))
    with traffic_through(m.sidecar) as traffic:
        # Would move traffic to a, were it not for the bad timeout.
        bad = basic_mesh(a)
        bad["echo"]["routes"] = [prefix_route(timeout="soon")]
        edited = m.mesh.write(bad)
        assert wait_for(lambda: BAD_TIMEOUT_MESSAGE in m.control_plane.log(), 3)
        error_lines = [
            line for line in m.control_plane.log().splitlines() if BAD_TIMEOUT_MESSAGE in line
        ]
        assert len(error_lines) == 1, error_lines  # logged once, not at every poll
        assert "ERROR" in error_lines[0] and str(m.mesh.path) in error_lines[0]

        status = m.control_plane.status()
        assert "MESH FILE ERROR" in status and BAD_TIMEOUT_MESSAGE in status, status
        assert in_sync(status, "n1"), status

        traffic.wait_calls(100, edited)
        assert {c.backend for c in traffic.since(edited)} == {"b"}, traffic.summary(edited)

        result = subprocess.run(
            [sys.executable, "-m", "pilotfish", "validate", str(m.mesh.path)],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        assert result.returncode != 0
        first, last = result.stderr.strip().splitlines()
        where = re.escape(str(m.mesh.path))
        assert re.fullmatch(rf"{where}:\d+:\d+: {re.escape(BAD_TIMEOUT_MESSAGE)}", first), first
        assert last == f"{m.mesh.path}: 1 error (mesh file)"

        # The fixed file is applied, and the error goes away.
        fixed = m.mesh.write(basic_mesh(a))
        traffic.wait_settled({"a"}, fixed)
        assert last_start_on(traffic.since(fixed), {"b"}) - fixed < APPLY_WITHIN
        assert "MESH FILE ERROR" not in m.control_plane.status()

    assert traffic.failures() == [], traffic.summary(edited)


def test_sidecar_rides_out_a_control_plane_crash_and_resyncs(
    backends: dict[str, Backend], make_mesh: Callable[..., Mesh], processes: Processes
) -> None:
    a, b = backends["a"].address, backends["b"].address
    m = make_mesh(basic_mesh(a))
    with traffic_through(m.sidecar) as traffic:
        m.control_plane.process.kill()
        killed = time.monotonic()
        assert wait_for(lambda: m.sidecar.config_dump()["xds"]["connected"] is False, 5)
        # Nothing listens on the port now; traffic keeps flowing on the last config.
        traffic.wait_calls(50, killed)
        assert {c.backend for c in traffic.since(killed)} == {"a"}

        restarted = ControlPlane(processes, m.mesh.path, m.control_plane.port)
        restarted.wait_serving()
        assert wait_for(lambda: m.sidecar.config_dump()["xds"]["connected"] is True, 10)
        assert wait_for(lambda: in_sync(restarted.status(check=False), "n1"), 10), (
            restarted.status(check=False)
        )
        assert "stream 1 (sotw): node 'n1' service 'client'" in restarted.log()

        edited = m.mesh.write(basic_mesh(b))
        traffic.wait_settled({"b"}, edited)
        assert last_start_on(traffic.since(edited), {"a"}) - edited < APPLY_WITHIN
        assert wait_for(lambda: in_sync(restarted.status(), "n1"), 5), restarted.status()

    assert traffic.failures() == [], traffic.summary(killed)
    assert "connected to control plane" in m.sidecar.log()


@contextlib.contextmanager
def port_taken() -> Iterator[tuple[socket.socket, str]]:
    """A listening socket the test holds, so nobody else can bind its address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken, f"127.0.0.1:{taken.getsockname()[1]}"


def unbindable_inbound_listener(
    backends: dict[str, Backend], make_mesh: Callable[..., Mesh], inbound: str
) -> tuple[Mesh, float]:
    """A sidecar in sync on ``echo -> a`` that is then sent a listener it cannot bind.

    The sidecar says it fronts "billing"; while the mesh has no such service it sees every
    service and gets no inbound listener. Then billing joins the mesh: its view brings Listener
    ``inbound|billing`` on ``inbound`` (taken).
    """
    a, app = backends["a"].address, backends["app"].address
    m = make_mesh(
        basic_mesh(a), "--app-address", app, "--inbound-address", inbound, service="billing"
    )
    assert m.sidecar.stat("xds.update_rejected") == 0
    edited = m.mesh.write(basic_mesh(a, billing=echo_service(app)))
    assert wait_for(lambda: m.sidecar.stat("xds.update_rejected") > 0, 5), m.sidecar.log()
    return m, edited


def test_a_listener_that_cannot_bind_is_nacked_once_and_the_last_good_config_stays(
    backends: dict[str, Backend], make_mesh: Callable[..., Mesh]
) -> None:
    with port_taken() as (_, inbound):
        m, edited = unbindable_inbound_listener(backends, make_mesh, inbound)
        with traffic_through(m.sidecar) as traffic:
            status = m.control_plane.status()
            nacks = [row.last_nack for row in proxy_status(status, "n1").values()]
            assert any(f"cannot listen on {inbound}" in nack for nack in nacks), status
            assert not in_sync(status, "n1"), status
            last_nack = m.sidecar.config_dump()["xds"]["last_nack"]
            assert any(f"cannot listen on {inbound}" in nack for nack in last_nack.values())

            # No resend loop: the rejected version is not pushed again (a loop would push it
            # every few milliseconds, so a second shows it hundreds of times over).
            rejected = m.sidecar.stat("xds.update_rejected")
            assert rejected <= 2
            time.sleep(1.0)
            assert m.sidecar.stat("xds.update_rejected") == rejected
            assert m.control_plane.log().count("rejected") == rejected, m.control_plane.log()

            # The last good config stays in force: outbound calls work, nothing half-applied.
            calls = traffic.wait_calls(100, edited)
            assert {c.backend for c in calls} == {"a"}, traffic.summary(edited)
            listeners = {x["name"] for x in m.sidecar.config_dump()["bootstrap"]["listeners"]}
            assert "outbound" in listeners and "inbound|billing" not in listeners, listeners
            assert m.sidecar.admin("/ready")[0] == 200
        assert traffic.failures() == [], traffic.summary(edited)


def test_after_the_port_is_freed_the_next_mesh_edit_is_applied_and_in_sync(
    backends: dict[str, Backend], make_mesh: Callable[..., Mesh]
) -> None:
    a, b, app = (backends[name].address for name in ("a", "b", "app"))
    with port_taken() as (taken, inbound):
        m, _ = unbindable_inbound_listener(backends, make_mesh, inbound)
        taken.close()
    with traffic_through(m.sidecar) as traffic:
        # A new version (echo to a and b); the port is free, so everything can be applied now.
        healed = m.mesh.write(basic_mesh(a, b, billing=echo_service(app)))
        assert wait_for(lambda: in_sync(m.control_plane.status(), "n1"), 5), (
            m.control_plane.status()
        )
        traffic.wait_calls(60, healed)
        traffic.wait_settled({"a", "b"}, healed)
        assert {c.backend for c in traffic.since(healed)[-30:]} == {"a", "b"}
        assert m.sidecar.config_dump()["xds"]["last_nack"] == {}
        with grpc.insecure_channel(inbound) as channel:
            assert channel.unary_unary(METHOD)(b"", timeout=5) == b"app"
    assert traffic.failures() == [], traffic.summary(healed)


def test_ready_waits_for_the_first_config_and_config_dump_lists_every_resource(
    backends: dict[str, Backend], processes: Processes, mesh: MeshFile
) -> None:
    a = backends["a"].address
    port = free_port()
    sidecar = Sidecar(processes, f"127.0.0.1:{port}", "n1", "client")
    assert wait_for(lambda: sidecar.admin("/ready")[0] != 0, 15), sidecar.log()
    status, body = sidecar.admin("/ready")
    assert (status, body.strip()) == (503, "PRE_INITIALIZING")
    assert sidecar.config_dump()["dynamic_resources"] == []

    mesh.write(basic_mesh(a, quotes=echo_service(a)))
    control_plane = ControlPlane(processes, mesh.path, port)
    control_plane.wait_serving()
    sidecar.wait_ready()

    names = {"client", "echo", "quotes"}
    expected = {(kind, name) for kind in ("LDS", "RDS", "CDS", "EDS") for name in names}
    # Envoy's outbound passthrough, served to every proxy (no service here has a port, so
    # there are no per-port listeners).
    expected |= {("LDS", "virtualOutbound"), ("CDS", "PassthroughCluster")}
    assert wait_for(lambda: in_sync(control_plane.status(), "n1"), 5)
    dump = sidecar.config_dump()
    resources = dump["dynamic_resources"]
    assert {(r["type"], r["name"]) for r in resources} == expected, resources
    acked = {kind: row.acked for kind, row in proxy_status(control_plane.status(), "n1").items()}
    for resource in resources:
        assert resource["version"] == acked[resource["type"]], (resource, acked)
    assert dump["xds"]["versions"] == acked


def test_inbound_listener_reaches_the_app(
    backends: dict[str, Backend], make_mesh: Callable[..., Mesh]
) -> None:
    app = backends["app"].address
    inbound = f"127.0.0.1:{free_port()}"
    services = basic_mesh(backends["a"].address, billing=echo_service(app))
    m = make_mesh(services, "--app-address", app, "--inbound-address", inbound, service="billing")
    dump = m.sidecar.config_dump()
    assert ("LDS", "inbound|billing") in {(r["type"], r["name"]) for r in dump["dynamic_resources"]}
    # Any authority: the inbound route config takes every domain to the app.
    for authority in ("billing", "anything.example"):
        options = [("grpc.default_authority", authority)]
        with grpc.insecure_channel(inbound, options=options) as channel:
            assert channel.unary_unary(METHOD)(b"", timeout=5) == b"app"
    assert backends["app"].calls == 2
    assert backends["a"].calls == 0


def test_every_kubernetes_name_of_a_service_reaches_it_through_the_per_port_routes(
    backends: dict[str, Backend], make_mesh: Callable[..., Mesh]
) -> None:
    """The control plane serves Envoy's outbound shape (a route configuration per port with
    every name form); our sidecar routes with the same resources."""
    services = basic_mesh(backends["a"].address)
    services["echo"]["port"] = 50051
    m = make_mesh(services)
    held = {(r["type"], r["name"]) for r in m.sidecar.config_dump()["dynamic_resources"]}
    assert {("LDS", "virtualOutbound"), ("LDS", "0.0.0.0_50051"), ("RDS", "50051")} <= held
    names = ("echo", "echo:50051", "echo.default", "echo.default.svc:50051",
             "echo.default.svc.cluster.local", "echo.default.svc.cluster.local:50051")
    for authority in names:
        options = [("grpc.default_authority", authority)]
        with grpc.insecure_channel(m.sidecar.outbound, options=options) as channel:
            assert channel.unary_unary(METHOD)(b"", timeout=5) == b"a", authority
    assert backends["a"].calls == len(names)
    # A name the mesh does not know is still no route.
    options = [("grpc.default_authority", "echo.elsewhere")]
    with (
        grpc.insecure_channel(m.sidecar.outbound, options=options) as channel,
        pytest.raises(grpc.RpcError) as failed,
    ):
        channel.unary_unary(METHOD)(b"", timeout=5)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
