"""``pilotfish proxy-config NODE``: one sidecar's listeners, routes, clusters and endpoints (with
their health), as tables.

The control plane tells where the node's admin interface is (the sidecar sends it in its node
metadata); the config and the health come from that admin interface (``/config_dump`` and
``/clusters``), so what is shown is what the sidecar runs, not what it was sent.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

from control_plane.status_cli import list_proxies


def run_proxy_config(args: argparse.Namespace, out: TextIO | None = None) -> int:
    admin = args.admin
    if not admin:
        reply = list_proxies(args, "proxy-config")
        if reply is None:
            return 1
        found = [p for p in reply.proxies if p.node_id == args.node]
        if not found:
            print(f"pilotfish proxy-config: no proxy {args.node!r} is connected to "
                  f"{args.address}", file=sys.stderr)
            return 1
        admin = found[0].admin_address
        if not admin:
            print(f"pilotfish proxy-config: {args.node!r} did not say where its admin "
                  "interface is; give --admin HOST:PORT", file=sys.stderr)
            return 1
    try:
        dump = json.loads(_get(admin, "/config_dump", args.timeout))
        health = parse_clusters(_get(admin, "/clusters", args.timeout))
    except (OSError, ValueError) as exc:
        print(f"pilotfish proxy-config: admin {admin}: {exc}", file=sys.stderr)
        return 1
    (out or sys.stdout).write(format_proxy_config(args.node, admin, dump, health))
    return 0


def _get(admin: str, path: str, timeout: float) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=timeout) as response:
        body: bytes = response.read()
        return body.decode()


def parse_clusters(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """``/clusters`` lines ``cluster::address::stat::value`` → {(cluster, address): stats}."""
    hosts: dict[tuple[str, str], dict[str, str]] = {}
    for line in text.splitlines():
        parts = line.split("::")
        if len(parts) == 4:
            cluster, address, stat, value = parts
            hosts.setdefault((cluster, address), {})[stat] = value
    return hosts


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _seconds(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def _match(match: dict[str, Any]) -> str:
    path = match.get("path") or {}
    parts = [f"{kind} {path[kind]}" for kind in ("prefix", "exact", "regex") if path.get(kind)]
    parts += [f"header {h['name']}" for h in match.get("headers") or ()]
    if match.get("methods"):
        parts.append("methods " + ",".join(match["methods"]))
    return "; ".join(parts) or "any"


def _destination(listener: dict[str, Any]) -> str:
    if listener.get("route_config"):
        return f"route config {listener['route_config']}"
    if listener.get("tcp_passthrough_cluster"):
        return f"tcp to cluster {listener['tcp_passthrough_cluster']}"
    if listener.get("tcp_passthrough_original_destination"):
        return "tcp to the original destination"
    return "-"


def format_proxy_config(
    node: str, admin: str, dump: dict[str, Any], health: dict[tuple[str, str], dict[str, str]]
) -> str:
    bootstrap = dump.get("bootstrap") or {}
    lines = [f"proxy {node} (admin http://{admin})", "", "LISTENERS"]
    rows: list[list[str]] = [["NAME", "ADDRESS", "DESTINATION"]]
    for listener in bootstrap.get("listeners") or ():
        rows.append([listener["name"], f"{listener['host']}:{listener['port']}",
                     _destination(listener)])
    lines += _table(rows)

    lines += ["", "ROUTES"]
    rows = [["ROUTE CONFIG", "VIRTUAL HOST", "DOMAINS", "MATCH", "CLUSTERS", "TIMEOUT"]]
    for name, config in sorted((bootstrap.get("route_configs") or {}).items()):
        for vhost in config.get("virtual_hosts") or ():
            for route in vhost.get("routes") or ():
                action = route.get("action") or {}
                clusters: list[dict[str, Any]] = action.get("clusters") or []
                targets = (
                    clusters[0]["name"] if len(clusters) == 1
                    else ", ".join(f"{c['name']} {c['weight']}" for c in clusters)
                )
                rows.append([name, vhost.get("name", ""), ",".join(vhost.get("domains") or ()),
                             _match(route.get("match") or {}), targets,
                             _seconds(action.get("timeout"))])
    lines += _table(rows)

    lines += ["", "CLUSTERS"]
    rows = [["NAME", "PROTOCOL", "LOAD BALANCING", "ENDPOINTS", "HEALTHY"]]
    endpoint_rows: list[list[str]] = [["CLUSTER", "ADDRESS", "WEIGHT", "HEALTH", "ACTIVE REQUESTS"]]
    for name, cluster in sorted((bootstrap.get("clusters") or {}).items()):
        endpoints = cluster.get("endpoints") or ()
        healthy = 0
        for endpoint in endpoints:
            stats = health.get((name, endpoint["address"]), {})
            state = stats.get("health_flags", "unknown")
            healthy += state == "healthy"
            endpoint_rows.append([name, endpoint["address"], str(endpoint.get("weight", 1)),
                                  state, stats.get("rq_active", "-")])
        lb = (cluster.get("lb_policy") or {}).get("kind", "-")
        rows.append([name, str(cluster.get("protocol", "-")), lb, str(len(endpoints)),
                     str(healthy)])
    lines += _table(rows)
    lines += ["", "ENDPOINTS", *_table(endpoint_rows)]
    return "\n".join(lines) + "\n"
