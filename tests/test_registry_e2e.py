"""The registry end to end: real sidecars, real grpcio app processes, one caller under load.

A control plane serves ``echo`` with ``discovery: registry``. Three instances (a grpcio app
process and its ``pilotfish sidecar --register`` process each) join once healthy; a caller
calls ``echo`` through its own sidecar (or as a proxyless grpcio client, through xDS) at about
200 calls/s, bounded in count and time. The tests restart every instance in turn, or crash
one, and count the failed calls: every method of taking an instance out must fail none; a
crash may fail the calls in flight on it. No timing is asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from pilotfish.gen.pilotfish.registry.v1 import registry_pb2, registry_pb2_grpc
from pilotfish.registry_client import RegistryClient
from tests.support import free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
METHOD = "/pilotfish.test.Echo/Whoami"
HEARTBEAT = 0.5  # seconds: a lease lasts 1.5 s, the shutdown wait at most 1 s
RATE = 200.0  # calls per second, all callers together
CALLERS = 4


class Process:
    """A child process with its output in a log file, printed when the test ends."""

    def __init__(
        self, name: str, args: list[str], log_dir: Path, command: list[str] | None = None
    ) -> None:
        """``python`` with ``args``, or ``command`` as given."""
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            command or [sys.executable, *args], stdout=self._log, stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@dataclass
class Cluster:
    """The control plane and the caller's sidecar; instances come and go."""

    log_dir: Path
    processes: list[Process] = field(default_factory=list)
    registry_address: str = ""
    caller_outbound: str = ""
    caller_admin: str = ""
    count: int = 0

    def start(self, name: str, args: list[str]) -> Process:
        self.count += 1
        process = Process(f"{self.count:02d}-{name}", args, self.log_dir)
        self.processes.append(process)
        return process

    def boot(self, mesh: Path) -> None:
        port = free_port()
        self.registry_address = f"127.0.0.1:{port}"
        plane = self.start("control-plane", [
            "-m", "pilotfish", "control-plane", "--config", str(mesh), "--port", str(port),
            "--registry-heartbeat-interval", str(HEARTBEAT),
        ])
        assert wait_for(lambda: "control plane serving" in plane.log(), 15), plane.log()
        self.caller_outbound = f"127.0.0.1:{free_port()}"
        self.caller_admin = f"http://127.0.0.1:{free_port()}"
        caller = self.start("caller-sidecar", [
            "-m", "pilotfish", "sidecar", "--xds", self.registry_address, "--node-id", "caller",
            "--service", "caller", "--outbound-address", self.caller_outbound,
            "--admin-address", self.caller_admin.removeprefix("http://"),
        ])
        assert wait_for(lambda: _status(self.caller_admin + "/ready") == 200, 15), caller.log()

    def caller_hosts(self) -> set[str]:
        """The echo endpoints the caller's sidecar holds now."""
        status, text = http_get(self.caller_admin + "/clusters")
        assert status == 200, text
        return {line.split("::")[1] for line in text.splitlines() if line.startswith("echo::")}

    def stop_all(self) -> None:
        for process in self.processes:
            process.signal(signal.SIGTERM)
        for process in self.processes:
            process.stop()
        for process in self.processes:
            print(f"----- {process.name}\n{process.log()}")


def _status(url: str, method: str = "GET") -> int:
    try:
        return http_get(url, method)[0]
    except OSError:
        return 0


class Instance:
    """One grpcio app process and its registering sidecar process."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.name = name
        self.app_port = free_port()
        self.inbound = f"127.0.0.1:{free_port()}"
        self.admin = f"http://127.0.0.1:{free_port()}"
        self.app = cluster.start(f"app-{name}", ["-m", "tests.grpc_app", name,
                                                 str(self.app_port)])
        self.sidecar = cluster.start(f"sidecar-{name}", [
            "-m", "pilotfish", "sidecar", "--xds", cluster.registry_address,
            "--node-id", f"echo-{name}", "--service", "echo",
            "--app-address", f"127.0.0.1:{self.app_port}", "--inbound-address", self.inbound,
            "--outbound-address", f"127.0.0.1:{free_port()}",
            "--admin-address", self.admin.removeprefix("http://"),
            "--register", "--register-label", f"version={name}",
            "--register-health", "grpc", "--register-health-interval", "0.2",
        ])
        self.id = f"echo/{self.inbound}"

    def terminate(self) -> None:
        """SIGTERM to the sidecar; the app stops once its sidecar has drained."""
        self.sidecar.signal(signal.SIGTERM)
        assert self.sidecar.wait(15) == 0, self.sidecar.log()
        self.app.signal(signal.SIGTERM)
        self.app.wait(15)


@dataclass
class Load:
    """``CALLERS`` threads calling echo through the caller's sidecar at ``RATE`` in all."""

    target: str
    max_seconds: float = 60.0
    max_calls: int = 12_000
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return self.ok + len(self.failed)

    def start(self) -> Load:
        for _ in range(CALLERS):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _run(self) -> None:
        interval = CALLERS / RATE
        deadline = time.monotonic() + self.max_seconds
        options = [("grpc.default_authority", "echo")]
        with grpc.insecure_channel(self.target, options=options) as channel:
            whoami = channel.unary_unary(METHOD)
            next_at = time.monotonic()
            while not self._stop.is_set() and self.calls < self.max_calls:
                if time.monotonic() >= deadline:
                    break
                try:
                    reply = whoami(b"", timeout=5, wait_for_ready=False)
                    with self._lock:
                        self.ok += 1
                        name = reply.decode()
                        self.seen[name] = self.seen.get(name, 0) + 1
                except grpc.RpcError as exc:
                    with self._lock:
                        self.failed.append(f"{exc.code().name}: {exc.details()}")
                next_at = max(next_at + interval, time.monotonic() - interval)
                self._stop.wait(max(0.0, next_at - time.monotonic()))

    def wait_for(self, name: str, calls: int = 20, timeout: float = 30.0) -> None:
        """Until ``name`` has answered ``calls`` more calls (a bound, not a timing: a new
        instance's two Python processes may take long to start on a busy machine)."""
        start = self.seen.get(name, 0)
        assert wait_for(lambda: self.seen.get(name, 0) >= start + calls, timeout), self.seen

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
            assert not thread.is_alive()


MESH = {
    "services": {
        "caller": {"discovery": "registry", "depends_on": ["echo"]},
        "echo": {"protocol": "grpc", "discovery": "registry", "depends_on": []},
    }
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    log_dir = tmp_path_factory.mktemp("registry-e2e")
    mesh = log_dir / "mesh.yaml"
    mesh.write_text(yaml.safe_dump(MESH))
    started = Cluster(log_dir)
    try:
        started.boot(mesh)
        yield started
    finally:
        started.stop_all()


@contextlib.contextmanager
def three_instances(cluster: Cluster, tag: str) -> Iterator[list[Instance]]:
    instances = [Instance(cluster, f"{tag}{i}") for i in range(3)]
    try:
        wanted = {i.inbound for i in instances}
        assert wait_for(lambda: cluster.caller_hosts() == wanted, 40), cluster.caller_hosts()
        yield instances
    finally:
        for instance in instances:
            instance.sidecar.signal(signal.SIGKILL)
            instance.app.signal(signal.SIGKILL)


def left(cluster: Cluster, address: str) -> bool:
    return address not in cluster.caller_hosts()


def deregister(cluster: Cluster, instance: Instance) -> registry_pb2.DeregisterResponse:
    with grpc.insecure_channel(cluster.registry_address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        request = registry_pb2.DeregisterRequest(id=instance.id)
        request.await_proxies.FromMilliseconds(int(2 * HEARTBEAT * 1000))
        reply: registry_pb2.DeregisterResponse = stub.Deregister(request, timeout=10)
        return reply


def rolling_restart(cluster: Cluster, method: str) -> Load:
    with three_instances(cluster, method[:2]) as instances:
        load = Load(cluster.caller_outbound).start()
        try:
            for instance in instances:
                load.wait_for(instance.name)
            for index, old in enumerate(list(instances)):
                if method == "healthcheck-fail":
                    assert _status(old.admin + "/healthcheck/fail", "POST") == 200
                    assert wait_for(partial(left, cluster, old.inbound), 5)
                elif method == "deregister":
                    reply = deregister(cluster, old)
                    assert reply.found and list(reply.acked) == ["caller"], reply
                    assert old.inbound not in cluster.caller_hosts()
                old.terminate()
                new = Instance(cluster, f"{old.name}-new")
                instances[index] = new
                load.wait_for(new.name)
        finally:
            load.stop()
    return load


@pytest.mark.parametrize("method", ["sigterm", "healthcheck-fail", "deregister"])
def test_rolling_restart_fails_no_call(cluster: Cluster, method: str) -> None:
    load = rolling_restart(cluster, method)
    print(f"rolling restart through {method}: {load.calls} calls, {len(load.failed)} failed")
    assert load.calls >= 300
    assert load.failed == []


def test_an_app_killed_behind_its_sidecar_fails_only_the_calls_in_flight(
    cluster: Cluster,
) -> None:
    with three_instances(cluster, "kill") as instances:
        load = Load(cluster.caller_outbound).start()
        try:
            for instance in instances:
                load.wait_for(instance.name)
            victim = instances[0]
            victim.app.signal(signal.SIGKILL)
            victim.app.wait(5)
            # The sidecar's health check pulls the endpoint; meanwhile its local replies (UF)
            # are retried on another host by the caller's sidecar.
            assert wait_for(partial(left, cluster, victim.inbound), 5)
            calls_after = load.calls
            assert wait_for(lambda: load.calls >= calls_after + 200, 10)
        finally:
            load.stop()
    print(f"app killed behind a live sidecar: {load.calls} calls, {len(load.failed)} failed")
    # At most the calls in flight on the app when it died: one per caller thread.
    assert len(load.failed) <= CALLERS, load.failed


def test_a_sidecar_killed_fails_only_the_calls_in_flight_and_is_evicted(cluster: Cluster) -> None:
    with three_instances(cluster, "crash") as instances:
        load = Load(cluster.caller_outbound).start()
        try:
            for instance in instances:
                load.wait_for(instance.name)
            victim = instances[0]
            victim.sidecar.signal(signal.SIGKILL)
            victim.sidecar.wait(5)
            # Until the lease runs out (1.5 s) the caller still holds the endpoint: its connect
            # failures are retried on another host, free of the retry budget.
            assert wait_for(partial(left, cluster, victim.inbound), 5)
            calls_after = load.calls
            assert wait_for(lambda: load.calls >= calls_after + 100, 10)
        finally:
            load.stop()
    print(f"sidecar killed: {load.calls} calls, {len(load.failed)} failed")
    assert len(load.failed) <= CALLERS, load.failed


def test_an_app_without_a_sidecar_registers_and_is_discovered(cluster: Cluster) -> None:
    app_port = free_port()
    app = cluster.start("app-bare", ["-m", "tests.grpc_app", "bare", str(app_port)])
    assert wait_for(lambda: "serving" in app.log(), 15), app.log()
    client = RegistryClient(cluster.registry_address)
    # Instances killed by earlier tests are evicted when their leases run out.
    assert wait_for(lambda: client.instances("echo") == [], 5), client.instances("echo")
    watch = client.watch("echo")
    try:
        assert next(watch) == []
        with client.register("echo", "127.0.0.1", app_port, labels={"version": "bare"}) as reg:
            [seen] = next(watch)
            assert (seen.address, seen.labels, seen.draining) == (
                f"127.0.0.1:{app_port}", {"version": "bare"}, False,
            )
            assert client.instances("echo") == [seen]
            load = Load(cluster.caller_outbound, max_calls=200).start()
            try:
                load.wait_for("bare", 50)
            finally:
                load.stop()
            assert load.failed == []
            # Draining the only instance leaves callers none: the load has stopped first.
            reg.set_draining(True)
            assert next(watch)[0].draining
            assert wait_for(partial(left, cluster, seen.address), 5)
            reply = reg.deregister()
            assert list(reply.acked) == ["caller"] and not reply.pending
        assert next(watch) == []
        with pytest.raises(grpc.RpcError) as info:
            client.register("echo", "localhost", 1)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            "instance.address: expected an IP address, got 'localhost'"
        )
    finally:
        watch.close()
        client.close()
        app.signal(signal.SIGTERM)


class ProxylessCaller:
    """``tests.xds_load_client`` in a process of its own (grpcio reads its xDS bootstrap once)."""

    def __init__(self, cluster: Cluster) -> None:
        bootstrap = cluster.log_dir / "grpc-xds-bootstrap.json"
        bootstrap.write_text(json.dumps({
            "xds_servers": [{
                "server_uri": cluster.registry_address,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }],
            "node": {"id": "proxyless-caller", "metadata": {"service": "caller"}},
        }))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.xds_load_client", "echo", str(RATE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env=dict(os.environ, GRPC_XDS_BOOTSTRAP=str(bootstrap)),
        )
        self.seen: set[str] = set()
        self.result: dict[str, Any] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("seen "):
                self.seen.add(line.removeprefix("seen ").strip())
            elif line.startswith("{"):
                self.result = json.loads(line)

    def saw(self, name: str) -> bool:
        return name in self.seen

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("stop\n")
            self.proc.stdin.close()
        self.proc.wait(20)
        self._reader.join(5)
        return self.result


def test_rolling_restart_through_a_proxyless_grpc_client_fails_no_call(cluster: Cluster) -> None:
    with three_instances(cluster, "px") as instances:
        caller = ProxylessCaller(cluster)
        try:
            for instance in instances:
                assert wait_for(partial(caller.saw, instance.name), 30), caller.seen
            for index, old in enumerate(list(instances)):
                old.terminate()
                new = Instance(cluster, f"{old.name}-new")
                instances[index] = new
                assert wait_for(partial(caller.saw, new.name), 30), caller.seen
        finally:
            result = caller.stop()
    print(f"rolling restart through a proxyless client: {result['calls']} calls, "
          f"{len(result['failed'])} failed")
    assert result["calls"] >= 300
    assert result["failed"] == []
