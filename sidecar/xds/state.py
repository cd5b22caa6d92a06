"""The sidecar's side of ADS (state of the world), without I/O.

``AdsClientState`` takes each ``DiscoveryResponse`` and answers with what to do: the requests
to send (the ACK or NACK of that response, and subscription changes it causes) and, when the
resources now form a complete config, that config to apply.

- Each resource is checked on its own as it arrives; one that cannot be translated makes the
  whole response NACKed with an ``error_detail`` naming the field, and the last good resources
  of that type stay.
- Listeners wait for their route configs, and clusters for their endpoints ("warming", in
  Envoy's words): a config is only offered once everything it refers to has arrived.
- A route naming a cluster that does not exist is not an error: requests to it get a local
  reply (flag NC), as in Envoy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.config.model import ClusterConfig, ListenerConfig, RouteConfig
from sidecar.observability.access_log import AccessLogConfig
from sidecar.observability.tracing_config import TracingConfig
from sidecar.xds import translate as tr
from sidecar.xds.outbound import OutboundPort, is_original_destination, outbound_route_configs

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
SHORT = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS"}
_MESSAGES: dict[str, type[Message]] = {
    LISTENER: listener_pb2.Listener,
    ROUTE: route_pb2.RouteConfiguration,
    CLUSTER: cluster_pb2.Cluster,
    ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
}
WILDCARD = frozenset({LISTENER, CLUSTER})
INVALID_ARGUMENT = 3


@dataclass(frozen=True, slots=True)
class XdsSnapshot:
    """A complete, translated config from the control plane."""

    listeners: tuple[ListenerConfig, ...]
    route_configs: dict[str, RouteConfig]
    clusters: dict[str, ClusterConfig]
    versions: dict[str, str]  # type URL -> version accepted
    # From the listeners' HttpConnectionManagers (the first that sets them); None: the
    # sidecar keeps its own settings.
    tracing: TracingConfig | None = None
    access_log: AccessLogConfig | None = None


@dataclass(slots=True)
class Received:
    """The accepted resources of one type, with the response version that brought each."""

    messages: dict[str, Message] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    version_info: str = ""
    nonce: str = ""
    last_nack: str = ""


@dataclass(slots=True)
class Actions:
    requests: list[discovery_pb2.DiscoveryRequest] = field(default_factory=list)
    snapshot: XdsSnapshot | None = None
    rejected: str | None = None  # the NACK's message, when this response was rejected


class AdsClientState:
    def __init__(
        self,
        node: Any,
        outbound_route_config: str = "outbound",
        check_listeners: Callable[[list[ListenerConfig]], str | None] = lambda _: None,
    ) -> None:
        """``check_listeners`` says whether listeners could be put in force (e.g. bound),
        or why not; it runs when they arrive, before they warm, so a listener that cannot
        bind is NACKed in its own LDS response rather than blocking a later one."""
        self.node = node
        self.outbound_route_config = outbound_route_config
        self.check_listeners = check_listeners
        self.received: dict[str, Received] = {t: Received() for t in TYPES}
        self.subscriptions: dict[str, frozenset[str]] = {ROUTE: frozenset(), ENDPOINT: frozenset()}
        self.applied: XdsSnapshot | None = None
        # An LDS response NACKed only because a listener could not bind: the control plane holds
        # it back, so it is offered to check_listeners again with every later response.
        self.unbindable: discovery_pb2.DiscoveryResponse | None = None

    # -- requests ---------------------------------------------------------------------------

    def _request(self, type_url: str, error: str | None = None) -> discovery_pb2.DiscoveryRequest:
        state = self.received[type_url]
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=state.version_info,
            response_nonce=state.nonce,
            node=self.node,
        )
        if type_url not in WILDCARD:
            request.resource_names.extend(sorted(self.subscriptions[type_url]))
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=INVALID_ARGUMENT, message=error))
        return request

    def initial_requests(self) -> list[discovery_pb2.DiscoveryRequest]:
        """What a new stream starts with: every type, with the versions we already hold.

        Nonces belong to a stream, so a new stream starts without them.
        """
        for state in self.received.values():
            state.nonce = ""
        requests = [self._request(LISTENER), self._request(CLUSTER)]
        requests.extend(self._request(t) for t in (ROUTE, ENDPOINT) if self.subscriptions[t])
        return requests

    # -- responses --------------------------------------------------------------------------

    def on_response(
        self,
        response: discovery_pb2.DiscoveryResponse,
        apply: Callable[[XdsSnapshot], str | None] = lambda _: None,
    ) -> Actions:
        """Handle one response. ``apply`` puts a complete config in force, or returns why not.

        When it cannot, the response is NACKed with that reason and the state goes back to what
        it was, so the config we report as accepted is always the one in force.
        """
        type_url = response.type_url
        actions = Actions()
        state = self.received.get(type_url)
        if state is None:
            return actions  # a type we never asked for; nothing to acknowledge
        if type_url == LISTENER:
            self.unbindable = None  # superseded
        elif self.unbindable is not None:
            retried = self.on_response(self.unbindable, apply)
            if retried.rejected is None:
                actions = retried  # its late ACK goes first
        try:
            decoded = self._decode(type_url, response)
            if type_url == LISTENER:
                listeners = [tr.translate_listener(m) for m in decoded.values()]
                error = self.check_listeners(
                    [x for x in listeners if isinstance(x, ListenerConfig)]
                )
                if error is not None:
                    self.unbindable = response
                    return self._reject(type_url, response.nonce, error)
        except ConfigError as exc:
            return self._reject(type_url, response.nonce, str(exc))
        if type_url in WILDCARD:
            messages = decoded
        else:
            # Named resources: the response carries those it has; others keep their value.
            messages = {
                n: m for n, m in state.messages.items() if n in self.subscriptions[type_url]
            }
            messages.update(decoded)
        previous = (dict(state.messages), dict(state.versions), state.version_info)
        state.messages = messages
        state.versions = {
            n: (response.version_info if n in decoded else state.versions.get(n, ""))
            for n in messages
        }
        try:
            snapshot = self._assemble()
            error = apply(snapshot) if snapshot is not None else None
        except ConfigError as exc:
            error = str(exc)
        if error is not None:
            state.messages, state.versions, state.version_info = previous
            return self._reject(type_url, response.nonce, error)
        if snapshot is not None:
            self.applied = snapshot
        state.version_info = response.version_info
        state.nonce = response.nonce
        state.last_nack = ""
        actions.requests.append(self._request(type_url))  # the ACK
        actions.requests.extend(self._update_subscriptions())
        if snapshot is not None:
            actions.snapshot = snapshot
        return actions

    def _reject(self, type_url: str, nonce: str, message: str) -> Actions:
        state = self.received[type_url]
        state.nonce = nonce
        state.last_nack = message
        return Actions(requests=[self._request(type_url, error=message)], rejected=message)

    def _decode(
        self, type_url: str, response: discovery_pb2.DiscoveryResponse
    ) -> dict[str, Message]:
        cls = _MESSAGES[type_url]
        decoded: dict[str, Message] = {}
        for index, packed in enumerate(response.resources):
            message = cls()
            if not packed.Unpack(message):
                raise ConfigError(
                    f"{SHORT[type_url]}.resources[{index}]", f"expected {cls.DESCRIPTOR.full_name}"
                )
            name = self._name(type_url, message)
            self._check_one(type_url, message)
            decoded[name] = message
        return decoded

    @staticmethod
    def _name(type_url: str, message: Any) -> str:
        return str(message.cluster_name if type_url == ENDPOINT else message.name)

    @staticmethod
    def _check_one(type_url: str, message: Any) -> None:
        """Translate one resource alone, so an invalid one is rejected on arrival."""
        if type_url == LISTENER:
            tr.translate_listener(message)
        elif type_url == ROUTE:
            tr.translate_route_config(message)
        elif type_url == CLUSTER:
            if not is_original_destination(message) and not tr.envoy_only(message):
                tr.translate_cluster(message)
        else:
            tr.translate_endpoints(message)

    def _update_subscriptions(self) -> list[discovery_pb2.DiscoveryRequest]:
        """Ask for the route configs our listeners name and the endpoints our clusters need."""
        wanted = {
            ROUTE: frozenset(self._route_names()),
            ENDPOINT: frozenset(
                name
                for name in (tr.eds_service_name(c) for c in self._clusters().values())
                if name is not None
            ),
        }
        requests = []
        for type_url, names in wanted.items():
            if names != self.subscriptions[type_url]:
                self.subscriptions[type_url] = names
                requests.append(self._request(type_url))
        return requests

    def _listeners(self) -> dict[str, listener_pb2.Listener]:
        return self.received[LISTENER].messages

    def _routes(self) -> dict[str, route_pb2.RouteConfiguration]:
        return self.received[ROUTE].messages

    def _clusters(self) -> dict[str, cluster_pb2.Cluster]:
        return self.received[CLUSTER].messages

    def _endpoints(self) -> dict[str, endpoint_pb2.ClusterLoadAssignment]:
        return self.received[ENDPOINT].messages

    def _route_names(self) -> Iterable[str]:
        for message in self._listeners().values():
            translated = tr.translate_listener(message)
            if translated.route_config is not None:
                yield translated.route_config

    def _assemble(self) -> XdsSnapshot | None:
        """The complete config, or None while something referred to has not arrived."""
        routes_received = self._routes()
        listeners: list[ListenerConfig] = []
        api_routes: list[str] = []
        ports: list[OutboundPort] = []
        route_configs: dict[str, RouteConfig] = {}
        tracing: TracingConfig | None = None
        access_log: AccessLogConfig | None = None
        for _, listener in sorted(self._listeners().items()):
            translated = tr.translate_listener(listener)
            listener_tracing, listener_access_log = tr.translate_telemetry(listener)
            tracing = tracing or listener_tracing
            access_log = access_log or listener_access_log
            route_name = translated.route_config
            if route_name is not None:
                if route_name not in routes_received:
                    return None
                route_configs[route_name] = tr.translate_route_config(
                    routes_received[route_name]
                )
            if isinstance(translated, tr.ApiListener):
                api_routes.append(translated.route_config)
            elif isinstance(translated, OutboundPort):
                ports.append(translated)
            elif isinstance(translated, ListenerConfig):
                listeners.append(translated)
        endpoints = self._endpoints()
        clusters: dict[str, ClusterConfig] = {}
        passthrough: set[str] = set()
        for name, cluster in self._clusters().items():
            if tr.envoy_only(cluster):
                continue
            if is_original_destination(cluster):
                passthrough.add(name)
                continue
            eds_name = tr.eds_service_name(cluster)
            if eds_name is not None and eds_name not in endpoints:
                return None
            assignment = endpoints.get(eds_name) if eds_name is not None else None
            clusters[name] = tr.translate_cluster(cluster, assignment)
        route_configs.update(outbound_route_configs(
            self.outbound_route_config, ports, api_routes, route_configs, passthrough
        ))
        if not listeners and self.outbound_route_config not in route_configs and not clusters:
            return None
        versions = {SHORT[t]: self.received[t].version_info for t in TYPES}
        return XdsSnapshot(
            tuple(listeners), route_configs, clusters, versions, tracing, access_log
        )

    def dump(self) -> list[dict[str, str]]:
        """Every resource held, with its type and version, for /config_dump."""
        rows = []
        for type_url in TYPES:
            state = self.received[type_url]
            for name in sorted(state.messages):
                rows.append(
                    {"type": SHORT[type_url], "name": name, "version": state.versions.get(name, "")}
                )
        return rows
