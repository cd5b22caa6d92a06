"""gRPC's own proxyless xDS client resolves ``xds:///echo`` through our control plane.

The client runs in a subprocess (``_xds_client_probe.py``): a process reads the xDS bootstrap
once, so each scenario needs a fresh one.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from control_plane.main import ControlPlane, start_control_plane
from control_plane.xds.callbacks import Callbacks
from control_plane.xds.stream_state import NackReceived

PROBE = Path(__file__).with_name("_xds_client_probe.py")
CALLS = 30
Counts = dict[str, dict[str, int]]


def _handler(name: str) -> grpc.GenericRpcHandler:
    async def who(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return name.encode()

    # No serializers: requests and replies are raw bytes, no generated code needed.
    return grpc.method_handlers_generic_handler(
        "echo.Echo",
        {"Who": grpc.unary_unary_rpc_method_handler(who),
         "Canary": grpc.unary_unary_rpc_method_handler(who)},
    )


async def _backend(name: str) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handler(name),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _mesh(ports: list[int], edited: bool = False) -> str:
    # The edit drops backend c and splits /echo.Echo/Who between echo and echo-canary.
    third = "" if edited else f"\n      - {{address: 127.0.0.1:{ports[2]}, weight: 2}}"
    who_route = "split: {echo: 1, echo-canary: 1}" if edited else "timeout: 3s"
    return f"""
services:
  web:
    endpoints: [127.0.0.1:1]
    depends_on: [echo]
  echo:
    endpoints:
      - 127.0.0.1:{ports[0]}
      - 127.0.0.1:{ports[1]}{third}
    routes:
      - match: {{path: /echo.Echo/Canary}}
        cluster: echo-canary
        timeout: 5s
      - match: {{prefix: /echo.Echo/}}
        {who_route}
  echo-canary:
    endpoints: [127.0.0.1:{ports[3]}]
  unrelated:
    endpoints: [127.0.0.1:2]
"""


class Recorder(Callbacks):
    def __init__(self) -> None:
        self.requests: list[tuple[str, str, tuple[str, ...]]] = []
        self.nacks: list[NackReceived] = []

    def on_request(
        self,
        stream_id: int,
        request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
    ) -> None:
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        self.requests.append((request.node.id, request.type_url, tuple(request.resource_names)))

    def on_nack(self, stream_id: int, node_id: str, nack: NackReceived) -> None:
        self.nacks.append(nack)


def _bootstrap(port: int) -> dict[str, object]:
    return {
        "xds_servers": [{
            "server_uri": f"127.0.0.1:{port}",
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {"id": "probe-1", "metadata": {"service": "web", "namespace": "default"}},
    }


async def _round(process: asyncio.subprocess.Process) -> Counts:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    assert line, "the probe exited early"
    counts: Counts = json.loads(line)
    return counts


async def _tell(process: asyncio.subprocess.Process, command: str) -> None:
    assert process.stdin is not None
    process.stdin.write(f"{command}\n".encode())
    await process.stdin.drain()


async def _finish(
    process: asyncio.subprocess.Process,
    plane: ControlPlane,
    backends: list[tuple[grpc.aio.Server, int]],
) -> None:
    """Kill the probe if it is still running; stop the control plane and the backends."""
    if process.returncode is None:
        process.kill()
        await process.wait()
    await plane.stop(grace=None)
    for server, _ in backends:
        await server.stop(None)


async def _wait_in_sync(plane: ControlPlane, generation: int) -> None:
    """Until every connected proxy acked everything of mesh ``generation`` (bounded)."""
    for _ in range(100):
        proxies = plane.registry.proxies()
        if plane.cache.generation >= generation and proxies and all(
            all(t.in_sync for t in p.protocol.status(plane.cache.snapshot(p.identity.view)))
            for p in proxies if p.identity is not None
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the gRPC client did not ack the edited mesh")


def test_grpc_proxyless_client_routes_balances_and_follows_edits(tmp_path: Path) -> None:
    recorder = Recorder()

    async def scenario() -> list[Counts]:
        backends = [await _backend(name) for name in ("a", "b", "c", "canary")]
        ports = [port for _, port in backends]
        mesh = tmp_path / "mesh.yaml"
        mesh.write_text(_mesh(ports))
        plane = await start_control_plane(mesh, "127.0.0.1", 0, callbacks=recorder,
                                          poll_interval=0.05)
        bootstrap = tmp_path / "bootstrap.json"
        bootstrap.write_text(json.dumps(_bootstrap(plane.port)))
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(PROBE), "echo", str(CALLS), "/echo.Echo/Who", "/echo.Echo/Canary",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "GRPC_XDS_BOOTSTRAP": str(bootstrap)},
        )
        rounds: list[Counts] = []
        try:
            rounds.append(await _round(process))
            mesh.write_text(_mesh(ports, edited=True))
            await _wait_in_sync(plane, generation=2)
            # The client acked; its balancer may still need a moment to swap pickers.
            for _ in range(10):
                await _tell(process, "again")
                rounds.append(await _round(process))
                if "c" not in rounds[-1]["/echo.Echo/Who"]:
                    break
            await _tell(process, "quit")
            _, stderr = await asyncio.wait_for(process.communicate(), 30)
            assert process.returncode == 0, stderr.decode()[-3000:]
        finally:
            await _finish(process, plane, backends)
        return rounds

    rounds = asyncio.run(asyncio.wait_for(scenario(), 50))
    assert recorder.nacks == []  # gRPC accepted every resource we sent
    assert recorder.requests[0][0] == "probe-1"
    asked = {(type_url.rsplit(".", 1)[-1], names) for _, type_url, names in recorder.requests}
    assert ("Listener", ("echo",)) in asked
    assert ("RouteConfiguration", ("echo",)) in asked
    eds_names = {n for t, names in asked if t == "ClusterLoadAssignment" for n in names}
    assert eds_names == {"echo", "echo-canary"}

    first, last = rounds[0], rounds[-1]
    assert set(first["/echo.Echo/Who"]) == {"a", "b", "c"}  # spread over every endpoint
    assert sum(first["/echo.Echo/Who"].values()) == CALLS
    assert first["/echo.Echo/Canary"] == {"canary": CALLS}
    # After the edit: c is gone, and the split sends some calls to the canary.
    assert set(last["/echo.Echo/Who"]) == {"a", "b", "canary"}, last
    assert last["/echo.Echo/Canary"] == {"canary": CALLS}
