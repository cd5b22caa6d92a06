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


def run_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """``args.address`` (default 127.0.0.1:15010), optional ``args.timeout`` in seconds."""
    out = out or sys.stdout
    address = getattr(args, "address", None) or DEFAULT_ADDRESS
    timeout = getattr(args, "timeout", None) or 5.0
    with grpc.insecure_channel(address) as channel:
        stub = status_pb2_grpc.ControlPlaneStatusStub(channel)
        try:
            reply = stub.ListProxies(status_pb2.ListProxiesRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            print(f"pilotfish status: {address}: {exc.code().name}: {exc.details()}",
                  file=sys.stderr)
            return 1
    out.write(format_status(reply))
    return 0


def format_status(reply: Any) -> str:
    lines = [f"mesh generation {reply.mesh_generation}"]
    if reply.mesh_error:
        lines.append(f"MESH FILE ERROR (last good mesh still served): {reply.mesh_error}")
    for ignored in reply.proxyless_ignored:
        lines.append(f"proxyless gRPC clients ignore {ignored}")
    if not reply.proxies:
        lines.append("no proxies connected")
        return "\n".join(lines) + "\n"
    rows = [("NODE", "SERVICE", "NAMESPACE", "STREAM", "CONNECTED", "TYPE", "ACKED", "SYNC",
             "LAST NACK")]
    for proxy in reply.proxies:
        since = datetime.fromtimestamp(proxy.connected_since.seconds, UTC)
        head = (proxy.node_id or "-", proxy.service or "-", proxy.namespace or "-",
                proxy.stream_kind, since.strftime("%Y-%m-%dT%H:%M:%SZ"))
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
