"""A real control plane on 127.0.0.1 (port 0) and real grpcio ADS streams against it."""

from __future__ import annotations

import asyncio
import io
import os
from argparse import Namespace
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from control_plane.main import ControlPlane, start_control_plane
from control_plane.status_cli import run_status
from control_plane.xds.callbacks import Callbacks
from control_plane.xds.stream_state import NackReceived
from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from pilotfish.gen.pilotfish.status.v1 import status_pb2, status_pb2_grpc
from tests.control_plane.helpers import MESH_YAML, delta, node, sotw

T = TypeVar("T")
WAIT = 5.0  # upper bound for anything that should happen; tests normally take milliseconds
QUIET = 0.6  # how long "nothing is sent" is watched for


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(test(), 30))


@asynccontextmanager
async def control_plane(
    tmp_path: Path,
    text: str = MESH_YAML,
    callbacks: Callbacks | None = None,
    unknown_nodes: str = "serve",
) -> AsyncIterator[ControlPlane]:
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    plane = await start_control_plane(path, "127.0.0.1", 0, callbacks=callbacks,
                                      poll_interval=0.05, unknown_nodes=unknown_nodes)
    try:
        yield plane
    finally:
        await plane.stop(grace=None)


def edit(tmp_path: Path, text: str) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


class Client:
    """An ADS stream whose responses are read into a queue, so "nothing arrives" is testable."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.received: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            await self.received.put(response)

    async def send(self, request: Any) -> Any:
        await self.call.write(request)

    async def next(self) -> Any:
        return await asyncio.wait_for(self.received.get(), WAIT)

    async def assert_quiet(self) -> None:
        await asyncio.sleep(QUIET)
        assert self.received.empty(), self.received.get_nowait()

    async def close(self) -> None:
        await self.call.done_writing()
        self.call.cancel()
        self._reader.cancel()


def _with_node(request: T, **metadata: str) -> T:
    request.node.CopyFrom(node("proxy-1", **metadata))  # type: ignore[attr-defined]
    return request


async def _status(channel: grpc.aio.Channel) -> Any:
    stub = status_pb2_grpc.ControlPlaneStatusStub(channel)
    return await stub.ListProxies(status_pb2.ListProxiesRequest(), timeout=WAIT)


def _endpoint_ports(response: Any) -> list[int]:
    cla = endpoint_pb2.ClusterLoadAssignment()
    response.resources[0].Unpack(cla)
    return [e.endpoint.address.socket_address.port_value for e in cla.endpoints[0].lb_endpoints]


def test_sotw_subscribe_ack_nack_and_push(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with control_plane(tmp_path) as plane, grpc.aio.insecure_channel(
            f"127.0.0.1:{plane.port}"
        ) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            client = Client(stub.StreamAggregatedResources())
            await client.send(_with_node(sotw(LISTENER, ["greeter"]), service="quotes"))
            lds = await client.next()
            listener = listener_pb2.Listener()
            lds.resources[0].Unpack(listener)
            assert listener.name == "greeter" and listener.HasField("api_listener")
            await client.send(sotw(LISTENER, ["greeter"], lds.version_info, lds.nonce))
            await client.send(sotw(ROUTE, ["greeter"]))
            rds = await client.next()
            assert rds.type_url == ROUTE and len(rds.resources) == 1
            await client.send(sotw(ROUTE, ["greeter"], rds.version_info, rds.nonce))
            await client.send(sotw(ENDPOINT, ["quotes"]))
            eds = await client.next()
            assert _endpoint_ports(eds) == [50071]
            await client.send(sotw(ENDPOINT, ["quotes"], eds.version_info, eds.nonce))
            await client.assert_quiet()

            edit(tmp_path, MESH_YAML.replace("50071", "50072"))
            pushed = await client.next()
            assert pushed.type_url == ENDPOINT and _endpoint_ports(pushed) == [50072]
            await client.send(
                sotw(ENDPOINT, ["quotes"], eds.version_info, pushed.nonce, error="port says no")
            )
            await client.assert_quiet()  # the rejected version is not sent again

            reply = await _status(channel)
            [proxy] = reply.proxies
            assert (proxy.node_id, proxy.service, proxy.stream_kind) == ("proxy-1", "quotes",
                                                                         "sotw")
            by_type = {t.type_url: t for t in proxy.resources}
            assert by_type[ENDPOINT].last_nack_message == "port says no"
            assert by_type[ENDPOINT].last_nack_version == pushed.version_info
            assert by_type[ENDPOINT].acked_version == eds.version_info
            assert not by_type[ENDPOINT].in_sync and by_type[LISTENER].in_sync

            out = io.StringIO()
            code = await asyncio.to_thread(
                run_status, Namespace(address=f"127.0.0.1:{plane.port}"), out
            )
            assert code == 0
            assert "proxy-1" in out.getvalue() and "port says no" in out.getvalue()

            edit(tmp_path, MESH_YAML.replace("50071", "50073"))
            newer = await client.next()
            assert _endpoint_ports(newer) == [50073]

            # A bad edit is rejected; the last good mesh keeps being served.
            edit(tmp_path, MESH_YAML.replace("timeout: 2s", "timeout: 2 seconds"))
            await client.assert_quiet()
            reply = await _status(channel)
            assert reply.mesh_error.endswith(
                "services.greeter.routes[0].timeout: expected a duration like 250ms"
            )
            await client.close()

    run(scenario)


def test_delta_subscribe_ack_nack_and_push(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with control_plane(tmp_path) as plane, grpc.aio.insecure_channel(
            f"127.0.0.1:{plane.port}"
        ) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            client = Client(stub.DeltaAggregatedResources())
            await client.send(_with_node(delta(CLUSTER), service="greeter"))
            cds = await client.next()
            # greeter depends on quotes only: its view holds just that service (and Envoy's
            # outbound passthrough).
            assert [r.name for r in cds.resources] == ["PassthroughCluster", "quotes"]
            await client.send(delta(CLUSTER, nonce=cds.nonce))
            await client.send(delta(ENDPOINT, ["quotes"]))
            eds = await client.next()
            await client.send(delta(ENDPOINT, nonce=eds.nonce))
            await client.assert_quiet()

            edit(tmp_path, MESH_YAML.replace("50071", "50072"))
            pushed = await client.next()
            assert [r.name for r in pushed.resources] == ["quotes"]
            await client.send(delta(ENDPOINT, nonce=pushed.nonce, error="nope"))
            await client.assert_quiet()
            [proxy] = (await _status(channel)).proxies
            assert proxy.stream_kind == "delta" and not proxy.in_sync

            edit(tmp_path, MESH_YAML.replace("50071", "50073"))
            newer = await client.next()
            await client.send(delta(ENDPOINT, nonce=newer.nonce))
            await client.send(delta(ENDPOINT, unsubscribe=["quotes"]))
            await client.assert_quiet()
            [proxy] = (await _status(channel)).proxies
            assert proxy.in_sync
            await client.close()

    run(scenario)


def test_first_request_without_node_is_rejected(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with control_plane(tmp_path) as plane, grpc.aio.insecure_channel(
            f"127.0.0.1:{plane.port}"
        ) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources()
            await call.write(discovery_pb2.DiscoveryRequest(type_url=LISTENER))
            assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT

    run(scenario)


def test_unknown_nodes_are_refused_or_served_the_whole_mesh_as_configured(
    tmp_path: Path,
) -> None:
    async def clusters_for(policy: str, **metadata: str) -> grpc.StatusCode | list[str]:
        async with control_plane(tmp_path, unknown_nodes=policy) as plane, (
            grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}")
        ) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources()
            await call.write(_with_node(sotw(CLUSTER), **metadata))
            try:
                response = await asyncio.wait_for(call.read(), WAIT)
            except grpc.aio.AioRpcError:
                return await call.code()
            call.cancel()
            names = []
            for resource in response.resources:
                cluster = cluster_pb2.Cluster()
                resource.Unpack(cluster)
                names.append(cluster.name)
            return sorted(names)

    async def scenario() -> None:
        everything = await clusters_for("serve", service="stranger")
        own_view = await clusters_for("reject", service="greeter")
        assert isinstance(everything, list) and isinstance(own_view, list)
        assert set(own_view) < set(everything)  # greeter sees what it depends on, no more
        for metadata in ({"service": "stranger"}, {}, {"service": "greeter", "namespace": "x"}):
            assert await clusters_for("reject", **metadata) == grpc.StatusCode.PERMISSION_DENIED

    run(scenario)


def test_health_and_reflection(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with control_plane(tmp_path) as plane, grpc.aio.insecure_channel(
            f"127.0.0.1:{plane.port}"
        ) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            services: list[str] = []
            async for response in stub.ServerReflectionInfo(iter([request]), timeout=WAIT):
                services += [s.name for s in response.list_services_response.service]
            assert "envoy.service.discovery.v3.AggregatedDiscoveryService" in services
            assert "pilotfish.status.v1.ControlPlaneStatus" in services
            assert "grpc.health.v1.Health" in services

    run(scenario)


class Events(Callbacks):
    def __init__(self) -> None:
        self.events: list[tuple[object, ...]] = []
        self.closed = asyncio.Event()

    def on_stream_open(self, stream_id: int, kind: str) -> None:
        self.events.append(("open", stream_id, kind))

    def on_request(self, stream_id: int, request: Any) -> None:
        self.events.append(("request", stream_id, request.type_url))

    def on_nack(self, stream_id: int, node_id: str, nack: NackReceived) -> None:
        self.events.append(("nack", stream_id, node_id, nack.message))

    def on_stream_close(self, stream_id: int, node_id: str) -> None:
        self.events.append(("close", stream_id, node_id))
        self.closed.set()


def test_callbacks_see_open_request_nack_close(tmp_path: Path) -> None:
    events = Events()

    async def scenario() -> None:
        async with control_plane(tmp_path, callbacks=events) as plane, grpc.aio.insecure_channel(
            f"127.0.0.1:{plane.port}"
        ) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            client = Client(stub.StreamAggregatedResources())
            await client.send(_with_node(sotw(CLUSTER)))
            cds = await client.next()
            await client.send(sotw(CLUSTER, [], "", cds.nonce, error="bad cluster"))
            await client.assert_quiet()
            await client.close()
            await asyncio.wait_for(events.closed.wait(), WAIT)

    run(scenario)
    assert events.events == [
        ("open", 1, "sotw"),
        ("request", 1, CLUSTER),
        ("request", 1, CLUSTER),
        ("nack", 1, "proxy-1", "bad cluster"),
        ("close", 1, "proxy-1"),
    ]
