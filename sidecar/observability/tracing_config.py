"""Tracing settings, and the standard ``OTEL_*`` environment variables applied over them.

Environment variables win over the configured values, as the OpenTelemetry spec asks; a value
that does not parse is logged and ignored. Durations follow the spec (milliseconds), including
``OTEL_EXPORTER_OTLP_TIMEOUT`` (the Python SDK alone reads that one as seconds).

=====================================  ==============================================
variable                               effect
=====================================  ==============================================
OTEL_SDK_DISABLED=true                 tracing off
OTEL_TRACES_EXPORTER=none              tracing off
(an OTLP endpoint variable below)      tracing on, unless one of the two above says off
OTEL_SERVICE_NAME                      ``service_name``
OTEL_RESOURCE_ATTRIBUTES               extra resource attributes (``k=v,k2=v2``)
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT     ``endpoint`` (before OTEL_EXPORTER_OTLP_ENDPOINT)
OTEL_EXPORTER_OTLP_ENDPOINT            ``endpoint``; a base URL: http/protobuf adds
                                       ``/v1/traces`` to its path
OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL   ``protocol``: grpc or http/protobuf
OTEL_EXPORTER_OTLP[_TRACES]_INSECURE   ``insecure``
OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT    ``export_timeout_s`` (ms)
OTEL_EXPORTER_OTLP[_TRACES]_HEADERS    ``headers`` (``k=v,k2=v2``, values URL-encoded)
OTEL_EXPORTER_OTLP[_TRACES]_COMPRESSION  ``compression``: none, gzip or deflate
OTEL_EXPORTER_OTLP[_TRACES]_CERTIFICATE  ``certificate`` (CA bundle for TLS)
OTEL_EXPORTER_OTLP[_TRACES]_CLIENT_CERTIFICATE, ..._CLIENT_KEY  ``client_certificate``,
                                       ``client_key`` (mutual TLS)
OTEL_TRACES_SAMPLER                    always_on, always_off, traceidratio,
                                       parentbased_always_on, parentbased_always_off,
                                       parentbased_traceidratio
OTEL_TRACES_SAMPLER_ARG                ``sample_ratio`` for the ``*traceidratio`` samplers
OTEL_PROPAGATORS                       ``propagators`` (tracecontext, b3, b3multi, none)
OTEL_BSP_MAX_QUEUE_SIZE                ``max_queue_size``
OTEL_BSP_MAX_EXPORT_BATCH_SIZE         ``max_export_batch_size``
OTEL_BSP_SCHEDULE_DELAY                ``schedule_delay_s`` (ms)
=====================================  ==============================================
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

log = logging.getLogger("pilotfish.tracing")

T = TypeVar("T")

_SAMPLERS = {
    # name: (parent_based, fixed ratio or None to take OTEL_TRACES_SAMPLER_ARG)
    "always_on": (False, 1.0),
    "always_off": (False, 0.0),
    "traceidratio": (False, None),
    "parentbased_always_on": (True, 1.0),
    "parentbased_always_off": (True, 0.0),
    "parentbased_traceidratio": (True, None),
}

PROTOCOLS = ("grpc", "http/protobuf")
COMPRESSIONS = ("none", "gzip", "deflate")
# Where each protocol exports when no endpoint is configured (the OTLP defaults, on loopback).
DEFAULT_ENDPOINTS = {
    "grpc": "http://127.0.0.1:4317",
    "http/protobuf": "http://127.0.0.1:4318/v1/traces",
}
HTTP_TRACES_PATH = "/v1/traces"


def split_endpoint(endpoint: str) -> SplitResult:
    """``endpoint`` as URL parts; raises ``ValueError`` naming what is wrong with it.

    Accepted: ``http://host:port[/path]``, ``https://...``, or ``host:port`` without a scheme
    (TLS or not then follows ``insecure``)."""
    # "collector:4317" has no scheme; "//" makes urlsplit read it as host and port.
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    if parts.scheme not in ("", "http", "https"):
        raise ValueError(f"endpoint {endpoint!r}: the scheme must be http or https")
    if not parts.hostname:
        raise ValueError(f"endpoint {endpoint!r} names no host")
    parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    return parts


@dataclass(frozen=True, slots=True)
class TracingConfig:
    enabled: bool = False
    service_name: str = "pilotfish-sidecar"
    # "" exports to the protocol's default (``DEFAULT_ENDPOINTS``). For grpc only the host and
    # port count; for http/protobuf it is the URL spans are POSTed to, ``/v1/traces`` when it
    # has no path.
    endpoint: str = ""
    protocol: str = "grpc"
    insecure: bool = True
    sample_ratio: float = 1.0
    parent_based: bool = True
    propagators: tuple[str, ...] = ("tracecontext", "b3multi")
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_s: float = 1.0
    export_timeout_s: float = 10.0
    shutdown_timeout_s: float = 5.0
    resource: tuple[tuple[str, str], ...] = ()  # extra resource attributes
    headers: tuple[tuple[str, str], ...] = ()  # sent with every export (e.g. an API key)
    compression: str = "none"
    # CA bundle that verifies the collector (default: the system's roots; requests' for HTTP)
    certificate: str = ""
    client_certificate: str = ""  # with client_key: this sidecar's certificate (mutual TLS)
    client_key: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"tracing.sample_ratio: {self.sample_ratio} is not in [0, 1]")
        if self.max_queue_size < 1 or self.max_export_batch_size < 1:
            raise ValueError("tracing.max_queue_size and max_export_batch_size must be >= 1")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"tracing.protocol: {self.protocol!r} is not one of {PROTOCOLS}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"tracing.compression: {self.compression!r} is not one of {COMPRESSIONS}"
            )

    @property
    def export_endpoint(self) -> str:
        """``endpoint``, or the protocol's default when none is configured."""
        return self.endpoint or DEFAULT_ENDPOINTS[self.protocol]

    def with_env(self, environ: Mapping[str, str] | None = None) -> TracingConfig:
        """This config with the ``OTEL_*`` variables of ``environ`` (default ``os.environ``)."""
        env = os.environ if environ is None else environ
        changes: dict[str, Any] = {}

        def take(name: str, field: str, parse: Callable[[str], T]) -> None:
            raw = env.get(name)
            if raw is None or not raw.strip():
                return
            try:
                changes[field] = parse(raw.strip())
            except ValueError:
                log.warning("ignoring %s=%r: not a valid value", name, raw)

        # Naming an OTLP endpoint turns tracing on (the spec's default exporter is OTLP);
        # the two variables below turn it off again.
        endpoint_set = any(
            env.get(name, "").strip()
            for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        )
        if endpoint_set and not self.enabled:
            changes["enabled"] = True
        if _true(env.get("OTEL_SDK_DISABLED", "")):
            changes["enabled"] = False
        if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
            changes["enabled"] = False
        take("OTEL_SERVICE_NAME", "service_name", str)
        # Generic variable first, so the per-signal one (taken second) wins.
        take("OTEL_EXPORTER_OTLP_PROTOCOL", "protocol", _protocol)
        take("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "protocol", _protocol)
        take("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "endpoint", _endpoint)
        base_endpoint = False
        if "endpoint" not in changes:
            take("OTEL_EXPORTER_OTLP_ENDPOINT", "endpoint", _endpoint)
            base_endpoint = "endpoint" in changes
        take("OTEL_EXPORTER_OTLP_INSECURE", "insecure", _boolean)
        take("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "insecure", _boolean)
        take("OTEL_EXPORTER_OTLP_TIMEOUT", "export_timeout_s", _millis)
        take("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "export_timeout_s", _millis)
        take("OTEL_EXPORTER_OTLP_HEADERS", "headers", _headers)
        take("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "headers", _headers)
        take("OTEL_EXPORTER_OTLP_COMPRESSION", "compression", _compression)
        take("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "compression", _compression)
        for suffix in ("CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"):
            take(f"OTEL_EXPORTER_OTLP_{suffix}", suffix.lower(), str)
            take(f"OTEL_EXPORTER_OTLP_TRACES_{suffix}", suffix.lower(), str)
        if base_endpoint and changes.get("protocol", self.protocol) == "http/protobuf":
            # The generic variable names the collector, not the signal's URL (OTLP spec).
            changes["endpoint"] = changes["endpoint"].rstrip("/") + HTTP_TRACES_PATH
        take("OTEL_PROPAGATORS", "propagators", _propagators)
        take("OTEL_BSP_MAX_QUEUE_SIZE", "max_queue_size", _positive_int)
        take("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "max_export_batch_size", _positive_int)
        take("OTEL_BSP_SCHEDULE_DELAY", "schedule_delay_s", _millis)
        self._sampler_from_env(env, changes)
        return dataclasses.replace(self, **changes) if changes else self

    def _sampler_from_env(self, env: Mapping[str, str], changes: dict[str, Any]) -> None:
        name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        if name and name not in _SAMPLERS:
            log.warning("ignoring OTEL_TRACES_SAMPLER=%r: not a supported sampler", name)
            name = ""
        ratio: float | None = None
        if name:
            changes["parent_based"], ratio = _SAMPLERS[name]
        if ratio is None and arg and (not name or name.endswith("traceidratio")):
            try:
                ratio = float(arg)
            except ValueError:
                ratio = None
            if ratio is None or not 0.0 <= ratio <= 1.0:
                log.warning("ignoring OTEL_TRACES_SAMPLER_ARG=%r: not a ratio in [0, 1]", arg)
                ratio = None
        if ratio is not None:
            changes["sample_ratio"] = ratio


def _true(raw: str) -> bool:
    return raw.strip().lower() == "true"


def _boolean(raw: str) -> bool:
    if raw.lower() not in ("true", "false"):
        raise ValueError(raw)
    return raw.lower() == "true"


def _millis(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError(raw)
    return value / 1000


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def _endpoint(raw: str) -> str:
    split_endpoint(raw)
    return raw


def _protocol(raw: str) -> str:
    if raw not in PROTOCOLS:
        raise ValueError(raw)
    return raw


def _compression(raw: str) -> str:
    if raw.lower() not in COMPRESSIONS:
        raise ValueError(raw)
    return raw.lower()


def _headers(raw: str) -> tuple[tuple[str, str], ...]:
    """``k1=v1,k2=v2`` with URL-encoded values, as the OTLP exporter spec writes them."""
    headers = []
    for item in raw.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not key:
            raise ValueError(item)
        headers.append((key, unquote(value.strip())))
    return tuple(headers)


def _propagators(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower() for n in raw.split(",") if n.strip())
    return () if names == ("none",) else names
