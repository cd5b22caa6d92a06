"""Two control planes on one etcd serve one registry; either may die and come back.

A real etcd (Debian's ``etcd-server``, which ``.ci/run`` installs) on loopback ports of its
own, two ``pilotfish control-plane --registry-store etcd://...`` processes, and apps that
register through ``pilotfish.registry_client``.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from pilotfish.registry_client import RegistryClient
from tests.support import free_port, wait_for
from tests.test_registry_e2e import Process

HEARTBEAT = 2.0  # a lease of 6 s: longer than a control plane takes to restart


class Etcd:
    def __init__(self, log_dir: Path) -> None:
        binary = shutil.which("etcd")
        assert binary is not None, "etcd is not installed (apt-get install etcd-server)"
        client, peer = free_port(), free_port()
        self.url = f"etcd://127.0.0.1:{client}"
        self.process = Process("etcd", [], log_dir, command=[
            binary, "--name", "test", "--data-dir", str(log_dir / "etcd-data"),
            "--listen-client-urls", f"http://127.0.0.1:{client}",
            "--advertise-client-urls", f"http://127.0.0.1:{client}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"test=http://127.0.0.1:{peer}",
        ])
        assert wait_for(lambda: "ready to serve client requests" in self.process.log(), 15), (
            self.process.log()
        )


class Plane:
    def __init__(self, name: str, mesh: Path, store: str, log_dir: Path, port: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self.process = Process(name, [
            "-m", "pilotfish", "control-plane", "--config", str(mesh), "--port", str(port),
            "--registry-heartbeat-interval", str(HEARTBEAT), "--registry-store", store,
        ], log_dir)
        assert wait_for(lambda: "control plane serving" in self.process.log(), 15), (
            self.process.log()
        )


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def addresses(client: RegistryClient) -> dict[str, bool] | None:
    """Registered echo instances: address → draining; None while the plane is unreachable
    (a channel that failed to connect waits out its reconnect backoff)."""
    try:
        return {i.address: i.draining for i in client.instances("echo")}
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            return None
        raise


def test_two_control_planes_share_the_registry_and_a_restart_loses_nothing(
    log_dir: Path,
) -> None:
    mesh = log_dir / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"services": {"echo": {"discovery": "registry"}}}))
    processes: list[Process] = []
    clients: list[RegistryClient] = []
    try:
        etcd = Etcd(log_dir)
        processes.append(etcd.process)
        port_a = free_port()
        a = Plane("plane-a", mesh, etcd.url, log_dir, port_a)
        processes.append(a.process)
        b = Plane("plane-b", mesh, etcd.url, log_dir, free_port())
        processes.append(b.process)
        via_a, via_b = RegistryClient(a.address), RegistryClient(b.address)
        clients += [via_a, via_b]

        x = via_a.register("echo", "127.0.0.1", 7001)
        assert wait_for(lambda: addresses(via_b) == {"127.0.0.1:7001": False}, 5)

        a.process.signal(signal.SIGKILL)
        a.process.wait(5)
        y = via_b.register("echo", "127.0.0.1", 7002)  # while the other one is down

        a = Plane("plane-a-again", mesh, etcd.url, log_dir, port_a)
        processes.append(a.process)
        both = {"127.0.0.1:7001": False, "127.0.0.1:7002": False}
        # Read back from etcd at start.
        assert wait_for(lambda: addresses(via_a) == both, 10), addresses(via_a)
        # x's heartbeats reach the new plane and renew x's etcd lease: a state change made
        # through it shows on the other plane.
        x.set_draining(True)
        assert wait_for(lambda: (addresses(via_b) or {}).get("127.0.0.1:7001") is True, 5)
        # A deregistration through one plane takes the instance out of both.
        reply = y.deregister(await_proxies=0)
        assert reply.found
        assert wait_for(lambda: addresses(via_a) == {"127.0.0.1:7001": True}, 5)
        assert addresses(via_b) == {"127.0.0.1:7001": True}
        x.deregister(await_proxies=0)
        assert wait_for(lambda: addresses(via_a) == {} and addresses(via_b) == {}, 5)
    finally:
        for client in clients:
            client.close()
        for process in reversed(processes):
            process.stop()
        for process in processes:
            print(f"----- {process.name}\n{process.log()}")
