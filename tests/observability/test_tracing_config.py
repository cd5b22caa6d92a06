"""The standard OTEL_* variables over the configured tracing settings."""

from __future__ import annotations

import logging

import pytest

from sidecar.observability.tracing import Tracer
from sidecar.observability.tracing_config import TracingConfig

BASE = TracingConfig(enabled=True, endpoint="http://collector:4317", sample_ratio=0.5)


def test_no_environment_keeps_the_config() -> None:
    assert BASE.with_env({}) is BASE


def test_environment_wins() -> None:
    config = BASE.with_env(
        {
            "OTEL_SERVICE_NAME": "quotes",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4317",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4317",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
            "OTEL_EXPORTER_OTLP_INSECURE": "false",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.01",
            "OTEL_PROPAGATORS": "b3,tracecontext",
            "OTEL_BSP_MAX_QUEUE_SIZE": "100",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }
    )
    assert config.service_name == "quotes"
    assert config.endpoint == "http://traces:4317"  # the per-signal variable wins
    assert config.export_timeout_s == 2.5
    assert config.insecure is False
    assert config.parent_based is True
    assert config.sample_ratio == 0.01
    assert config.propagators == ("b3", "tracecontext")
    assert (config.max_queue_size, config.max_export_batch_size) == (100, 10)
    assert config.schedule_delay_s == 0.2
    assert config.enabled


@pytest.mark.parametrize(
    ("env", "parent_based", "ratio", "enabled"),
    [
        ({"OTEL_TRACES_SAMPLER": "always_off"}, False, 0.0, True),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, True, 1.0, True),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.2"},
            False,
            0.2,
            True,
        ),
        ({"OTEL_TRACES_SAMPLER_ARG": "0.3"}, True, 0.3, True),
        ({"OTEL_TRACES_SAMPLER_ARG": "2"}, True, 0.5, True),  # out of range: ignored
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, True, 0.5, True),  # unsupported: ignored
        ({"OTEL_SDK_DISABLED": "true"}, True, 0.5, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, True, 0.5, False),
    ],
)
def test_samplers_and_switches(
    env: dict[str, str], parent_based: bool, ratio: float, enabled: bool
) -> None:
    config = BASE.with_env(env)
    assert (config.parent_based, config.sample_ratio, config.enabled) == (
        parent_based,
        ratio,
        enabled,
    )


def test_bad_values_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "pilotfish.tracing"):
        config = BASE.with_env({"OTEL_BSP_MAX_QUEUE_SIZE": "lots", "OTEL_PROPAGATORS": "none"})
    assert config.max_queue_size == BASE.max_queue_size
    assert config.propagators == ()
    assert "OTEL_BSP_MAX_QUEUE_SIZE" in caplog.text


def test_config_validation() -> None:
    with pytest.raises(ValueError, match=r"sample_ratio"):
        TracingConfig(sample_ratio=1.5)


def test_create_applies_the_environment_and_propagators_none_injects_nothing() -> None:
    tracer = Tracer.create(BASE, {"OTEL_SDK_DISABLED": "true"})
    assert not tracer.enabled
    tracer = Tracer.create(TracingConfig(), {"OTEL_PROPAGATORS": "none"})
    headers = [(b":path", b"/"), (b"x-request-id", b"r")]
    assert tracer.inject(tracer.start_server_span(headers), headers) is headers


def test_exporter_settings_from_the_environment() -> None:
    config = BASE.with_env(
        {
            "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=generic",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "X-Api-Key=a%20b%3D, tenant = t1 ,",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "GZIP",
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE": "/etc/ca.pem",
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE": "/etc/me.pem",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY": "/etc/me.key",
        }
    )
    # Names lowercased (HTTP/2 wants them so), values URL-decoded; per-signal wins whole.
    assert config.headers == (("x-api-key", "a b="), ("tenant", "t1"))
    assert config.compression == "gzip"
    assert (config.certificate, config.client_certificate, config.client_key) == (
        "/etc/ca.pem",
        "/etc/me.pem",
        "/etc/me.key",
    )
    assert config.protocol == "grpc"  # untouched: the default


def test_protocol_from_the_environment_and_unsupported_ones_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert BASE.with_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}).protocol == (
        "http/protobuf"
    )
    with caplog.at_level(logging.WARNING, "pilotfish.tracing"):
        config = BASE.with_env(
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json", "OTEL_EXPORTER_OTLP_HEADERS": "novalue"}
        )
    assert (config.protocol, config.headers) == ("grpc", ())
    assert "OTEL_EXPORTER_OTLP_PROTOCOL" in caplog.text
    assert "OTEL_EXPORTER_OTLP_HEADERS" in caplog.text


def test_an_endpoint_that_is_no_url_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "pilotfish.tracing"):
        config = BASE.with_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "unix:///run/otel.sock"})
    assert config.endpoint == BASE.endpoint
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in caplog.text


def test_a_configured_endpoint_is_not_rewritten_by_the_protocol() -> None:
    config = BASE.with_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert config.endpoint == "http://collector:4317"  # the bootstrap's, used as given
    assert TracingConfig(protocol="http/protobuf").export_endpoint == (
        "http://127.0.0.1:4318/v1/traces"
    )
    assert TracingConfig().export_endpoint == "http://127.0.0.1:4317"


def test_protocol_and_compression_are_validated() -> None:
    with pytest.raises(ValueError, match=r"tracing.protocol"):
        TracingConfig(protocol="http/json")
    with pytest.raises(ValueError, match=r"tracing.compression"):
        TracingConfig(compression="zstd")


def test_a_bad_per_signal_endpoint_leaves_the_generic_one_in_force() -> None:
    config = TracingConfig(protocol="http/protobuf").with_env(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "unix:///run/otel.sock",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318",
        }
    )
    assert config.endpoint == "http://collector:4318/v1/traces"
