"""What a sidecar loads, and when: the memory it starts with is the modules it imports.

An idle sidecar with the benchmark's bootstrap (routing, a retry policy, metrics, tracing at 1%
over OTLP/gRPC) must not load what only some configs or only sampled traffic need: the OTLP
exporter and protobuf or requests under it, xDS, security, the kube client. The exporter, once
a span is exported, brings in the configured protocol's stack and not the other one, and never
grpcio. ``python -m bench.memory`` gives the resulting RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.targets import pilotfish_bootstrap
from tests.observability.otlp_receiver import OtlpHttpReceiver, OtlpReceiver
from tests.support import free_port

REPO = Path(__file__).resolve().parent.parent

# Runs ``pilotfish sidecar --config FILE`` in this process; once its admin says ready, prints
# the modules loaded and stops it.
SIDECAR_CHILD = """
import json, os, signal, sys, threading, time, urllib.request
from pilotfish.cli import main

config, admin = sys.argv[1], int(sys.argv[2])


def report():
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.05)
    else:
        print(json.dumps(None), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    print(json.dumps(sorted(sys.modules)), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


# Imported now: the report must not count urllib's own modules as the sidecar's.
import urllib.request  # noqa: E402
threading.Thread(target=report, daemon=True).start()
sys.exit(main(["sidecar", "--config", config]))
"""

# Modules an idle sidecar with a static bootstrap, tracing on, must not have loaded.
NOT_AT_IDLE = (
    "grpc",  # xDS client (OTLP/gRPC export does without it)
    "google.protobuf",  # the exporters' and xDS's messages
    "requests",  # OTLP/HTTP exporter
    "opentelemetry.exporter.otlp.proto.grpc",
    "opentelemetry.exporter.otlp.proto.http",
    "opentelemetry.proto",
    "envoy",  # xDS messages
    "sidecar.xds",
    "re2",  # only a config with a regex
    "jwt",  # security, only with JWT rules
    "cryptography",
    "kubernetes_asyncio",  # never in a sidecar
    "aetcd",
    "importlib.metadata",  # 2.4 MB for a --version nobody asked for
    "importlib.resources",
    "statistics",  # only success-rate outlier detection
)


def loaded(modules: list[str], package: str) -> list[str]:
    return [m for m in modules if m == package or m.startswith(package + ".")]


def test_an_idle_sidecar_with_tracing_on_loads_no_exporter_xds_or_security(
    tmp_path: Path,
) -> None:
    admin = free_port()
    # The upstream is never called: an idle sidecar does not connect to it.
    config = tmp_path / "bootstrap.yaml"
    config.write_text(pilotfish_bootstrap(str(admin), str(free_port()), str(free_port())))
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", SIDECAR_CHILD, str(config), str(admin)], capture_output=True,
        text=True, timeout=90, cwd=REPO, env=env,
    )  # fmt: skip
    modules = json.loads(done.stdout.splitlines()[0])
    assert modules is not None, done.stderr
    assert "sidecar.server" in modules and "opentelemetry.sdk.trace" in modules
    assert "sidecar.observability.otlp_export" in modules  # the exporter is configured...
    unexpected = {p: loaded(modules, p) for p in NOT_AT_IDLE if loaded(modules, p)}
    assert unexpected == {}  # ...but none of what it needs is loaded before a span leaves


# Exports one span through the tracer's exporter; prints what was loaded before and after.
EXPORT_CHILD = """
import json, sys
from sidecar.observability.tracing import Tracer
from sidecar.observability.tracing_config import TracingConfig

protocol, endpoint = sys.argv[1], sys.argv[2]
tracer = Tracer(TracingConfig(enabled=True, protocol=protocol, endpoint=endpoint))
before = sorted(sys.modules)
tracer.end(tracer.start_server_span([(b":method", b"GET"), (b":path", b"/")]), 200)
assert tracer.force_flush(10.0)
after = sorted(sys.modules)
print(json.dumps({"before": before, "after": after, "exported": tracer.exported.value}))
tracer.shutdown()
"""


@pytest.mark.parametrize(
    ("protocol", "own", "never"),
    [
        # OTLP/gRPC is our own client on the sidecar's HTTP/2 codec: grpcio (9.8 MB of shared
        # library and its threads) and the SDK's gRPC exporter must stay out.
        (
            "grpc",
            "sidecar.observability.otlp_grpc",
            ("grpc", "opentelemetry.exporter.otlp.proto.grpc", "requests"),
        ),
        (
            "http/protobuf",
            "requests",
            ("grpc", "opentelemetry.exporter.otlp.proto.grpc", "sidecar.observability.otlp_grpc"),
        ),
    ],
)
def test_the_exporter_loads_its_own_protocol_with_the_first_span_and_never_grpcio(
    protocol: str, own: str, never: tuple[str, ...]
) -> None:
    receiver = OtlpReceiver() if protocol == "grpc" else OtlpHttpReceiver()
    receiver.start()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        done = subprocess.run(
            [sys.executable, "-c", EXPORT_CHILD, protocol, receiver.endpoint],
            capture_output=True, text=True, timeout=90, cwd=REPO, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["exported"] == 1
        assert len(receiver.wait_for(1)) == 1
    finally:
        receiver.stop()
    assert loaded(report["before"], own) == []
    assert loaded(report["before"], "google.protobuf") == []
    assert loaded(report["after"], own) != []
    assert {p: loaded(report["after"], p) for p in never if loaded(report["after"], p)} == {}
