"""The mesh file's ``telemetry`` block: tracing and access logs every proxy is told to use.

.. code-block:: yaml

    telemetry:
      tracing:
        sampling: 1%                          # of requests that start a trace; default 100%
        otlp_endpoint: http://jaeger:4317     # required; http:// plaintext, https:// TLS
        service_name: pilotfish-sidecar       # default: each proxy's own mesh service name
      access_log:
        sink: stdout                          # stdout | file; default stdout
        path: /var/log/pilotfish/access.log   # required with sink: file

The control plane carries tracing in the HttpConnectionManager's ``tracing`` field
(``random_sampling`` and an ``envoy.tracers.opentelemetry`` provider with a ``google_grpc``
target) and access logs in its ``access_log`` list (``envoy.access_loggers.stdout`` or
``envoy.access_loggers.file``), so Envoy understands them too.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from pilotfish.config.fields import Node


@dataclass(frozen=True, slots=True)
class MeshTracing:
    otlp_endpoint: str
    """required: ``http://host:port`` (plaintext gRPC) or ``https://host:port`` (TLS)."""
    sampling: float = 100.0
    """``100%``: the percentage of requests without a sampled parent that start a trace."""
    service_name: str | None = None
    """none: each proxy reports its own mesh service name (or ``pilotfish-sidecar``)."""


@dataclass(frozen=True, slots=True)
class MeshAccessLog:
    sink: str = "stdout"
    """``stdout``; or ``file``, which needs ``path``."""
    path: str = ""


@dataclass(frozen=True, slots=True)
class MeshTelemetry:
    tracing: MeshTracing | None = None
    """none: proxies keep their own tracing settings."""
    access_log: MeshAccessLog | None = None
    """none: proxies keep their own access log settings."""


def parse_telemetry(node: Node) -> MeshTelemetry:
    if node.value is None:
        return MeshTelemetry()
    node.mapping({"tracing", "access_log"})
    return MeshTelemetry(
        tracing=_parse_tracing(node.get("tracing")) if node.has("tracing") else None,
        access_log=_parse_access_log(node.get("access_log")) if node.has("access_log") else None,
    )


def _parse_tracing(node: Node) -> MeshTracing:
    node.mapping({"sampling", "otlp_endpoint", "service_name"})
    endpoint_node = node.require("otlp_endpoint")
    endpoint = endpoint_node.as_str()
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise endpoint_node.error("expected a URL like http://jaeger:4317")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise endpoint_node.error("expected a URL with a port, like http://jaeger:4317")
    return MeshTracing(
        otlp_endpoint=endpoint.rstrip("/"),
        sampling=_parse_percent(node.get("sampling"), 100.0),
        service_name=node.get("service_name").as_str() if node.has("service_name") else None,
    )


def _parse_percent(node: Node, default: float) -> float:
    """``1%``, ``0.5%`` or a plain number, meaning percent."""
    value = node.value
    if value is None:
        return default
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1])
        except ValueError:
            raise node.error("expected a percentage like 1% or 0.5%") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise node.error("expected a percentage between 0% and 100%")
    return float(value)


def _parse_access_log(node: Node) -> MeshAccessLog:
    node.mapping({"sink", "path"})
    sink = node.get("sink").as_choice(("stdout", "file"), "stdout")
    if sink == "file":
        return MeshAccessLog(sink=sink, path=node.require("path").as_str())
    if node.has("path"):
        raise node.get("path").error("only with sink: file")
    return MeshAccessLog(sink=sink)
