"""``pilotfish status``: print the proxies connected to a control plane, as a table."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import grpc

from control_plane.xds.types import SHORT_NAMES
from pilotfish.gen.pilotfish.status.v1 import status_pb2, status_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:15010"


def list_proxies(args: argparse.Namespace, command: str) -> Any | None:
    address = getattr(args, "address", None) or DEFAULT_ADDRESS
    timeout = getattr(args, "timeout", None) or 5.0
    with grpc.insecure_channel(address) as channel:
        stub = status_pb2_grpc.ControlPlaneStatusStub(channel)
        try:
            return stub.ListProxies(status_pb2.ListProxiesRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"pilotfish {command}: {address}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return None


def run_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``args.address`` (default 127.0.0.1:15010), optional ``args.timeout`` in seconds."""
    reply = list_proxies(args, "status")
    if reply is None:
        return 1
    (out or sys.stdout).write(format_status(reply))
    return 0


def run_proxy_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``pilotfish proxy-status [NODE]``: exit code 0 when every proxy shown is in sync."""
    reply = list_proxies(args, "proxy-status")
    if reply is None:
        return 1
    node = getattr(args, "node", None)
    proxies = [p for p in reply.proxies if node is None or p.node_id == node]
    if node is not None and not proxies:
        print(f"pilotfish proxy-status: no proxy {node!r} is connected", file=sys.stderr)
        return 1
    (out or sys.stdout).write(format_proxy_status(proxies))
    return 0 if all(p.in_sync for p in proxies) else 3


# xDS types in the order istioctl and Envoy users read them.
_COLUMNS = ("CDS", "LDS", "EDS", "RDS")


def type_state(t: Any) -> str:
    """SYNCED: acked what the control plane has now; NACKED: rejected the last version sent;
    STALE: acked an older version (a newer one is on its way or held back)."""
    if t.in_sync:
        return "SYNCED"
    if t.last_nack_version and t.last_nack_version == t.sent_version:
        return "NACKED"
    return "STALE"


def format_proxy_status(proxies: list[Any]) -> str:
    """A row per proxy with each xDS type's state and acked/current versions, then, for each
    type not in sync, the resource names that differ."""
    if not proxies:
        return "no proxies connected\n"
    rows: list[tuple[str, ...]] = [("NODE", "SERVICE", *_COLUMNS)]
    details: list[str] = []
    for proxy in proxies:
        by_type = {SHORT_NAMES.get(t.type_url, t.type_url): t for t in proxy.resources}
        cells = []
        for column in _COLUMNS:
            t = by_type.get(column)
            cells.append("NOT SENT" if t is None else type_state(t))
        rows.append((proxy.node_id or "-", proxy.service or "-", *cells))
        for column in _COLUMNS:
            t = by_type.get(column)
            if t is None or t.in_sync:
                continue
            details.append(
                f"{proxy.node_id} {column}: acked {t.acked_version or '-'}, "
                f"control plane has {t.current_version or '-'}"
            )
            details += [f"  + {name}" for name in t.added]
            details += [f"  ~ {name}" for name in t.changed]
            details += [f"  - {name}" for name in t.removed]
            if t.last_nack_message:
                details.append(f"  rejected {t.last_nack_version}: {t.last_nack_message}")
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    if details:
        lines += ["", *details]
    return "\n".join(lines) + "\n"


def _utc(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_status(reply: Any) -> str:
    lines = [f"mesh generation {reply.mesh_generation}"]
    if reply.mesh_error:
        lines.append(f"MESH FILE ERROR (last good mesh still served): {reply.mesh_error}")
    for ignored in reply.proxyless_ignored:
        lines.append(f"proxyless gRPC clients ignore {ignored}")
    if not reply.proxies:
        lines.append("no proxies connected")
        return "\n".join(lines) + "\n"
    rows = [("NODE", "SERVICE", "NAMESPACE", "IDENTITY", "CERT EXPIRES", "STREAM", "CONNECTED",
             "TYPE", "ACKED", "SYNC", "LAST NACK")]
    for proxy in reply.proxies:
        # IDENTITY is what the proxy proved with its certificate (mTLS port); "-" means it
        # connected in plaintext and SERVICE is only what it claimed.
        expires = (
            _utc(proxy.certificate_expires.seconds)
            if proxy.HasField("certificate_expires")
            else "-"
        )
        head = (proxy.node_id or "-", proxy.service or "-", proxy.namespace or "-",
                proxy.spiffe_id or "-", expires, proxy.stream_kind,
                _utc(proxy.connected_since.seconds))
        if not proxy.resources:
            rows.append((*head, "-", "-", "-", ""))
        for i, t in enumerate(proxy.resources):
            nack = f"{t.last_nack_version}: {t.last_nack_message}" if t.last_nack_message else ""
            rows.append((
                *(head if i == 0 else ("",) * len(head)),
                SHORT_NAMES.get(t.type_url, t.type_url),
                t.acked_version or "-",
                "yes" if t.in_sync else "NO",
                nack,
            ))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"
