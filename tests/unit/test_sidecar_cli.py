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
