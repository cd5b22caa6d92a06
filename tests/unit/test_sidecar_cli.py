"""``pilotfish sidecar`` refuses bad flags before it starts anything."""

from __future__ import annotations

import os

import pytest

from pilotfish.cli import build_parser
from sidecar.main import run_sidecar


@pytest.mark.parametrize("endpoint", ["ftp://collector:21", "http://:4317", "collector:port"])
def test_an_otlp_endpoint_that_is_no_url_is_refused(
    endpoint: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    args = build_parser().parse_args(
        ["sidecar", "--config", "unused.yaml", "--otlp-endpoint", endpoint]
    )
    assert run_sidecar(args) == 2
    assert "--otlp-endpoint" in capsys.readouterr().err
    assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" not in os.environ


REGISTER = ["sidecar", "--xds", "127.0.0.1:15010", "--service", "echo", "--app-address",
            "127.0.0.1:50051", "--inbound-address", "127.0.0.1:15006", "--register"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--register-label", "version"],
         "--register-label: expected KEY=VALUE, got 'version'"),
        (["--register-weight", "0"], "--register-weight: expected 1 to 128"),
        (["--register-health", "tcp"], "--register-health: expected grpc or http:/PATH"),
        (["--register-health", "http:healthz"], "--register-health: expected grpc or http:/PATH"),
        (["--register-health-interval", "0"], "--register-health-interval: expected seconds > 0"),
        (["--register-address", "0.0.0.0:15006"],
         "--register-address: a wildcard address cannot be called: give --register-address"),
        (["--concurrency", "2"], "--register: works with --concurrency 1 only"),
    ],
)
def test_registration_flags_are_checked_before_anything_starts(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser().parse_args([*REGISTER, *extra])
    assert run_sidecar(args) == 2
    assert capsys.readouterr().err == f"pilotfish sidecar: invalid config: {message}\n"


def test_registration_needs_the_app_and_a_routable_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    no_app = [a for a in REGISTER if a not in ("--app-address", "127.0.0.1:50051")]
    assert run_sidecar(build_parser().parse_args(no_app)) == 2
    assert "--register: needs --app-address" in capsys.readouterr().err
    no_inbound = [a for a in REGISTER if a not in ("--inbound-address", "127.0.0.1:15006")]
    assert run_sidecar(build_parser().parse_args(no_inbound)) == 2
    assert "--register-address: required when --inbound-address is not given" in (
        capsys.readouterr().err
    )


def test_registration_options_carry_the_flags() -> None:
    from sidecar.main import registration_options

    args = build_parser().parse_args([
        *REGISTER, "--register-label", "version=v2", "--register-label", "track=canary",
        "--register-weight", "7", "--register-zone", "z1", "--register-health", "http:/healthz",
        "--register-health-interval", "0.5",
    ])
    options = registration_options(args)
    assert (options.registry, options.service, options.host, options.port) == (
        "127.0.0.1:15010", "echo", "127.0.0.1", 15006,
    )
    assert (options.app_host, options.app_port, options.weight, options.zone) == (
        "127.0.0.1", 50051, 7, "z1",
    )
    assert options.labels == {"version": "v2", "track": "canary"}
    assert (options.health.path, options.health.interval, options.health.unhealthy_threshold) == (
        "/healthz", 0.5, 1,
    )
