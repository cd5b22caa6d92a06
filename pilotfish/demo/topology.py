"""The demo mesh on paper: which processes run, on which ports, and the mesh file of each phase.

Pure: ports come in from the caller; the sidecars' command lines and the mesh file go out as
plain lists and dicts (the runner writes the mesh file as YAML), so the layout can be checked
against the mesh file's own parser without a socket.

    load driver -> demo-client sidecar (outbound, authority "greeter")
                -> greeter-N sidecar (inbound) -> greeter-N app
                -> greeter-N sidecar (outbound, authority "quotes")
                -> quotes-M sidecar (inbound) -> quotes-M app

Every sidecar takes its config from the control plane over ADS, and every app's sidecar
registers its app (once it answers its gRPC health check) in the control plane's registry,
labelled with the app's version: the quotes instances are v1 but the last, which is v2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

GREETER = "greeter"
QUOTES = "quotes"
QUOTES_CANARY = "quotes-v2"
CLIENT = "demo-client"
CLIENT_NODE_ID = CLIENT
LOOPBACK = "127.0.0.1"

GREETER_PREFIX = "/pilotfish.demo.v1.Greeter/"
QUOTES_PREFIX = "/pilotfish.demo.v1.Quotes/"
GREETER_ROUTE = "hello"
QUOTES_ROUTE = "quote"
# The client's deadline is longer than the greeter's budget for quotes (services.py), so a slow
# quotes instance shows up as the greeter's DEADLINE_EXCEEDED rather than the client's.
GREETER_ROUTE_TIMEOUT = "5s"
QUOTES_ROUTE_TIMEOUT = "2s"
# Registered instances renew their lease this often (three missed: evicted), and a sidecar that
# is told to stop waits at most two of these for its callers to drop it: short, for a demo.
HEARTBEAT_INTERVAL = 0.5
HEALTH_INTERVAL = 0.2
V1, V2 = "v1", "v2"


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarPlan:
    node_id: str
    service: str
    admin_port: int
    outbound_port: int  # where the local app (or load driver) sends its calls
    inbound_port: int | None = None  # in front of the local app

    @property
    def listener_ports(self) -> list[int]:
        return [p for p in (self.outbound_port, self.inbound_port) if p is not None]

    @property
    def admin_address(self) -> str:
        return f"{LOOPBACK}:{self.admin_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_address}"

    @property
    def inbound_address(self) -> str | None:
        return None if self.inbound_port is None else f"{LOOPBACK}:{self.inbound_port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AppPlan:
    name: str  # also the node id of its sidecar, and what replies carry in served_by
    service: str  # GREETER or QUOTES
    version: str  # the registry label version=...
    port: int
    sidecar: SidecarPlan


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology:
    xds_port: int
    client: SidecarPlan
    greeters: tuple[AppPlan, ...]
    quotes: tuple[AppPlan, ...]

    @property
    def xds_address(self) -> str:
        return f"{LOOPBACK}:{self.xds_port}"

    @property
    def apps(self) -> tuple[AppPlan, ...]:
        return self.quotes + self.greeters

    @property
    def sidecars(self) -> tuple[SidecarPlan, ...]:
        return (self.client, *(app.sidecar for app in self.apps))

    def quotes_of(self, version: str) -> tuple[AppPlan, ...]:
        return tuple(q for q in self.quotes if q.version == version)


def ports_needed(greeters: int, quotes: int) -> int:
    # control plane; client: outbound + admin; each app: app + inbound + outbound + admin.
    return 1 + 2 + 4 * (greeters + quotes)


def plan_topology(ports: Iterator[int], *, greeters: int = 2, quotes: int = 3) -> Topology:
    """``quotes`` instances: all v1 but the last, the v2 canary (at least one v1 and one v2)."""
    if greeters < 1 or quotes < 2:
        raise ValueError("the demo needs a greeter and two quotes instances (v1 and v2)")
    xds_port = next(ports)
    client = SidecarPlan(
        node_id=CLIENT_NODE_ID, service=CLIENT, admin_port=next(ports), outbound_port=next(ports)
    )
    quote_apps = tuple(
        _app(QUOTES, i, V2 if i == quotes else V1, ports) for i in range(1, quotes + 1)
    )
    greeter_apps = tuple(_app(GREETER, i, V1, ports) for i in range(1, greeters + 1))
    return Topology(xds_port=xds_port, client=client, greeters=greeter_apps, quotes=quote_apps)


def _app(service: str, index: int, version: str, ports: Iterator[int]) -> AppPlan:
    name = f"{service}-{index}"
    sidecar = SidecarPlan(
        node_id=name,
        service=service,
        admin_port=next(ports),
        inbound_port=next(ports),
        outbound_port=next(ports),
    )
    return AppPlan(name=name, service=service, version=version, port=next(ports), sidecar=sidecar)


def app_argv(app: AppPlan) -> list[str]:
    argv = [
        sys.executable, "-m", "pilotfish.demo.services", app.service,
        "--port", str(app.port), "--name", app.name,
    ]  # fmt: skip
    if app.service == GREETER:
        argv += [
            "--quotes-target", f"{LOOPBACK}:{app.sidecar.outbound_port}",
            "--quotes-authority", QUOTES,
        ]  # fmt: skip
    return argv


def control_plane_args(topology: Topology, mesh_path: str) -> list[str]:
    """The arguments of ``pilotfish control-plane`` (after the program)."""
    return [
        "--config", mesh_path, "--address", LOOPBACK, "--port", str(topology.xds_port),
        "--registry-heartbeat-interval", str(HEARTBEAT_INTERVAL),
    ]  # fmt: skip


def sidecar_args(topology: Topology, sidecar: SidecarPlan) -> list[str]:
    """The arguments of ``pilotfish sidecar`` (after the program): config over ADS, and for an
    app's sidecar the inbound listener and the registration of its app."""
    args = [
        "--xds", topology.xds_address, "--node-id", sidecar.node_id,
        "--service", sidecar.service,
        "--outbound-address", f"{LOOPBACK}:{sidecar.outbound_port}",
        "--admin-address", sidecar.admin_address,
    ]  # fmt: skip
    app = next((a for a in topology.apps if a.sidecar == sidecar), None)
    if app is not None:
        assert sidecar.inbound_address is not None
        args += [
            "--app-address", f"{LOOPBACK}:{app.port}",
            "--inbound-address", sidecar.inbound_address,
            "--register", "--register-label", f"version={app.version}",
            "--register-health-interval", str(HEALTH_INTERVAL),
        ]  # fmt: skip
    return args


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotesPolicy:
    """What the phases change: how the greeters' sidecars route calls to quotes."""

    canary_percent: int = 0  # share of quotes calls sent to the v2 subset
    abort_percent: int = 0  # share of quotes calls aborted with UNAVAILABLE by the caller's sidecar


def mesh_file(policy: QuotesPolicy) -> dict[str, Any]:
    """The mesh file (see docs/mesh-reference.md) for one phase of the demo."""
    quote_route: dict[str, Any] = {
        "name": QUOTES_ROUTE,
        "match": {"prefix": QUOTES_PREFIX},
        "timeout": QUOTES_ROUTE_TIMEOUT,
    }
    if policy.canary_percent:
        quote_route["split"] = {
            QUOTES: 100 - policy.canary_percent,
            QUOTES_CANARY: policy.canary_percent,
        }
    if policy.abort_percent:
        quote_route["fault"] = {
            "abort": {"grpc_status": "unavailable", "percentage": policy.abort_percent}
        }
    services: dict[str, Any] = {
        # The load driver's sidecar: a registry service with no instances, calling greeter.
        CLIENT: {"discovery": "registry", "depends_on": [GREETER]},
        GREETER: {
            "protocol": "grpc",
            "discovery": "registry",
            "depends_on": [QUOTES],
            "routes": [
                {
                    "name": GREETER_ROUTE,
                    "match": {"prefix": GREETER_PREFIX},
                    "timeout": GREETER_ROUTE_TIMEOUT,
                    # A greeter that failed because quotes did answers UNAVAILABLE before any
                    # reply (trailers only): the client's sidecar tries another greeter.
                    "retry": {
                        "attempts": 2,
                        "retry_on": ["connect-failure", "refused-stream", "unavailable"],
                    },
                }
            ],
            # A dozen processes share this machine: their latency spikes come from it, not
            # from an app past its capacity, which is what load shedding is for.
            "load_shedding": "off",
        },
        QUOTES: {
            "protocol": "grpc",
            "discovery": "registry",
            "registry": {"labels": {"version": V1}},
            "depends_on": [],
            "load_balancing": {"policy": "round_robin"},
            "routes": [quote_route],
            "load_shedding": "off",
        },
    }
    if policy.canary_percent:
        services[QUOTES_CANARY] = {
            "protocol": "grpc",
            "discovery": "registry",
            "registry": {"service": QUOTES, "labels": {"version": V2}},
            "depends_on": [],
            "load_shedding": "off",
        }
    return {"services": services}

