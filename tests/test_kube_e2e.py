"""Pods discovered from a Kubernetes API server, end to end.

A fake API server on loopback (tests/kube_fake.py) speaks list/watch; the control plane runs
as ``pilotfish control-plane --kubernetes`` pointed at it through a kubeconfig; a real
sidecar process gets the pods over xDS; a real grpcio client calls the Service through the
sidecar by its Kubernetes name. The three "pods" are grpcio servers on 127.0.0.2-4, all on
one target port, as pods of one Deployment are.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kube_fake import SERVICES, SLICES, FakeKubeApi, endpoint, endpoint_slice, service
from tests.support import free_port, http_get, wait_for
from tests.test_xds_e2e import METHOD, SERVICE, Processes, Sidecar, Traffic

AUTHORITY = "quotes.default.svc.cluster.local:7001"
PODS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


class Pod:
    """A grpcio server answering every call with its address."""

    def __init__(self, address: str, port: int) -> None:
        from concurrent import futures

        self.address = address
        self.calls = 0
        self._lock = threading.Lock()

        def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
            with self._lock:
                self.calls += 1
            return address.encode()

        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Whoami": grpc.unary_unary_rpc_method_handler(whoami)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        assert self.server.add_insecure_port(f"{address}:{port}") == port
        self.server.start()

    def stop(self, grace: float = 2.0) -> None:
        self.server.stop(grace).wait(5)


class Mesh:
    def __init__(self, fake: FakeKubeApi, sidecar: Sidecar, port: int, metrics_url: str) -> None:
        self.fake = fake
        self.sidecar = sidecar
        self.port = port
        self.metrics_url = metrics_url

    def watch_metric(self, what: str) -> float:
        """The control plane's ``pilotfish_kubernetes_watch_total{what=...}``."""
        status, text = http_get(self.metrics_url)
        assert status == 200, text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("pilotfish_kubernetes_watch") and (
                    sample.labels.get("what") == what
                ):
                    return float(sample.value)
        raise AssertionError(f"no watch metric {what!r} in\n{text}")

    def set_pods(self, *endpoints: dict[str, object]) -> None:
        self.fake.put(
            SLICES, endpoint_slice("quotes-abc", "default", "quotes", self.port, list(endpoints))
        )


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.stop_all()


@pytest.fixture
def mesh(tmp_path: Path, processes: Processes) -> Iterator[Mesh]:
    port = free_port()
    pods = [Pod(address, port) for address in PODS]
    fake = FakeKubeApi(version_base=500).start()
    fake.put(SERVICES, service("quotes", "default", 7001, cluster_ip="10.96.0.20"))
    fake.put(
        SLICES,
        endpoint_slice(
            "quotes-abc",
            "default",
            "quotes",
            port,
            [endpoint(a, node=f"node-{i}") for i, a in enumerate(PODS)],
        ),
    )
    mesh_file = tmp_path / "mesh.yaml"
    mesh_file.write_text("services: {}\n")
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    xds_port = free_port()
    metrics_address = f"127.0.0.1:{free_port()}"
    control = processes.start(
        "control-plane",
        [
            "control-plane",
            "--config",
            str(mesh_file),
            "--port",
            str(xds_port),
            "--kubernetes",
            "--kubeconfig",
            str(kubeconfig),
            "--metrics-address",
            metrics_address,
        ],
    )
    assert wait_for(lambda: "listed 1 EndpointSlice" in control.log(), 20), control.log()
    sidecar = Sidecar(processes, f"127.0.0.1:{xds_port}", "client-1", "client")
    sidecar.wait_ready()
    try:
        yield Mesh(fake, sidecar, port, f"http://{metrics_address}/metrics")
    finally:
        fake.stop()
        for pod in pods:
            pod.stop(0)


def _calls(target: str, authority: str, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    with grpc.insecure_channel(target, options=[("grpc.default_authority", authority)]) as ch:
        whoami = ch.unary_unary(METHOD)
        for _ in range(n):
            seen[whoami(b"", timeout=5).decode()] += 1
    return seen


def test_calls_spread_over_the_pods_per_request_on_one_connection(mesh: Mesh) -> None:
    target = mesh.sidecar.outbound
    assert wait_for(lambda: len(_calls(target, AUTHORITY, 30)) == 3, 10)
    seen = _calls(target, AUTHORITY, 300)  # one channel: one HTTP/2 connection
    assert set(seen) == set(PODS)
    assert min(seen.values()) >= 60, seen
    # Every name Kubernetes gives the Service routes to it, and its ClusterIP with its port.
    for name in (
        "quotes",
        "quotes.default",
        "quotes.default.svc",
        "quotes.default.svc.cluster.local",
    ):
        for authority in (name, f"{name}:7001"):
            assert sum(_calls(target, authority, 3).values()) == 3, authority
    assert sum(_calls(target, "10.96.0.20:7001", 3).values()) == 3


def test_a_pod_terminating_then_removed_with_no_failed_call(mesh: Mesh) -> None:
    target = mesh.sidecar.outbound
    assert wait_for(lambda: len(_calls(target, AUTHORITY, 30)) == 3, 10)
    # About 200 calls a second, bounded in count and time.
    traffic = Traffic(target, AUTHORITY, interval=0.005, max_calls=4000, max_seconds=40).start()
    try:
        start = traffic.calls[-1].started if traffic.calls else 0.0
        traffic.wait_calls(100, start)
        # 127.0.0.4 is terminating but still serving: it drains, new calls go elsewhere.
        mesh.set_pods(
            endpoint(PODS[0]),
            endpoint(PODS[1]),
            endpoint(PODS[2], ready=False, serving=True, terminating=True),
        )
        traffic.wait_settled({PODS[0], PODS[1]}, start, n=100)
        # 127.0.0.3 is removed from the slice.
        mesh.set_pods(
            endpoint(PODS[0]),
            endpoint(PODS[2], ready=False, serving=True, terminating=True),
        )
        traffic.wait_settled({PODS[0]}, start, n=100)
        # Back to three: the new pods get calls again.
        mesh.set_pods(*(endpoint(a) for a in PODS))
        traffic.wait_settled(set(PODS), start, n=30)
        assert wait_for(lambda: {c.backend for c in traffic.last(60)} == set(PODS), 10), (
            traffic.summary(start)
        )
    finally:
        traffic.stop()
    assert traffic.failures() == []
    assert len(traffic.calls) >= 300


def test_watch_dropped_and_server_restarted_loses_nothing(mesh: Mesh) -> None:
    target = mesh.sidecar.outbound
    assert wait_for(lambda: len(_calls(target, AUTHORITY, 30)) == 3, 10)
    traffic = Traffic(target, AUTHORITY, interval=0.005, max_calls=4000, max_seconds=40).start()
    try:
        start = 0.0
        traffic.wait_calls(50, start)
        assert mesh.fake.drop_watches() >= 2
        # Changed while the watch reconnects: the resumed watch delivers it.
        mesh.set_pods(endpoint(PODS[0]), endpoint(PODS[1]))
        traffic.wait_settled({PODS[0], PODS[1]}, start, n=60)
        # The API server comes back from a restore: new versions, no history (410, relist).
        gone = mesh.watch_metric("gone")
        mesh.fake.restart(version_base=70_000)
        mesh.set_pods(endpoint(PODS[1]), endpoint(PODS[2]))
        traffic.wait_settled({PODS[1], PODS[2]}, start, n=60)
    finally:
        traffic.stop()
    assert traffic.failures() == []
    # Both watches found their version unknown to the restarted server and listed again.
    assert mesh.watch_metric("gone") >= gone + 2
    assert mesh.watch_metric("list") >= 4
