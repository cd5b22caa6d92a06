"""The admin server (default 127.0.0.1:15000), with Envoy's endpoint names.

GET  /ready               200 LIVE once config is applied; 503 before, while draining, or
                          after /healthcheck/fail
GET  /stats               counters and gauges, ``name: value``
GET  /stats/prometheus    the same in Prometheus text format
GET  /clusters            per host: connections, requests, weight, health
GET  /config_dump         the config in force, as JSON
POST /healthcheck/fail    start failing /ready (take this instance out of rotation); with
                          --register, the instance is DRAINING in the registry too
POST /healthcheck/ok      stop failing it
POST /quitquitquit        drain and exit (with --register: deregister first, and wait for
                          the callers' proxies to drop this instance)

Every POST (everything that changes state) is refused with 403 unless it comes from a
loopback address, so an admin bound beyond loopback still cannot be told to fail its health
check or quit by anything outside the pod. The health port (``admin.health_address``, Istio's
15021) is for kubelet probes and serves ``GET /ready`` and ``GET /healthz/ready`` only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import re
from collections.abc import Callable
from typing import Any

from envoy.config.core.v3 import base_pb2

from pilotfish.plainhttp import Response, start_plain_http
from sidecar.server import Sidecar
from sidecar.xds.config_dump import envoy_configs

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, frozenset, set)):
        items = [_jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, re.Pattern):
        return value.pattern
    return value


def _prometheus_name(prefix: str, stat: str) -> tuple[str, str]:
    """(``cluster.quotes``, ``upstream_rq_total``) → (``pilotfish_cluster_upstream_rq_total``,
    ``{cluster="quotes"}``). The scope and the stat come apart, as both may contain dots."""
    kind, _, name = prefix.partition(".")
    labels = ""
    if kind in ("cluster", "http") and name:
        label = "cluster" if kind == "cluster" else "listener"
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        labels = f'{{{label}="{escaped}"}}'
        rest = stat
    else:
        rest = f"{name}.{stat}" if name else stat
    metric_name = re.sub(r"[^a-zA-Z0-9_]", "_", f"pilotfish_{kind}_{rest}")
    return metric_name, labels


class AdminServer:
    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.routes: dict[tuple[str, str], Callable[[], Response]] = {
            ("GET", "/ready"): self.ready,
            ("GET", "/stats"): self.stats,
            ("GET", "/stats/prometheus"): self.prometheus,
            ("GET", "/clusters"): self.clusters,
            ("GET", "/config_dump"): self.config_dump,
            ("POST", "/healthcheck/fail"): self.healthcheck_fail,
            ("POST", "/healthcheck/ok"): self.healthcheck_ok,
            ("POST", "/quitquitquit"): self.quit,
            ("GET", "/"): self.index,
        }
        self.server: asyncio.AbstractServer | None = None
        self.prometheus_server: asyncio.AbstractServer | None = None
        self.health_server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await start_plain_http(
            self.handle, host, port, loopback_only_methods={"POST"}
        )

    async def start_health(self, host: str, port: int) -> None:
        """A port for kubelet probes: readiness only, nothing else to read or change."""
        probes = AdminServer(self.sidecar)
        probes.routes = {("GET", "/ready"): self.ready, ("GET", "/healthz/ready"): self.ready}
        self.health_server = await start_plain_http(probes.handle, host, port)

    async def start_prometheus(self, host: str, port: int) -> None:
        """A port for scrapers that serves only the metrics, as Envoy's 15090 does."""
        scraper = AdminServer(self.sidecar)
        scraper.routes = {
            ("GET", "/stats/prometheus"): self.prometheus,
            ("GET", "/metrics"): self.prometheus,
        }
        self.prometheus_server = await start_plain_http(scraper.handle, host, port)

    def close(self) -> None:
        for server in (self.server, self.prometheus_server, self.health_server):
            if server is not None:
                server.close()

    def handle(self, method: str, target: str) -> Response:
        path = target.split("?", 1)[0]
        handler = self.routes.get((method, path))
        if handler is not None:
            return handler()
        if any(p == path for _, p in self.routes):
            return (
                405,
                "text/plain",
                f"{path} needs another method (POST to change state)\n".encode(),
            )
        return 404, "text/plain", b"not found; GET / lists the endpoints\n"

    # -- endpoints -------------------------------------------------------------------------

    def index(self) -> Response:
        lines = [f"{m:5} {p}" for m, p in self.routes if p != "/"]
        return 200, "text/plain", ("\n".join(lines) + "\n").encode()

    def ready(self) -> Response:
        sc = self.sidecar
        if sc.ready:
            return 200, "text/plain", b"LIVE\n"
        state = (
            "DRAINING"
            if sc.draining
            else "HEALTHCHECK_FAILED"
            if sc.health_check_failed
            else "PRE_INITIALIZING"
        )
        return 503, "text/plain", f"{state}\n".encode()

    def stats(self) -> Response:
        rows = self.sidecar.stats.snapshot()
        body = "".join(f"{name}: {value}\n" for _, name, value in rows)
        return 200, "text/plain", body.encode()

    def prometheus(self) -> Response:
        lines: list[str] = []
        typed: set[str] = set()
        for prefix, scope in sorted(self.sidecar.stats.scopes.items()):
            computed: dict[str, int] = {}
            for source in scope.sources.values():
                computed.update(source())
            groups = (("counter", scope.counters), ("gauge", scope.gauges), ("gauge", computed))
            for kind, values in groups:
                for stat, value in sorted(values.items()):
                    metric, labels = _prometheus_name(prefix, stat)
                    if metric not in typed:
                        typed.add(metric)
                        lines.append(f"# TYPE {metric} {kind}")
                    lines.append(f"{metric}{labels} {value}")
        grouped = _group_by_metric(lines)
        text = self.sidecar.metrics.render() + "\n".join(grouped) + "\n"
        return 200, "text/plain; version=0.0.4", text.encode()

    def clusters(self) -> Response:
        lines: list[str] = []
        for name, cluster in sorted(self.sidecar.clusters.clusters.items()):
            for index, host in enumerate(cluster.hosts):
                prefix = f"{name}::{host.endpoint.address}"
                lines.append(f"{prefix}::cx_active::{len(host.connections)}")
                lines.append(f"{prefix}::rq_active::{host.active_requests}")
                lines.append(f"{prefix}::rq_pending::{len(host.pool.waiters)}")
                lines.append(f"{prefix}::weight::{host.endpoint.weight}")
                lines.append(f"{prefix}::health_flags::{cluster.host_health(index)}")
        return 200, "text/plain", ("\n".join(lines) + "\n").encode()

    def config_dump(self) -> Response:
        sc = self.sidecar
        dump: dict[str, Any] = {
            "bootstrap": _jsonable(sc.bootstrap),
            "last_updated": sc.config_updated_at,
        }
        if sc.config_dump_extra is not None:
            dump.update(sc.config_dump_extra())
        else:
            # No control plane: everything is static, shown as Envoy shows its static parts.
            node = base_pb2.Node(id=sc.bootstrap.node_id)
            loaded = sc.config_updated_at or sc.started_at
            dump["configs"] = envoy_configs(node, None, loaded, sc.bootstrap, loaded)
        return 200, "application/json", json.dumps(dump, indent=2).encode()

    def healthcheck_fail(self) -> Response:
        self.sidecar.set_health_check_failed(True)
        return 200, "text/plain", b"OK\n"

    def healthcheck_ok(self) -> Response:
        self.sidecar.set_health_check_failed(False)
        return 200, "text/plain", b"OK\n"

    def quit(self) -> Response:
        self.sidecar.request_stop()
        return 200, "text/plain", b"OK\n"


def _group_by_metric(lines: list[str]) -> list[str]:
    """Prometheus wants all samples of a metric together, after its TYPE line."""
    order: list[str] = []
    groups: dict[str, list[str]] = {}
    for line in lines:
        metric = line.split(" ")[2] if line.startswith("# TYPE") else re.split(r"[{ ]", line)[0]
        if metric not in groups:
            groups[metric] = []
            order.append(metric)
        groups[metric].append(line)
    return [line for metric in order for line in groups[metric]]
