"""The ADS gRPC service: the only place where the xDS protocol meets sockets.

Each stream owns a ``SotwStream`` or ``DeltaStream`` and feeds it two kinds of input from one
queue: requests read from the client, and "the mesh changed" from the snapshot cache.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.xds.cache import ProxyIdentity, SnapshotCache, identify
from control_plane.xds.callbacks import Callbacks
from control_plane.xds.peer_view import (
    AuthenticatedPeer,
    IdentityMismatch,
    PeerRefused,
    bind_node,
)
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.stream_state import (
    DeltaStream,
    NackReceived,
    ProtocolError,
    SotwStream,
    TypeStatus,
)
from control_plane.xds.types import ENDPOINT, SHORT_NAMES

log = logging.getLogger(__name__)

Req = TypeVar("Req", discovery_pb2.DiscoveryRequest, discovery_pb2.DeltaDiscoveryRequest)
Resp = TypeVar("Resp", discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse)


# What a proxy whose service the mesh does not know is served: the whole mesh (``serve``, for
# gateways and local runs without metadata) or nothing (``reject``: the stream is refused
# with PERMISSION_DENIED, so a stranger cannot learn every service and endpoint).
UNKNOWN_NODE_POLICIES = ("serve", "reject")


class UnknownNodeError(ProtocolError):
    """The proxy's service is not in the mesh, and unknown nodes are refused."""


_ReqIn = TypeVar("_ReqIn", contravariant=True)
_RespOut = TypeVar("_RespOut", covariant=True)


class _Protocol(Protocol[_ReqIn, _RespOut]):
    """What ``SotwStream`` and ``DeltaStream`` have in common."""

    def handle_request(
        self, request: _ReqIn, snapshot: Snapshot
    ) -> tuple[Sequence[_RespOut], list[NackReceived]]: ...

    def handle_snapshot(self, snapshot: Snapshot) -> Sequence[_RespOut]: ...

    def status(self, snapshot: Snapshot) -> list[TypeStatus]: ...

    def subscribed(self, type_url: str, name: str) -> bool: ...


@dataclass(eq=False)
class ConnectedProxy:
    """One open ADS stream, as the status service reports it."""

    stream_id: int
    kind: str
    connected_since: float
    protocol: SotwStream | DeltaStream
    identity: ProxyIdentity | None = None
    peer: AuthenticatedPeer | None = None
    """The verified client certificate's identity, on the mTLS port; None on the others."""
    nacks: list[NackReceived] = field(default_factory=list)
    eds_acked_revision: int = 0
    """The cache revision of the newest EDS response this proxy acknowledged."""
    eds_sent: dict[str, int] = field(default_factory=dict)
    """Cache revision of each EDS response not acknowledged yet, by nonce."""

    def eds_sent_at(self, nonce: str, revision: int) -> None:
        self.eds_sent[nonce] = revision

    def eds_acked(self, nonce: str) -> bool:
        """The proxy accepted the EDS response with this nonce; True if that is news."""
        revision = self.eds_sent.pop(nonce, None)
        if revision is None or revision <= self.eds_acked_revision:
            return False
        self.eds_acked_revision = revision
        # An ACK covers what came before it: older responses need no answer any more.
        for older in [n for n, r in self.eds_sent.items() if r <= revision]:
            del self.eds_sent[older]
        return True


class ProxyRegistry:
    def __init__(self) -> None:
        self._proxies: dict[int, ConnectedProxy] = {}
        self._watchers: list[Callable[[], None]] = []
        # One sequence for every port's streams: the ids key this registry and the metrics.
        self._ids = itertools.count(1)

    def next_stream_id(self) -> int:
        return next(self._ids)

    def add(self, proxy: ConnectedProxy) -> None:
        self._proxies[proxy.stream_id] = proxy

    def remove(self, stream_id: int) -> None:
        if self._proxies.pop(stream_id, None) is not None:
            self.changed()

    def watch(self, watcher: Callable[[], None]) -> Callable[[], None]:
        """Call ``watcher`` when a proxy acks EDS or leaves; returns the function that stops it."""
        self._watchers.append(watcher)
        return lambda: self._watchers.remove(watcher)

    def changed(self) -> None:
        for watcher in list(self._watchers):
            watcher()

    def proxies(self) -> list[ConnectedProxy]:
        return sorted(self._proxies.values(), key=lambda p: p.stream_id)


class _MeshChanged:
    """Queue marker: the snapshot cache has a new mesh."""


class _ClientDone:
    """Queue marker: the client half-closed or the read failed."""


class _CertificateExpired:
    """Queue marker: the client certificate the stream was opened with has expired."""


_MESH_CHANGED = _MeshChanged()
_CLIENT_DONE = _ClientDone()
_CERTIFICATE_EXPIRED = _CertificateExpired()


@dataclass(eq=False)
class _Stream(Generic[Req, Resp]):
    cache: SnapshotCache
    proxy: ConnectedProxy
    protocol: _Protocol[Req, Resp]
    callbacks: Callbacks
    acked: Callable[[], None]
    reject_unknown: bool = False
    node: base_pb2.Node | None = None

    def _identify(self, node: base_pb2.Node) -> ProxyIdentity:
        mesh = self.cache.mesh
        peer = self.proxy.peer
        # On the mTLS port the view follows the certificate; metadata only picks among the
        # services that identity runs (checked again when the mesh changes).
        identity = identify(node if peer is None else bind_node(node, mesh, peer.spiffe_id), mesh)
        if self.reject_unknown and identity.view.service is None:
            raise UnknownNodeError(
                f"node {node.id!r}: service {identity.service!r} in namespace "
                f"{identity.namespace!r} is not in the mesh"
            )
        return identity

    def snapshot(self) -> Snapshot:
        assert self.proxy.identity is not None
        return self.cache.snapshot(self.proxy.identity.view)

    def on_request(self, request: Req) -> Sequence[Resp]:
        self.callbacks.on_request(self.proxy.stream_id, request)
        if self.node is None:
            if not request.HasField("node"):
                raise ProtocolError("the first request on a stream must carry the node")
            self.proxy.identity = self._identify(request.node)
            self.node = request.node
            log.info("stream %d (%s): node %r service %r namespace %r", self.proxy.stream_id,
                     self.proxy.kind, self.node.id, self.proxy.identity.service,
                     self.proxy.identity.namespace)
        if (
            request.type_url == ENDPOINT
            and request.response_nonce
            and not request.HasField("error_detail")
            and self.proxy.eds_acked(request.response_nonce)
        ):
            self.acked()
        responses, nacks = self.protocol.handle_request(request, self.snapshot())
        for nack in nacks:
            log.warning("node %r rejected %s version %s: %s", self.node.id,
                        SHORT_NAMES.get(nack.type_url, nack.type_url), nack.version, nack.message)
            self.proxy.nacks = [*self.proxy.nacks[-9:], nack]
            self.callbacks.on_nack(self.proxy.stream_id, self.node.id, nack)
        return responses

    def on_mesh_changed(self) -> Sequence[Resp]:
        if self.node is None:
            return []
        # The new mesh may add or drop the proxy's service, which changes its view.
        self.proxy.identity = self._identify(self.node)
        return self.protocol.handle_snapshot(self.snapshot())


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        cache: SnapshotCache,
        registry: ProxyRegistry,
        callbacks: Callbacks | None = None,
        unknown_nodes: str = "serve",
        authenticate: Callable[[grpc.aio.ServicerContext[Any, Any]], AuthenticatedPeer] | None
        = None,
    ) -> None:
        """``authenticate``: on the mTLS port, the caller's verified identity from its call
        context; it raises ``PeerRefused`` for a caller without an acceptable certificate."""
        if unknown_nodes not in UNKNOWN_NODE_POLICIES:
            raise ValueError(f"unknown_nodes must be one of {UNKNOWN_NODE_POLICIES}")
        self._cache = cache
        self._registry = registry
        self._callbacks = callbacks or Callbacks()
        self._reject_unknown = unknown_nodes == "reject"
        self._authenticate = authenticate
        # Streams ended by the control plane, by reason, for the metrics.
        self.refused: collections.Counter[str] = collections.Counter()

    # grpc.aio recognises a streaming handler only if it is itself an async generator.
    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        async for response in self._serve("sotw", SotwStream(), request_iterator, context):
            yield response

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        async for response in self._serve("delta", DeltaStream(), request_iterator, context):
            yield response

    async def _serve(
        self,
        kind: str,
        protocol: _Protocol[Req, Resp],
        request_iterator: AsyncIterator[Req],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Resp]:
        assert isinstance(protocol, SotwStream | DeltaStream)
        proxy = ConnectedProxy(self._registry.next_stream_id(), kind, time.time(), protocol)
        if self._authenticate is not None:
            try:
                proxy.peer = self._authenticate(context)
            except PeerRefused as exc:
                self.refused["unauthenticated"] += 1
                log.warning("stream %d refused: %s (peer %s)", proxy.stream_id, exc,
                            context.peer())
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                return
        stream: _Stream[Req, Resp] = _Stream(
            self._cache, proxy, protocol, self._callbacks, self._registry.changed,
            self._reject_unknown,
        )
        queue: asyncio.Queue[Req | _MeshChanged | _ClientDone | _CertificateExpired] = (
            asyncio.Queue()
        )
        stop_watching = self._cache.on_change(lambda: queue.put_nowait(_MESH_CHANGED))
        expiry: asyncio.TimerHandle | None = None
        if proxy.peer is not None:
            # A stream outlives no certificate: the proxy reconnects with its renewed one, so
            # what the status reports (and what the view rests on) is never an expired proof.
            loop = asyncio.get_running_loop()
            expiry = loop.call_later(
                max(0.0, proxy.peer.not_after - time.time()),
                queue.put_nowait, _CERTIFICATE_EXPIRED,
            )
        reader = asyncio.create_task(_read_requests(request_iterator, queue.put_nowait))
        self._registry.add(proxy)
        self._callbacks.on_stream_open(proxy.stream_id, kind)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _ClientDone):
                    return
                if isinstance(item, _CertificateExpired):
                    self.refused["certificate_expired"] += 1
                    log.info("stream %d: client certificate expired; closing", proxy.stream_id)
                    await context.abort(
                        grpc.StatusCode.UNAUTHENTICATED,
                        "the client certificate has expired: reconnect with a renewed one",
                    )
                    return
                changed_at: float | None = None
                try:
                    if isinstance(item, _MeshChanged):
                        responses = stream.on_mesh_changed()
                        changed_at = self._cache.changed_at
                    else:
                        responses = stream.on_request(item)
                except (UnknownNodeError, IdentityMismatch) as exc:
                    reason = "unknown_node" if isinstance(exc, UnknownNodeError) else "identity"
                    self.refused[reason] += 1
                    log.warning("stream %d refused: %s", proxy.stream_id, exc)
                    await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
                    return
                except ProtocolError as exc:
                    log.warning("stream %d: %s", proxy.stream_id, exc)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
                for response in responses:
                    if response.type_url == ENDPOINT:
                        proxy.eds_sent_at(response.nonce, self._cache.revision)
                    self._callbacks.on_response(proxy.stream_id, response.type_url, changed_at)
                    yield response
        finally:
            if expiry is not None:
                expiry.cancel()
            stop_watching()
            reader.cancel()
            self._registry.remove(proxy.stream_id)
            node_id = stream.node.id if stream.node is not None else ""
            self._callbacks.on_stream_close(proxy.stream_id, node_id)
            log.info("stream %d (%s) of node %r closed", proxy.stream_id, kind, node_id)


async def _read_requests(
    requests: AsyncIterator[Req], put: Callable[[Req | _ClientDone], None]
) -> None:
    try:
        async for request in requests:
            put(request)
    except asyncio.CancelledError:
        raise
    except grpc.RpcError as exc:
        # The client went away mid-read: the stream is over, nothing to report upstream.
        log.debug("ADS read ended: %s", exc)
    finally:
        put(_CLIENT_DONE)
