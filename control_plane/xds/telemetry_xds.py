"""The mesh's ``telemetry`` block as HttpConnectionManager ``tracing`` and ``access_log``.

- ``tracing.sampling`` → ``tracing.random_sampling`` (a percent);
- ``tracing.otlp_endpoint`` → ``tracing.provider``: ``envoy.tracers.opentelemetry`` with an
  ``OpenTelemetryConfig`` whose ``grpc_service.google_grpc.target_uri`` is ``host:port``, with
  ``channel_credentials.ssl_credentials`` for ``https://``;
- ``tracing.service_name`` → ``OpenTelemetryConfig.service_name`` (default: the proxy's
  own mesh service, or ``pilotfish-sidecar``);
- ``access_log`` → ``access_log[0]``: ``envoy.access_loggers.stdout`` (``StdoutAccessLog``)
  or ``envoy.access_loggers.file`` (``FileAccessLog.path``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import grpc_service_pb2
from envoy.config.trace.v3 import http_tracer_pb2, opentelemetry_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import percent_pb2

from control_plane.mesh_telemetry import MeshAccessLog, MeshTelemetry, MeshTracing
from control_plane.xds.proto_util import pack

OPENTELEMETRY_TRACER = "envoy.tracers.opentelemetry"
STDOUT_LOGGER = "envoy.access_loggers.stdout"
FILE_LOGGER = "envoy.access_loggers.file"
DEFAULT_SERVICE_NAME = "pilotfish-sidecar"


def apply_telemetry(
    hcm: hcm_pb2.HttpConnectionManager, telemetry: MeshTelemetry, own_service: str | None
) -> None:
    if telemetry.tracing is not None:
        hcm.tracing.CopyFrom(tracing(telemetry.tracing, own_service))
    if telemetry.access_log is not None:
        hcm.access_log.append(access_log(telemetry.access_log))


def tracing(config: MeshTracing, own_service: str | None) -> hcm_pb2.HttpConnectionManager.Tracing:
    parts = urlsplit(config.otlp_endpoint)
    google = grpc_service_pb2.GrpcService.GoogleGrpc(
        target_uri=f"{parts.hostname}:{parts.port}"
        if ":" not in (parts.hostname or "") else f"[{parts.hostname}]:{parts.port}",
        stat_prefix="otlp",
    )
    if parts.scheme == "https":
        google.channel_credentials.ssl_credentials.SetInParent()
    otel = opentelemetry_pb2.OpenTelemetryConfig(
        grpc_service=grpc_service_pb2.GrpcService(google_grpc=google),
        service_name=config.service_name or own_service or DEFAULT_SERVICE_NAME,
    )
    return hcm_pb2.HttpConnectionManager.Tracing(
        random_sampling=percent_pb2.Percent(value=config.sampling),
        provider=http_tracer_pb2.Tracing.Http(name=OPENTELEMETRY_TRACER, typed_config=pack(otel)),
    )


def access_log(config: MeshAccessLog) -> accesslog_pb2.AccessLog:
    if config.sink == "file":
        return accesslog_pb2.AccessLog(
            name=FILE_LOGGER, typed_config=pack(file_pb2.FileAccessLog(path=config.path))
        )
    return accesslog_pb2.AccessLog(
        name=STDOUT_LOGGER, typed_config=pack(stream_pb2.StdoutAccessLog())
    )
