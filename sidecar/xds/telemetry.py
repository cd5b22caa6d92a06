"""Tracing and access-log settings from a listener's HttpConnectionManager.

The control plane's mapping (``control_plane/xds/telemetry_xds.py``) in reverse:
``tracing.random_sampling`` → ``TracingConfig.sample_ratio``; an ``envoy.tracers.opentelemetry``
provider's ``grpc_service.google_grpc.target_uri`` → ``endpoint`` (``https://`` with
``ssl_credentials``, else ``http://`` and ``insecure``); its ``service_name`` →
``service_name``; ``access_log[0]`` of type ``StdoutAccessLog`` or ``FileAccessLog`` →
``AccessLogConfig``. ``None`` means the HCM says nothing, so the sidecar keeps its own.
"""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.trace.v3 import opentelemetry_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2
from envoy.extensions.access_loggers.stream.v3 import stream_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from pilotfish.config.errors import ConfigError
from sidecar.observability.access_log import AccessLogConfig
from sidecar.observability.tracing_config import TracingConfig
from sidecar.xds.common import type_name, unpack, unsupported

HCM_TYPE = hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name


def translate_telemetry(
    listener: listener_pb2.Listener,
) -> tuple[TracingConfig | None, AccessLogConfig | None]:
    """The listener's tracing and access log, or ``None`` for what it does not set."""
    path = f"listener[{listener.name}]"
    hcm = hcm_pb2.HttpConnectionManager()
    if listener.HasField("api_listener"):
        packed, hcm_path = listener.api_listener.api_listener, f"{path}.api_listener.api_listener"
    else:
        chains = listener.filter_chains
        if len(chains) != 1 or len(chains[0].filters) != 1:
            return None, None
        packed = chains[0].filters[0].typed_config
        hcm_path = f"{path}.filter_chains[0].filters[0].typed_config"
        if type_name(packed) != HCM_TYPE:
            return None, None
    unpack(hcm_path, packed, hcm)
    return hcm_telemetry(hcm, hcm_path)


def hcm_telemetry(
    hcm: hcm_pb2.HttpConnectionManager, path: str
) -> tuple[TracingConfig | None, AccessLogConfig | None]:
    tracing = _tracing(hcm.tracing, f"{path}.tracing") if hcm.HasField("tracing") else None
    logs = list(hcm.access_log)
    if len(logs) > 1:
        raise ConfigError(f"{path}.access_log", "at most one access log is supported")
    access_log = _access_log(logs[0], f"{path}.access_log[0]") if logs else None
    return tracing, access_log


def _tracing(tracing: hcm_pb2.HttpConnectionManager.Tracing, path: str) -> TracingConfig:
    unsupported(tracing, path, {"random_sampling", "provider"})
    ratio = tracing.random_sampling.value / 100 if tracing.HasField("random_sampling") else 1.0
    if not 0 <= ratio <= 1:
        raise ConfigError(f"{path}.random_sampling", "expected 0-100")
    if not tracing.HasField("provider"):
        raise ConfigError(f"{path}.provider", "required: an OpenTelemetry provider")
    otel = opentelemetry_pb2.OpenTelemetryConfig()
    unpack(f"{path}.provider.typed_config", tracing.provider.typed_config, otel)
    otel_path = f"{path}.provider.typed_config"
    unsupported(otel, otel_path, {"grpc_service", "service_name"})
    service = otel.grpc_service
    if service.HasField("envoy_grpc"):
        raise ConfigError(f"{otel_path}.grpc_service.envoy_grpc",
                          "not supported: the sidecar exports directly; use google_grpc")
    if not service.HasField("google_grpc"):
        raise ConfigError(f"{otel_path}.grpc_service", "a google_grpc target is required")
    google = service.google_grpc
    g_path = f"{otel_path}.grpc_service.google_grpc"
    unsupported(google, g_path, {"target_uri", "stat_prefix", "channel_credentials"})
    if not google.target_uri or "://" in google.target_uri:
        raise ConfigError(f"{g_path}.target_uri", "expected host:port")
    tls = False
    if google.HasField("channel_credentials"):
        kind = google.channel_credentials.WhichOneof("credential_specifier")
        if kind != "ssl_credentials":
            raise ConfigError(f"{g_path}.channel_credentials", "only ssl_credentials")
        unsupported(google.channel_credentials.ssl_credentials,
                    f"{g_path}.channel_credentials.ssl_credentials", set())
        tls = True
    defaults = TracingConfig()
    return TracingConfig(
        enabled=True,
        service_name=otel.service_name or defaults.service_name,
        endpoint=f"{'https' if tls else 'http'}://{google.target_uri}",
        insecure=not tls,
        sample_ratio=ratio,
    )


def _access_log(entry: accesslog_pb2.AccessLog, path: str) -> AccessLogConfig:
    unsupported(entry, path, {"name", "typed_config"})
    packed = entry.typed_config
    if type_name(packed) == stream_pb2.StdoutAccessLog.DESCRIPTOR.full_name:
        stdout = stream_pb2.StdoutAccessLog()
        unpack(f"{path}.typed_config", packed, stdout)
        unsupported(stdout, f"{path}.typed_config", set())
        return AccessLogConfig(sink="stdout")
    if type_name(packed) == file_pb2.FileAccessLog.DESCRIPTOR.full_name:
        file = file_pb2.FileAccessLog()
        unpack(f"{path}.typed_config", packed, file)
        unsupported(file, f"{path}.typed_config", {"path"})
        if not file.path:
            raise ConfigError(f"{path}.typed_config.path", "required")
        return AccessLogConfig(sink="file", path=file.path)
    raise ConfigError(f"{path}.typed_config", f"unsupported access logger {type_name(packed)!r}")
