"""The registry's gRPC edge on a real control plane: Deregister waits for the proxies' ACKs.

Two raw ADS streams subscribe to the endpoints of ``echo``; one acknowledges what it gets,
the other never does. Deregister with ``await_proxies`` answers which is which, and returns
once the wait is over (the silent one holds it to its cap, and is reported as pending).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.xds.types import ENDPOINT
from pilotfish.gen.pilotfish.registry.v1 import registry_pb2, registry_pb2_grpc
from tests.control_plane.helpers import node
from tests.control_plane.test_server import Client, control_plane, run

MESH = """
services:
  echo: {discovery: registry}
  caller: {discovery: registry, depends_on: [echo]}
  loner: {discovery: registry, depends_on: []}
"""


def _eds(
    node_id: str, service: str, version: str = "", nonce: str = ""
) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(
        type_url=ENDPOINT, resource_names=["echo"], version_info=version, response_nonce=nonce,
        node=node(node_id, service=service),
    )


def _instance(port: int) -> registry_pb2.Instance:
    return registry_pb2.Instance(service="echo", address="127.0.0.1", port=port)


def test_deregister_waits_for_the_proxies_that_could_call_and_names_the_late(
    tmp_path: Path,
) -> None:
    async def test() -> None:
        async with control_plane(tmp_path, MESH) as plane, grpc.aio.insecure_channel(
            f"127.0.0.1:{plane.port}"
        ) as channel:
            ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            registry = registry_pb2_grpc.RegistryStub(channel)
            prompt = Client(ads.StreamAggregatedResources())
            silent = Client(ads.StreamAggregatedResources())
            # A proxy whose view has no echo (loner depends on nothing) is never waited for.
            other = Client(ads.StreamAggregatedResources())
            await other.send(discovery_pb2.DiscoveryRequest(
                type_url=ENDPOINT, resource_names=[], node=node("loner-1", service="loner")))
            for client, name in ((prompt, "caller-1"), (silent, "caller-2")):
                await client.send(_eds(name, "caller"))
                first = await client.next()
                await client.send(_eds(name, "caller", first.version_info, first.nonce))
            reply = await registry.Register(registry_pb2.RegisterRequest(instance=_instance(7001)))
            assert reply.id == "echo/127.0.0.1:7001"
            assert reply.ttl.ToMilliseconds() == 3 * reply.heartbeat_interval.ToMilliseconds()
            for client in (prompt, silent):
                await client.next()  # the instance arrives; neither acks it (yet)

            async def ack_what_comes() -> None:
                response = await prompt.next()
                await prompt.send(
                    _eds("caller-1", "caller", response.version_info, response.nonce)
                )

            acking = asyncio.create_task(ack_what_comes())
            request = registry_pb2.DeregisterRequest(id="echo/127.0.0.1:7001")
            request.await_proxies.FromMilliseconds(500)
            answer = await registry.Deregister(request, timeout=5)
            await acking
            assert answer.found
            assert list(answer.acked) == ["caller-1"]
            assert list(answer.pending) == ["caller-2"]

            gone = await registry.Deregister(request, timeout=5)
            assert not gone.found
            # A heartbeat after the deregistration: the instance must not come back by itself.
            try:
                await registry.Heartbeat(registry_pb2.HeartbeatRequest(id="echo/127.0.0.1:7001"))
                raise AssertionError("the heartbeat was accepted")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION
            try:
                await registry.Heartbeat(registry_pb2.HeartbeatRequest(id="echo/127.0.0.1:7002"))
                raise AssertionError("the heartbeat was accepted")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.NOT_FOUND
            for client in (prompt, silent, other):
                await client.close()

    run(test)
