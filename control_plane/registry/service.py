"""``pilotfish.registry.v1.Registry``: the registry core behind gRPC, and its eviction timer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import duration_pb2

from control_plane.registry.core import (
    Deregistered,
    Instance,
    InstanceState,
    InvalidInstance,
    Registry,
    UnknownInstance,
    make_instance,
)
from control_plane.registry.store import RegistryStore, StoreUnavailable
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.peer_view import AuthenticatedPeer, PeerRefused, registrable_services
from control_plane.xds.server import ProxyRegistry
from control_plane.xds.types import ENDPOINT
from pilotfish.gen.pilotfish.registry.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

MAX_AWAIT_PROXIES = 300.0
_STATES = {
    registry_pb2.SERVING: InstanceState.SERVING,
    registry_pb2.DRAINING: InstanceState.DRAINING,
}
_WIRE_STATES = {state: wire for wire, state in _STATES.items()}


def to_message(instance: Instance) -> Any:
    return registry_pb2.Instance(
        id=instance.id,
        service=instance.service,
        address=instance.host,
        port=instance.port,
        weight=instance.weight,
        zone=instance.zone,
        labels=dict(instance.labels),
        state=_WIRE_STATES[instance.state],
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(round(seconds * 1e9))
    return message


def proxies_to_wait_for(
    cache: SnapshotCache, proxies: ProxyRegistry, names: set[str], revision: int
) -> tuple[list[str], list[str]]:
    """(acked, pending): node ids of the proxies subscribed to any of the EDS ``names``, by
    whether they acknowledged an EDS response built at ``revision`` or later."""
    acked: list[str] = []
    pending: list[str] = []
    for proxy in proxies.proxies():
        if proxy.identity is None:
            continue
        endpoints = cache.snapshot(proxy.identity.view).of_type(ENDPOINT)
        if not any(n in endpoints and proxy.protocol.subscribed(ENDPOINT, n) for n in names):
            continue
        node = proxy.identity.node_id or f"stream-{proxy.stream_id}"
        (acked if proxy.eds_acked_revision >= revision else pending).append(node)
    return acked, pending


async def await_proxies(
    cache: SnapshotCache, proxies: ProxyRegistry, names: set[str], revision: int, timeout: float
) -> tuple[list[str], list[str]]:
    """Wait (at most ``timeout`` s) until every proxy that could call has acked ``revision``."""
    woken = asyncio.Event()
    stop = proxies.watch(woken.set)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            acked, pending = proxies_to_wait_for(cache, proxies, names, revision)
            remaining = deadline - loop.time()
            if not pending or remaining <= 0:
                return acked, pending
            woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), remaining)
    finally:
        stop()


def _service_of(instance_id: str) -> str:
    """The service an instance id names (``<service>/<host>:<port>``, ``core.instance_id``)."""
    return instance_id.partition("/")[0]


class RegistryServicer(registry_pb2_grpc.RegistryServicer):  # type: ignore[misc]
    """Writes go through ``store``; reads come from ``registry``, the view the cache serves."""

    def __init__(
        self,
        registry: Registry,
        store: RegistryStore,
        cache: SnapshotCache,
        proxies: ProxyRegistry,
        authenticate: Callable[[grpc.aio.ServicerContext[Any, Any]], AuthenticatedPeer]
        | None = None,
    ) -> None:
        """``authenticate``: on the mTLS port, the caller's verified identity, to which every
        write is bound: an instance may be registered, renewed or removed only under a service
        that identity runs (as ``peer_view`` binds views)."""
        self._authenticate = authenticate
        self._registry = registry
        self._store = store
        self._cache = cache
        self._proxies = proxies

    async def _check_caller(
        self, context: grpc.aio.ServicerContext[Any, Any], service: str, what: str
    ) -> None:
        if self._authenticate is None:
            return
        try:
            identity = self._authenticate(context).spiffe_id
        except PeerRefused as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            raise AssertionError("abort raises") from None
        allowed = registrable_services(identity, self._cache.mesh)
        if service not in allowed:
            runs = ", ".join(allowed) or "no service of the mesh"
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity} may not {what} {service!r}: it runs {runs}",
            )
            raise AssertionError("abort raises")

    async def Register(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        wire = request.instance
        try:
            state = _STATES.get(wire.state, InstanceState.SERVING)
            instance = make_instance(
                wire.service, wire.address, wire.port, weight=wire.weight, zone=wire.zone,
                labels=dict(wire.labels), state=state,
            )
        except InvalidInstance as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"instance.{exc}")
            raise AssertionError("abort raises") from None
        await self._check_caller(context, instance.service, "register under")
        if not self._cache.endpoint_names(instance.service):
            # Accepted all the same: the mesh file may name it later. But say so once.
            log.warning("registered %s, but no mesh service takes endpoints from %r",
                        instance.id, instance.service)
        try:
            await self._store.register(instance)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise AssertionError("abort raises") from None
        log.info("registered %s (weight %d, %s)", instance.id, instance.weight,
                 instance.state.value)
        return registry_pb2.RegisterResponse(
            id=instance.id,
            heartbeat_interval=_duration(self._registry.heartbeat_interval),
            ttl=_duration(self._registry.ttl),
        )

    async def Heartbeat(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        state = _STATES.get(request.state)
        await self._check_caller(context, _service_of(request.id), "renew an instance of")
        try:
            before = self._registry.get(request.id)
            instance = await self._store.heartbeat(request.id, state)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise AssertionError("abort raises") from None
        except Deregistered:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{request.id} was deregistered; register again to return")
            raise AssertionError("abort raises") from None
        except UnknownInstance:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no lease for {request.id} (expired?); register again")
            raise AssertionError("abort raises") from None
        if before is not None and before.state is not instance.state:
            log.info("%s is now %s", instance.id, instance.state.value)
        return registry_pb2.HeartbeatResponse()

    async def Deregister(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._check_caller(context, _service_of(request.id), "deregister an instance of")
        try:
            instance = await self._store.deregister(request.id)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise AssertionError("abort raises") from None
        if instance is None:
            return registry_pb2.DeregisterResponse(found=False)
        revision = self._cache.revision
        log.info("deregistered %s", instance.id)
        wait = min(request.await_proxies.ToNanoseconds() / 1e9, MAX_AWAIT_PROXIES)
        names = self._cache.endpoint_names(instance.service)
        if wait > 0:
            acked, pending = await await_proxies(
                self._cache, self._proxies, names, revision, wait
            )
        else:
            acked, pending = proxies_to_wait_for(self._cache, self._proxies, names, revision)
        if pending and wait > 0:
            log.warning("%s: %d proxies had not acked its removal after %.1fs: %s",
                        instance.id, len(pending), wait, ", ".join(pending))
        return registry_pb2.DeregisterResponse(found=True, acked=acked, pending=pending)

    def _list(self, service: str) -> Any:
        return registry_pb2.ListResponse(
            instances=[to_message(i) for i in self._registry.instances(service or None)],
            revision=self._registry.revision,
        )

    async def List(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return self._list(request.service)

    async def Watch(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        changed = asyncio.Event()
        wanted = request.service

        def on_change(services: frozenset[str]) -> None:
            if not wanted or wanted in services:
                changed.set()

        stop = self._registry.on_change(on_change)
        try:
            while True:
                changed.clear()
                yield self._list(wanted)
                await changed.wait()
        finally:
            stop()


async def expire_leases(registry: Registry, clock: Callable[[], float]) -> None:
    """Evict instances whose lease ran out, when the earliest one runs out."""
    while True:
        next_expiry = registry.next_expiry()
        delay = registry.heartbeat_interval
        if next_expiry is not None:
            delay = min(delay, max(next_expiry - clock(), 0.0))
        await asyncio.sleep(delay)
        for instance in registry.expire():
            log.warning("evicted %s: no heartbeat for %.1fs", instance.id, registry.ttl)
