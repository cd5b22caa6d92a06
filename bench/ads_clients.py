"""Simulated sidecars for ``bench.control_plane_scale``: many state-of-the-world ADS clients in
one process, each on its own connection, subscribing the way a sidecar does.

``python -m bench.ads_clients --port P NODE=SERVICE ...`` prints JSON lines on stdout:
``{"event": "ready"}`` once imported, then, after ``go`` on stdin, one ``complete`` event each
time a proxy comes to hold a complete, ACKed config that differs from the last one it reported
(so a mesh edit that reaches it yields a new one). ``stop`` or EOF on stdin ends the process and
prints a final ``exit`` event with this process's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, struct_pb2

from control_plane.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE

# A sidecar has no 4 MiB receive limit; an all-services LDS/CDS response can get close to it.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_NAME_FIELD = {ROUTE: "name", ENDPOINT: "cluster_name"}


class _Parsed:
    """What a client needs from a resource, parsed once per distinct encoding in this process.

    Every proxy of the same view receives the same bytes, so the cache keeps the client side
    cheap: the benchmark measures the control plane, not protobuf decoding in the clients.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, bytes], tuple[str, str | None]] = {}

    def name_and_ref(self, type_url: str, packed: any_pb2.Any) -> tuple[str, str | None]:
        """The resource's name and the RDS route (listener) or EDS name (cluster) it needs."""
        key = (type_url, packed.value)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = _decode(type_url, packed)
        return found


def _decode(type_url: str, packed: any_pb2.Any) -> tuple[str, str | None]:
    if type_url == LISTENER:
        listener = listener_pb2.Listener()
        packed.Unpack(listener)
        hcm = hcm_pb2.HttpConnectionManager()
        if listener.HasField("api_listener") and listener.api_listener.api_listener.Unpack(hcm):
            return listener.name, hcm.rds.route_config_name if hcm.HasField("rds") else None
        return listener.name, None
    if type_url == CLUSTER:
        cluster = cluster_pb2.Cluster()
        packed.Unpack(cluster)
        if cluster.type == cluster_pb2.Cluster.EDS:
            return cluster.name, cluster.eds_cluster_config.service_name or cluster.name
        return cluster.name, None
    # RDS and EDS: only the name is needed; the field holding it differs.
    message: Any = (
        route_pb2.RouteConfiguration()
        if type_url == ROUTE
        else endpoint_pb2.ClusterLoadAssignment()
    )
    packed.Unpack(message)
    return str(getattr(message, _NAME_FIELD[type_url])), None


@dataclass(slots=True)
class _TypeState:
    # None: wildcard (LDS, CDS); otherwise the names subscribed to.
    names: tuple[str, ...] | None
    version: str = ""
    nonce: str = ""
    received: frozenset[str] = frozenset()


@dataclass(slots=True)
class SidecarSubscriptions:
    """The xDS side of one sidecar, sans-IO: responses in, requests to send out.

    Wildcard LDS and CDS; RDS for the route names its listeners reference and EDS for its EDS
    clusters; every response ACKed with the subscription as it stands after that response.
    """

    node: base_pb2.Node
    parsed: _Parsed
    types: dict[str, _TypeState] = field(default_factory=dict)
    bytes_received: int = 0

    def initial_requests(self) -> list[discovery_pb2.DiscoveryRequest]:
        self.types = {LISTENER: _TypeState(None), CLUSTER: _TypeState(None)}
        return [self._request(LISTENER), self._request(CLUSTER)]

    def on_response(
        self, response: discovery_pb2.DiscoveryResponse
    ) -> list[discovery_pb2.DiscoveryRequest]:
        self.bytes_received += response.ByteSize()
        type_url = response.type_url
        state = self.types[type_url]
        parsed = [self.parsed.name_and_ref(type_url, r) for r in response.resources]
        state.version, state.nonce = response.version_info, response.nonce
        state.received = frozenset(name for name, _ in parsed)
        requests = [self._request(type_url)]  # the ACK
        dependent = {LISTENER: ROUTE, CLUSTER: ENDPOINT}.get(type_url)
        if dependent is not None:
            wanted = tuple(sorted({ref for _, ref in parsed if ref is not None}))
            current = self.types.get(dependent)
            # An empty first request would mean "everything": subscribe only once there is a name.
            if wanted and (current is None or current.names != wanted):
                if current is None:
                    self.types[dependent] = _TypeState(wanted)
                else:
                    current.names = wanted
                requests.append(self._request(dependent))
            elif not wanted and current is not None and current.names:
                current.names = ()
                requests.append(self._request(dependent))
        return requests

    def complete(self) -> bool:
        if not all(self.types[t].nonce for t in (LISTENER, CLUSTER)):
            return False
        for type_url in (ROUTE, ENDPOINT):
            state = self.types.get(type_url)
            if state is None or not state.names:
                continue
            if not state.nonce or not set(state.names) <= state.received:
                return False
        return True

    def fingerprint(self) -> str:
        return "|".join(
            f"{SHORT[t]}={s.version}" for t, s in sorted(self.types.items()) if s.names != ()
        )

    def _request(self, type_url: str) -> discovery_pb2.DiscoveryRequest:
        state = self.types[type_url]
        return discovery_pb2.DiscoveryRequest(
            node=self.node,
            type_url=type_url,
            resource_names=list(state.names) if state.names is not None else [],
            version_info=state.version,
            response_nonce=state.nonce,
        )


SHORT = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS"}


def _node(node_id: str, service: str) -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"service": service})
    return base_pb2.Node(id=node_id, metadata=metadata)


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def run_proxy(port: int, node_id: str, service: str, parsed: _Parsed) -> None:
    sidecar = SidecarSubscriptions(_node(node_id, service), parsed)
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        for request in sidecar.initial_requests():
            await call.write(request)
        reported = ""
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                raise ConnectionError("the control plane ended the stream")
            for request in sidecar.on_response(response):
                await call.write(request)
            fingerprint = sidecar.fingerprint()
            if sidecar.complete() and fingerprint != reported:
                reported = fingerprint
                _emit({"event": "complete", "node": node_id, "t": time.monotonic(),
                       "fp": fingerprint, "bytes": sidecar.bytes_received})


async def _guarded(port: int, node_id: str, service: str, parsed: _Parsed) -> None:
    try:
        await run_proxy(port, node_id, service, parsed)
    except (grpc.RpcError, ConnectionError) as exc:
        _emit({"event": "error", "node": node_id, "error": f"{type(exc).__name__}: {exc}"})


async def _main(port: int, proxies: Sequence[tuple[str, str]]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    _emit({"event": "ready"})
    if (await reader.readline()).strip() != b"go":
        return
    parsed = _Parsed()
    tasks = [asyncio.create_task(_guarded(port, n, s, parsed)) for n, s in proxies]
    await reader.readline()  # "stop" or EOF
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ads_clients", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("proxies", nargs="+", metavar="NODE=SERVICE")
    args = parser.parse_args(argv)
    proxies = [tuple(p.split("=", 1)) for p in args.proxies]
    asyncio.run(_main(args.port, [(n, s) for n, s in proxies]))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    _emit({"event": "exit", "cpu_s": usage.ru_utime + usage.ru_stime})
    return 0


if __name__ == "__main__":
    sys.exit(main())
