"""Listeners: accept connections, tell the protocol from the first bytes, hand over.

HTTP/2 with prior knowledge starts with the fixed connection preface; HTTP/1.1 starts with a
method token and a space. Anything else goes to the listener's TCP passthrough cluster when it
has one, and is closed with a logged reason when it has not. A client that says nothing (a
server-first protocol) is relayed as TCP after ``protocol_detect_timeout``. A listener with
``tcp_passthrough_original_destination`` relays such connections to where the client meant to
go before iptables redirected it here, and so HTTP connections whose first request names a host
its routes do not know (``listen/authority.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast

import h2.events
import h2.exceptions

from pilotfish.config.model import ListenerConfig
from pilotfish.config.security import MtlsMode
from pilotfish.identity import SpiffeId
from sidecar import codec
from sidecar.http.h1conn import H1ServerConnection
from sidecar.http.h2conn import LINGER_SECONDS, MAX_STREAM_ID, H2Connection, H2Stream
from sidecar.http.h2guard import H2ServerGuard
from sidecar.http.streams import (
    CANCEL,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    Headers,
    ResetReason,
    StreamHandler,
    StreamSink,
)
from sidecar.listen.authority import Unreadable, first_authority
from sidecar.listen.inbound import InboundSecurity
from sidecar.listen.original_dst import OriginalDestinationError, original_destination
from sidecar.listen.tls import looks_like_tls, terminate
from sidecar.route.exchange import Exchange, SidecarServices
from sidecar.route.policy.shedding import LoadShedder
from sidecar.stats import Scope
from sidecar.upstream.tcp import ClusterTarget, OriginalDestination, RelayTarget, TcpRelay

if TYPE_CHECKING:
    from sidecar.observability.metrics import MeshMetrics
    from sidecar.route.table import RouteTable
    from sidecar.security.jwt_filter import JwtAuthenticator
    from sidecar.security.workload import WorkloadCertificates
    from sidecar.stats import StatsStore
    from sidecar.upstream.clusters import ClusterManager

log = logging.getLogger(__name__)

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DOWNSTREAM_CONNECTION_WINDOW = 16 * 1024 * 1024
WRITE_BUFFER_HIGH = 256 * 1024
_RESET_EVENTS = (codec.StreamReset, h2.events.StreamReset)
_DATA_EVENTS = (codec.DataReceived, h2.events.DataReceived)
_REQUEST_EVENTS = (
    codec.RequestReceived,
    codec.DataReceived,
    h2.events.RequestReceived,
    h2.events.DataReceived,
)
MAX_METHOD_LENGTH = 20


def detect_protocol(head: bytes) -> str | None:
    """``"h2"``, ``"h1"``, ``"other"``, or None while the bytes so far could still be either."""
    if head.startswith(H2_PREFACE):
        return "h2"
    if H2_PREFACE.startswith(head):
        return None
    space = head.find(b" ")
    token = head if space == -1 else head[:space]
    if token and all(0x41 <= c <= 0x5A or c == 0x2D or c == 0x5F for c in token):
        if space != -1:
            return "h1"
        if len(token) <= MAX_METHOD_LENGTH:
            return None
    return "other"


class _StreamProgress(Protocol):
    """What the guard reads of either of our codecs (ours, or the ngh2 adapter). A protocol
    rather than one codec's class: compiled (PILOTFISH_MYPYC), a cast to a class is checked."""

    @property
    def header_block_open(self) -> bool: ...

    def progress_mark(self, stream_id: int) -> Hashable: ...


class ListenerHost(SidecarServices, Protocol):
    """What a listener needs of the sidecar that runs it (``sidecar.server.Sidecar``): the
    stats, the route tables and clusters, and the end-of-request record."""

    @property
    def stats(self) -> StatsStore: ...

    @property
    def metrics(self) -> MeshMetrics: ...

    @property
    def clusters(self) -> ClusterManager: ...

    @property
    def route_tables(self) -> Mapping[str, RouteTable]: ...

    def access_log(self, listener: ListenerRuntime, exchange: Exchange) -> None: ...

    @property
    def workload(self) -> WorkloadCertificates | None: ...


class ListenerRuntime:
    """What connections of one listener share: config, routes, clusters, stats."""

    # Told of every connection that ends, when an acceptor balances connections across
    # workers (``sidecar.listen.handoff``): it counts what each worker has open.
    closed_hook: Callable[[], None] | None = None

    def __init__(self, sidecar: ListenerHost, config: ListenerConfig) -> None:
        self.sidecar = sidecar
        self.config = config
        self.scope: Scope = sidecar.stats.scope(f"http.{config.name}")
        self.connections: set[Any] = set()
        self.draining = False
        self.random: Callable[[], float] = random.random
        self.server: asyncio.AbstractServer | None = None
        self.shedder: LoadShedder | None = None
        self.jwt: JwtAuthenticator | None = None
        self._jwt_named: dict[str, JwtAuthenticator] = {}
        self.update(config)
        metrics = sidecar.metrics
        self.connections_gauge = metrics.active_connections.labels(self.direction)
        self.streams_gauge = metrics.active_streams.labels(self.direction)

    def update(self, config: ListenerConfig) -> None:
        """Take a new config; the load shedder keeps its windows if its config is the same."""
        old = self.config.load_shedding if self.shedder is not None else None
        old_jwt = self.config.jwt if self.jwt is not None else None
        if config.jwt_requirements != self.config.jwt_requirements:
            self._jwt_named = {}  # an unchanged map keeps its authenticators and their keys
        self.config = config
        # Whether connections count their requests against ``max_requests_per_connection``.
        self.requests_limited = config.listener_limits.max_requests_per_connection is not None
        # "inbound" (to the local app) or "outbound", for metrics: read by every request.
        self.direction = config.direction or (
            "inbound" if config.name.startswith("inbound") else "outbound"
        )
        if config.jwt is None:
            self.jwt = None
        elif config.jwt != old_jwt:  # an unchanged config keeps its fetched keys
            from sidecar.security.jwt_filter import JwtAuthenticator

            self.jwt = JwtAuthenticator(config.jwt.providers, config.jwt.required)
        shedding = config.load_shedding
        if not shedding.enabled:
            self.shedder = None
        elif shedding != old:
            self.shedder = LoadShedder(shedding, asyncio.get_event_loop().time)
        # Requests need no inbound security filter: the Exchange handles them alone.
        self._unfiltered = config.mtls is None and config.authorization is None and (
            self.jwt is None and not config.jwt_requirements
        )
        # Routes may override JWT and authorization only where the listener has the filters
        # (as in Envoy, whose per-route configs go to the listener's filters).
        self._per_route = (
            config.jwt is not None or bool(config.jwt_requirements)
            or config.authorization is not None
        )
        stripped: set[bytes] = set(self.jwt.stripped) if self.jwt is not None else set()
        for _, required in config.jwt_requirements:
            for provider in required.providers:
                stripped.update(header.encode() for _, header in provider.forward_claims)
        # Claim headers a client may not send, whichever requirement a route chooses.
        self.claim_headers = frozenset(stripped)

    @property
    def clusters(self) -> ClusterManager:
        return self.sidecar.clusters

    def route_table(self) -> RouteTable | None:
        name = self.config.route_config
        return self.sidecar.route_tables.get(name) if name is not None else None

    def route_table_named(self, name: str) -> RouteTable | None:
        return self.sidecar.route_tables.get(name)

    def jwt_requirement(self, name: str) -> JwtAuthenticator | None:
        """The authenticator of the listener's requirement ``name``; None if it has none."""
        found = self._jwt_named.get(name)
        if found is None:
            required = dict(self.config.jwt_requirements).get(name)
            if required is None:
                return None
            from sidecar.security.jwt_filter import JwtAuthenticator

            found = self._jwt_named[name] = JwtAuthenticator(
                required.providers, required.required
            )
        return found

    def new_exchange(self, downstream: StreamSink, peer: SpiffeId | None = None) -> StreamHandler:
        exchange = Exchange(self, downstream)
        if self._unfiltered:
            return exchange
        config = self.config
        table = self.route_table() if self._per_route else None
        return InboundSecurity(
            exchange,
            peer,
            config.authorization,
            self.scope,
            config.mtls is not None,
            self.jwt,
            routes=self if table is not None and table.secured else None,
        )

    def exchange_done(self, exchange: Exchange) -> None:
        self.sidecar.access_log(self, exchange)

    def admit_connection(self) -> bool:
        """Whether a new connection fits ``max_downstream_connections`` (counted if not).

        Connections still sniffing their protocol are not counted: they last at most
        ``protocol_detect_timeout``, and then count or close."""
        limit = self.config.listener_limits.max_downstream_connections
        if limit is not None and len(self.connections) >= limit:
            self.scope.inc("downstream_cx_overflow")
            return False
        return True

    def request_started_on(self, requests_so_far: int) -> bool:
        """Whether the connection that has carried ``requests_so_far`` (this one included)
        should now drain, by ``max_requests_per_connection``; counted once when it should."""
        limit = self.config.listener_limits.max_requests_per_connection
        if limit is not None and requests_so_far == limit:
            self.scope.inc("downstream_cx_max_requests_reached")
            return True
        return False

    def connection_opened(self, conn: Any) -> None:
        self.connections.add(conn)
        self.scope.inc("downstream_cx_total")
        self.scope.gauge_add("downstream_cx_active", 1)
        self.connections_gauge.value += 1

    def connection_closed(self, conn: Any) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.scope.gauge_add("downstream_cx_active", -1)
            self.connections_gauge.value -= 1
            if self.closed_hook is not None:
                self.closed_hook()

    def start_drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            conn.start_drain()

    @property
    def active_streams(self) -> int:
        return sum(c.active_streams for c in self.connections)


class H2ServerConnection(H2Connection):
    """A downstream HTTP/2 connection, with the budgets and timeouts of ``H2ServerGuard``."""

    # The rapid reset attack opens and resets streams in one go: such requests are never
    # routed, never sent upstream.
    screens_resets = True

    def __init__(self, listener: ListenerRuntime) -> None:
        config = listener.config
        self.guard = H2ServerGuard(self, config.limits, asyncio.get_event_loop())
        super().__init__(
            client_side=False,
            stream_window=config.per_stream_buffer_bytes,
            # One client's connection: its stalled streams may only hurt its other streams, and
            # this bounds what the connection as a whole can have buffered in the proxy.
            connection_window=DOWNSTREAM_CONNECTION_WINDOW,
            max_concurrent_streams=config.limits.max_concurrent_streams,
            max_header_list_size=config.max_request_headers_bytes,
            budget=self.guard.budget,
        )
        self.listener = listener
        self.draining = False
        self.requests = 0
        self.last_stream_id = MAX_STREAM_ID
        self.peer: SpiffeId | None = None  # set by the listener after an mTLS handshake
        self.hold_reading_while_write_paused = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Room for a window's worth of responses before the peer counts as not reading.
        cast(asyncio.Transport, transport).set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        super().connection_made(transport)
        self.listener.connection_opened(self)
        self.guard.opened()

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        if not self.discarding:
            self.guard.after_read()

    def on_request_received(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        stream = H2Stream(self, stream_id, None)
        self.streams[stream_id] = stream
        if self.goaway_sent and stream_id > self.last_stream_id:
            self.reset_stream(stream, REFUSED_STREAM)
            return
        self.guard.stream_opened()
        listener = self.listener
        handler = listener.new_exchange(stream, self.peer)
        stream.handler = handler
        handler.on_headers(headers, end_stream)
        self.requests += 1
        if listener.requests_limited and listener.request_started_on(self.requests):
            self.start_drain()

    def on_request_withdrawn(self, stream_id: int) -> None:
        """The codec screened a request out (``screens_resets``)."""
        self.listener.scope.inc("http2.reset_before_routing")

    def screen_resets(self, events: list[Any]) -> list[Any]:
        """Drop requests reset within the read that opened them, by the client or by the codec
        (a body that broke its content-length), from a codec that returns events; ngh2 drops
        them itself (``screens_resets``)."""
        reset = {e.stream_id for e in events if type(e) in _RESET_EVENTS}
        if not reset:
            return events
        dropped = {e.stream_id for e in events if type(e) in _REQUEST_EVENTS} & reset
        if not dropped:
            return events
        self.listener.scope.inc("http2.reset_before_routing", len(dropped))
        kept = []
        for event in events:
            if getattr(event, "stream_id", None) not in dropped:
                kept.append(event)
            elif type(event) in _DATA_EVENTS:
                # Nobody will take these bytes: give the connection window its credit back.
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        return kept

    def protocol_error(self, exc: Exception) -> None:
        scope = self.listener.scope
        scope.inc("downstream_cx_protocol_error")
        tripped = self.guard.budget.tripped
        if tripped is not None:
            scope.inc(f"http2.{tripped}")
        super().protocol_error(exc)
        self.guard.closed()  # the connection lingers only to deliver GOAWAY

    def on_stream_closed(self, stream: H2Stream) -> None:
        if not self.streams and not self.discarding:
            if self.draining or self.goaway_received:
                self.close()
                return
            self.guard.streams_gone()

    # -- H2ServerGuard's view of the connection ----------------------------------------------

    def progress_marks(self) -> dict[int, Hashable]:
        marks: dict[int, Hashable] = {}
        if not self._lean:
            return marks  # only our codecs (ours, ngh2) say how far a stream got
        progress_mark = cast(_StreamProgress, self.h2).progress_mark
        for sid in self.streams:
            mark = progress_mark(sid)
            if mark is not None:
                marks[sid] = mark
        return marks

    def header_block_open(self) -> bool:
        return self._lean and cast(_StreamProgress, self.h2).header_block_open

    def reset_stalled(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.closed:
            return
        self.listener.scope.inc("http2.stream_idle_timeout")
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, CANCEL)
        self.mark_dirty()
        self._close_stream(stream, ResetReason.LOCAL, CANCEL)

    def close(self) -> None:
        """Close once what is queued has been written, or after a linger if the client does
        not read it (a transport's close waits for its buffer to drain, maybe for ever)."""
        super().close()
        if self.transport is not None and not self.closed:
            self._loop.call_later(LINGER_SECONDS, self.abort)

    def close_idle(self) -> None:
        if self.closed or self.discarding or self.streams:
            return
        self.listener.scope.inc("http2.idle_timeout")
        self.h2.send_goaway(self.h2.highest_inbound_stream_id, NO_ERROR)
        self.close()

    def close_header_timeout(self) -> None:
        if self.closed or self.discarding:
            return
        self.listener.scope.inc("http2.header_timeout")
        self.h2.send_goaway(self.h2.highest_inbound_stream_id, PROTOCOL_ERROR)
        self.close()

    def on_goaway(self, last_stream_id: int | None, error_code: int) -> None:
        if not self.streams:
            self.close()

    def start_drain(self) -> None:
        """GOAWAY in two steps, as RFC 9113 section 6.8 suggests.

        The first names the largest stream id, so requests already on the wire are still
        served; a second later the real last stream id follows and anything newer is refused.
        """
        if self.draining or self.closed:
            return
        self.draining = True
        self.h2.send_goaway(MAX_STREAM_ID)
        self.flush()
        if not self.streams:
            self.close()
            return
        asyncio.get_event_loop().call_later(1.0, self._final_goaway)

    def _final_goaway(self) -> None:
        if self.closed:
            return
        self.last_stream_id = self.h2.highest_inbound_stream_id
        self.h2.send_goaway(self.last_stream_id)
        self.goaway_sent = True
        self.flush()
        if not self.streams:
            self.close()

    def on_closed(self) -> None:
        self.guard.closed()
        self.listener.connection_closed(self)

    @property
    def active_streams(self) -> int:
        return len(self.streams)


class SniffingProtocol(asyncio.Protocol):
    """Holds the first bytes of a connection until the protocol is known, then hands over."""

    def __init__(
        self, listener: ListenerRuntime, peer: SpiffeId | None = None, decrypted: bool = False
    ) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.timer: asyncio.TimerHandle | None = None
        # Inside an mTLS session: the verified peer (None for PERMISSIVE without a certificate).
        self.peer = peer
        self.decrypted = decrypted
        # HTTP, waiting for the first request's authority to choose mesh or passthrough.
        self.http: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if not self.listener.admit_connection():
            self.transport.close()
            return
        config = self.listener.config
        if config.mode == "tcp":
            self._hand_over("tcp")
            return
        loop = asyncio.get_event_loop()
        self.timer = loop.call_later(config.protocol_detect_timeout, self._on_timeout)

    def data_received(self, data: bytes) -> None:
        self.head += data
        mtls = self.listener.config.mtls
        if mtls is not None and not self.decrypted:
            tls = looks_like_tls(self.head)
            if tls is None:
                return
            if tls:
                self._terminate_tls(mtls)
                return
            if mtls is MtlsMode.STRICT:
                self._refuse("plaintext on a STRICT mTLS listener")
                return
        protocol = self.http or detect_protocol(self.head)
        if protocol in ("h1", "h2") and self.listener.config.tcp_passthrough_original_destination:
            self.http = protocol
            protocol = self._mesh_or_passthrough(protocol)
        if protocol is not None:
            self._hand_over(protocol)

    def _mesh_or_passthrough(self, protocol: str) -> str | None:
        """``protocol`` if the connection is for a host the routes know, ``"other"`` (to the
        original destination) if not, None until the HTTP/1.1 request head has arrived.

        HTTP/1.1 is decided by its first request's authority. HTTP/2 clients wait for our
        SETTINGS before sending a request, so there the address dialled decides: a known
        ``ip:port`` (a Kubernetes Service's ClusterIP) or a catch-all virtual host. When the
        control plane serves per-port outbound routes (Envoy's shape), a redirected connection
        is looked up in its original destination port's routes only, as Envoy does; on a port
        with none, only services without a port are the mesh's.
        """
        table = self.listener.route_table()
        by_port = table.config.original_port_routes if table is not None else ()
        authority = ""
        if protocol != "h2":
            try:
                found = first_authority(self.head)
            except Unreadable:
                return protocol  # the HTTP codec answers it with a proper protocol error
            if found is None:
                return None
            authority = found
        destination: tuple[str, int] | None = None
        if protocol == "h2" or by_port:
            assert self.transport is not None
            try:
                destination = original_destination(self.transport.get_extra_info("socket"))
            except OriginalDestinationError:
                if protocol == "h2":
                    return protocol  # not redirected: nothing else to go to
        if protocol == "h2":
            assert destination is not None
            authority = f"{destination[0]}:{destination[1]}"
        if destination is not None and by_port:
            ports = dict(by_port)
            port_routes = ports.get(destination[1]) or ports.get(0)  # 0: every other port
            table = self.listener.route_table_named(port_routes) if port_routes else None
        if table is not None and authority and table.virtual_host(authority) is not None:
            return protocol
        self.listener.scope.inc("downstream_cx_passthrough_unknown_authority")
        return "other"

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        # Only a connection closed before it was handed to a protocol gets here.
        if self.timer is not None:
            self.timer.cancel()
        if self.listener.closed_hook is not None:
            self.listener.closed_hook()

    def _on_timeout(self) -> None:
        self.timer = None
        if self.listener.config.mtls is MtlsMode.STRICT and not self.decrypted:
            self._refuse("client sent nothing on a STRICT mTLS listener")
        if self.http is not None:
            # An HTTP/1.1 request head that takes this long: handled by the mesh.
            self._hand_over(self.http)
            return
        self._hand_over("tcp" if not self.head else "other")

    def _refuse(self, reason: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        listener = self.listener
        assert self.transport is not None
        log.info(
            "listener %s: closing connection from %s: %s",
            listener.config.name,
            self.transport.get_extra_info("peername"),
            reason,
        )
        listener.scope.inc("downstream_cx_mtls_refused")
        self.transport.close()

    def _terminate_tls(self, mtls: MtlsMode) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        workload = self.listener.sidecar.workload
        if workload is None:
            self._refuse("TLS, but this sidecar has no workload certificate")
            return
        assert self.transport is not None
        strict = mtls is MtlsMode.STRICT
        head, self.head = self.head, b""
        terminate(
            self.transport,
            head,
            workload.server_context(strict),
            workload.identity.trust_domain,
            strict,
            self._decrypted,
            self._tls_refused,
        )

    def _decrypted(self, transport: asyncio.Transport, peer: SpiffeId | None) -> None:
        self.listener.scope.inc("downstream_cx_mtls")
        inner = SniffingProtocol(self.listener, peer, decrypted=True)
        transport.set_protocol(inner)
        inner.connection_made(transport)

    def _tls_refused(self, reason: str) -> None:
        log.info("listener %s: mTLS refused: %s", self.listener.config.name, reason)
        self.listener.scope.inc("downstream_cx_mtls_refused")

    def _hand_over(self, protocol: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        assert transport is not None
        listener = self.listener
        new: asyncio.Protocol | H2ServerConnection  # the latter reads into its own buffer
        if protocol == "h2":
            new = H2ServerConnection(listener)
            new.peer = self.peer
        elif protocol == "h1":
            new = H1ServerConnection(listener)
            new.peer = self.peer
        else:
            target = self._passthrough_target(transport)
            if target is None:
                transport.close()
                return
            new = TcpRelay(listener, target)
        transport.set_protocol(new)
        new.connection_made(transport)
        if self.head:
            new.data_received(self.head)
            self.head = b""

    def _passthrough_target(self, transport: asyncio.Transport) -> RelayTarget | None:
        """Where a connection that is not HTTP goes; None (logged and counted) to close it."""
        listener = self.listener
        config = listener.config
        peer = transport.get_extra_info("peername")
        if config.tcp_passthrough_original_destination:
            try:
                host, port = original_destination(transport.get_extra_info("socket"))
            except OriginalDestinationError as exc:
                log.info("listener %s: closing connection from %s: %s", config.name, peer, exc)
                listener.scope.inc("downstream_cx_original_dst_unknown")
                return None
            scope = listener.sidecar.stats.scope("cluster.original_dst")
            return OriginalDestination(
                host, port, config.original_destination_connect_timeout, scope
            )
        cluster_name = config.tcp_passthrough_cluster
        cluster = listener.clusters.get(cluster_name) if cluster_name else None
        if cluster is None:
            reason = "client sent nothing" if not self.head else "not HTTP/1.1 or HTTP/2"
            log.info(
                "listener %s: closing connection from %s: %s and no tcp_passthrough cluster",
                config.name,
                peer,
                reason,
            )
            listener.scope.inc("downstream_cx_protocol_unknown")
            return None
        return ClusterTarget(cluster)
