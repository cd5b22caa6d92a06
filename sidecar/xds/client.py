"""The sidecar's ADS client: one gRPC stream to the control plane, kept up for good.

The protocol bookkeeping is in ``sidecar.xds.state``; this module moves its requests and the
control plane's responses over a ``grpc.aio`` stream, applies complete configs to the
``Sidecar``, and reconnects with exponential backoff and jitter (tenacity) whenever the stream
ends. While the control plane is away, the last config stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import grpc
import tenacity
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2

from pilotfish.config.model import Bootstrap
from sidecar.server import ApplyError, Sidecar
from sidecar.xds.changes import describe_changes
from sidecar.xds.config_dump import envoy_configs
from sidecar.xds.state import SHORT, AdsClientState, XdsSnapshot

log = logging.getLogger("pilotfish.xds")


def make_node(node_id: str, metadata: dict[str, str]) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update({k: v for k, v in metadata.items() if v})
    return base_pb2.Node(id=node_id, cluster=metadata.get("service", ""), metadata=meta)


def merge(static: Bootstrap, snapshot: XdsSnapshot) -> Bootstrap:
    """The static bootstrap plus what the control plane sent; static names win, and telemetry
    the control plane sets replaces the bootstrap's."""
    listeners = {listener.name: listener for listener in snapshot.listeners}
    listeners.update({listener.name: listener for listener in static.listeners})
    telemetry = static.telemetry
    if snapshot.tracing is not None:
        telemetry = replace(telemetry, tracing=snapshot.tracing)
    if snapshot.access_log is not None:
        telemetry = replace(telemetry, access_log=snapshot.access_log)
    return replace(
        static,
        listeners=tuple(listeners.values()),
        route_configs={**snapshot.route_configs, **static.route_configs},
        clusters={**snapshot.clusters, **static.clusters},
        telemetry=telemetry,
    )


def describe_failure(exc: BaseException | None) -> str:
    """One line for a failed attempt: an ``AioRpcError``'s own string is a five-line dump."""
    if isinstance(exc, grpc.aio.AioRpcError):
        details = " ".join((exc.details() or "").split())
        return f"{exc.code().name}: {details}" if details else exc.code().name
    return " ".join(str(exc).split()) or type(exc).__name__


class _StreamEnded(Exception):
    """The ADS stream closed; ``progressed`` when it delivered at least one response."""

    def __init__(self, progressed: bool, reason: str) -> None:
        super().__init__(reason)
        self.progressed = progressed


class XdsClient:
    def __init__(
        self,
        sidecar: Sidecar,
        static: Bootstrap,
        address: str,
        node: base_pb2.Node,
        *,
        max_backoff: float = 10.0,
        credentials: Callable[[], grpc.ChannelCredentials] | None = None,
    ) -> None:
        """``credentials``: mutual TLS, asked for on every connection, so that a reconnect
        presents the workload certificate current at that moment; None: plaintext."""
        self.sidecar = sidecar
        self.credentials = credentials
        self.static = static
        self.address = address
        self.node = node
        self.state = AdsClientState(node, check_listeners=sidecar.check_listeners)
        self.max_backoff = max_backoff
        self.connected = False
        self.accepted = 0
        self.rejected = 0
        self.last_update = 0.0
        sidecar.config_dump_extra = self.dump

    async def run(self) -> None:
        """Stream, and reconnect after any failure, until cancelled."""
        while True:
            retrying = tenacity.AsyncRetrying(
                wait=tenacity.wait_exponential_jitter(initial=0.1, max=self.max_backoff),
                retry=tenacity.retry_if_exception(self._retry_without_reset),
                before_sleep=self._log_retry,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._stream_once()
            except _StreamEnded:
                continue  # it had made progress: start again with a fresh backoff

    @staticmethod
    def _retry_without_reset(exc: BaseException) -> bool:
        if isinstance(exc, _StreamEnded):
            return not exc.progressed
        return isinstance(exc, (grpc.aio.AioRpcError, OSError))

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        outcome = retry_state.outcome
        reason = outcome.exception() if outcome is not None else None
        delay = retry_state.next_action.sleep if retry_state.next_action else 0.0
        log.warning(
            "control plane %s unreachable (attempt %d: %s); retrying in %.2fs",
            self.address,
            retry_state.attempt_number,
            describe_failure(reason),
            delay,
        )

    async def _stream_once(self) -> None:
        queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        for request in self.state.initial_requests():
            queue.put_nowait(request)

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while True:
                yield await queue.get()

        progressed = False
        channel = (
            grpc.aio.insecure_channel(self.address)
            if self.credentials is None
            else grpc.aio.secure_channel(self.address, self.credentials())
        )
        async with channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.StreamAggregatedResources(requests())
            try:
                async for response in call:
                    if not progressed:
                        log.info("connected to control plane %s", self.address)
                    progressed = True
                    self.connected = True
                    for request in self.handle(response):
                        queue.put_nowait(request)
            except grpc.aio.AioRpcError as exc:
                self.connected = False
                if not progressed:
                    raise
                raise _StreamEnded(True, f"{exc.code().name}: {exc.details()}") from exc
        self.connected = False
        raise _StreamEnded(progressed, "the control plane closed the stream")

    def handle(self, response: discovery_pb2.DiscoveryResponse) -> list[Any]:
        """One response in, the requests to send out; applies a complete config on the way."""
        actions = self.state.on_response(response, self._apply)
        kind = SHORT.get(response.type_url, response.type_url)
        scope = self.sidecar.stats.scope("xds")
        self.sidecar.metrics.xds_update(kind, actions.rejected is None)
        if actions.rejected is not None:
            self.rejected += 1
            scope.inc("update_rejected")
            log.error("rejected %s version %s: %s", kind, response.version_info, actions.rejected)
            return actions.requests
        self.accepted += 1
        scope.inc("update_success")
        if actions.snapshot is not None:
            self.last_update = time.time()
            if not self.sidecar.initialized:
                log.info("first complete config applied; ready")
            self.sidecar.initialized = True
            self.sidecar.awaiting_config = False
        return actions.requests

    def _apply(self, snapshot: XdsSnapshot) -> str | None:
        before = self.sidecar.bootstrap
        after = merge(self.static, snapshot)
        try:
            self.sidecar.apply(after)
        except ApplyError as exc:
            return str(exc)
        except Exception as exc:  # a bug of ours: NACK it rather than lose the xDS stream
            log.exception("applying a config failed")
            return f"internal error applying the config: {exc!r}"
        log.info("config applied: %s", describe_changes(before, after))
        return None

    def dump(self) -> dict[str, Any]:
        state = self.state
        return {
            # Envoy's shape, for tools that read Envoy's /config_dump; the rest is our own.
            "configs": envoy_configs(
                self.node, state.received, self.last_update, self.static, self.sidecar.started_at
            ),
            "xds": {
                "control_plane": self.address,
                "tls": self.credentials is not None,
                "connected": self.connected,
                "versions": {SHORT[t]: r.version_info for t, r in state.received.items()},
                "last_nack": {
                    SHORT[t]: r.last_nack for t, r in state.received.items() if r.last_nack
                },
                "last_update": self.last_update,
            },
            "dynamic_resources": state.dump(),
        }
