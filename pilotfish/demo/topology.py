"""The demo mesh on paper: which processes run, on which ports, with which sidecar bootstrap.

Pure: ports come in from the caller, bootstraps go out as plain dicts (written as YAML by the
runner), so the whole layout can be checked against the bootstrap loader without a socket.

    load driver -> demo-client sidecar (outbound, authority "greeter")
                -> greeter-N sidecar (inbound) -> greeter-N app
                -> greeter-N sidecar (outbound, authority "quotes")
                -> quotes-M sidecar (inbound) -> quotes-M app
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

GREETER = "greeter"
QUOTES = "quotes"
CLIENT_NODE_ID = "demo-client"
SERVED_BY_HEADER = "x-served-by-sidecar"
LOOPBACK = "127.0.0.1"

GREETER_PREFIX = "/pilotfish.demo.v1.Greeter/"
QUOTES_PREFIX = "/pilotfish.demo.v1.Quotes/"
# The client's deadline is longer than the greeter's budget for quotes (services.py), so a slow
# quotes instance shows up as the greeter's DEADLINE_EXCEEDED rather than the client's.
GREETER_ROUTE_TIMEOUT = "5s"
DRAIN_TIMEOUT = "1s"
QUOTES_ROUTE_TIMEOUT = "2s"


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarPlan:
    node_id: str
    admin_port: int
    inbound_port: int | None = None  # in front of the local app
    outbound_port: int | None = None  # where the local app (or load driver) sends its calls

    @property
    def listener_ports(self) -> list[int]:
        return [p for p in (self.outbound_port, self.inbound_port) if p is not None]

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AppPlan:
    name: str  # also the node id of its sidecar, and what replies carry in served_by
    service: str  # GREETER or QUOTES
    port: int
    sidecar: SidecarPlan


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    client: SidecarPlan
    greeters: tuple[AppPlan, ...]
    quotes: tuple[AppPlan, ...]

    @property
    def apps(self) -> tuple[AppPlan, ...]:
        return self.quotes + self.greeters

    @property
    def sidecars(self) -> tuple[SidecarPlan, ...]:
        return (self.client, *(app.sidecar for app in self.apps))


def ports_needed(greeters: int, quotes: int) -> int:
    # client: outbound + admin; greeter: app + inbound + outbound + admin; quotes: no outbound.
    return 2 + 4 * greeters + 3 * quotes


def plan_topology(ports: Iterator[int], *, greeters: int = 2, quotes: int = 2) -> Topology:
    client = SidecarPlan(node_id=CLIENT_NODE_ID, admin_port=next(ports), outbound_port=next(ports))
    quote_apps = tuple(_app(QUOTES, i, ports, outbound=False) for i in range(1, quotes + 1))
    greeter_apps = tuple(_app(GREETER, i, ports, outbound=True) for i in range(1, greeters + 1))
    return Topology(client=client, greeters=greeter_apps, quotes=quote_apps)


def _app(service: str, index: int, ports: Iterator[int], *, outbound: bool) -> AppPlan:
    name = f"{service}-{index}"
    sidecar = SidecarPlan(
        node_id=name,
        admin_port=next(ports),
        inbound_port=next(ports),
        outbound_port=next(ports) if outbound else None,
    )
    return AppPlan(name=name, service=service, port=next(ports), sidecar=sidecar)


def app_argv(app: AppPlan) -> list[str]:
    argv = [
        sys.executable, "-m", "pilotfish.demo.services", app.service,
        "--port", str(app.port), "--name", app.name,
    ]
    if app.service == GREETER:
        assert app.sidecar.outbound_port is not None
        argv += [
            "--quotes-target", f"{LOOPBACK}:{app.sidecar.outbound_port}",
            "--quotes-authority", QUOTES,
        ]
    return argv


def _address(port: int) -> str:
    return f"{LOOPBACK}:{port}"


def _listener(name: str, port: int) -> dict[str, Any]:
    # Each listener has a route config of the same name.
    return {"name": name, "address": _address(port), "route_config": name}


def _outbound_route_config(service: str, prefix: str, timeout: str) -> dict[str, Any]:
    return {
        "name": "outbound",
        "virtual_hosts": [
            {
                "name": service,
                "domains": [service, f"{service}:*"],
                "routes": [
                    {"match": {"prefix": prefix}, "route": {"cluster": service, "timeout": timeout}}
                ],
            }
        ],
    }


def _inbound_route_config(node_id: str) -> dict[str, Any]:
    return {
        "name": "inbound",
        "virtual_hosts": [
            {
                "name": "local",
                "domains": ["*"],
                "routes": [
                    {
                        "match": {"prefix": "/"},
                        "route": {"cluster": "local_app"},
                        "response_headers_to_add": [{"name": SERVED_BY_HEADER, "value": node_id}],
                    }
                ],
            }
        ],
    }


def _cluster(name: str, ports: list[int]) -> dict[str, Any]:
    return {"name": name, "protocol": "http2", "endpoints": [_address(p) for p in ports]}


def sidecar_bootstrap(
    topology: Topology, sidecar: SidecarPlan, *, otlp_endpoint: str | None = None
) -> dict[str, Any]:
    """The static bootstrap of one sidecar, in the format of ``pilotfish.config.bootstrap``.

    With ``otlp_endpoint`` the sidecar traces every request (the load driver marks each call
    sampled) and exports its spans there under its node id as the service name."""
    listeners: list[dict[str, Any]] = []
    route_configs: list[dict[str, Any]] = []
    clusters: list[dict[str, Any]] = []
    app = next((a for a in topology.apps if a.sidecar == sidecar), None)

    if sidecar.outbound_port is not None:
        if app is None:  # the load driver's sidecar
            upstream, prefix, timeout = GREETER, GREETER_PREFIX, GREETER_ROUTE_TIMEOUT
            targets = topology.greeters
        else:
            upstream, prefix, timeout = QUOTES, QUOTES_PREFIX, QUOTES_ROUTE_TIMEOUT
            targets = topology.quotes
        listeners.append(_listener("outbound", sidecar.outbound_port))
        route_configs.append(_outbound_route_config(upstream, prefix, timeout))
        ports = [t.sidecar.inbound_port for t in targets if t.sidecar.inbound_port is not None]
        clusters.append(_cluster(upstream, ports))

    if sidecar.inbound_port is not None:
        assert app is not None, f"{sidecar.node_id} has an inbound listener but no app"
        listeners.append(_listener("inbound", sidecar.inbound_port))
        route_configs.append(_inbound_route_config(sidecar.node_id))
        clusters.append(_cluster("local_app", [app.port]))

    bootstrap: dict[str, Any] = {
        "node_id": sidecar.node_id,
        # The demo stops every process at once: nothing is left to drain after a second.
        "drain_timeout": DRAIN_TIMEOUT,
        "admin": {"address": LOOPBACK, "port": sidecar.admin_port},
        "listeners": listeners,
        "route_configs": route_configs,
        "clusters": clusters,
    }
    if otlp_endpoint is not None:
        bootstrap["tracing"] = {
            "endpoint": otlp_endpoint,
            "sampling": "100%",
            "service_name": sidecar.node_id,
        }
    return bootstrap
