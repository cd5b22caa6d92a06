"""Build step: bundle opentelemetry-proto's message descriptors into the wheel.

``xds-protos`` overwrites opentelemetry-proto's generated modules with older ones whenever both
are installed by one ``pip install`` (see ``pilotfish/deps.py``). The wheel therefore carries
the descriptors of the real ones, taken here from the opentelemetry-proto of the build
environment (a build requirement), as one serialized ``FileDescriptorSet``: data, from which
``pilotfish/otlp_protos.py`` rebuilds the modules at run time if their files were overwritten.
Everything else is configured in pyproject.toml.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_py import build_py

DESCRIPTORS = "_otlp_descriptors.binpb"
VERSION = "_otlp_descriptors.version"


def otlp_descriptor_set() -> bytes:
    """The descriptors of every generated module opentelemetry-proto installed (by its RECORD;
    a module that fails to import fails the build)."""
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet()
    for path in sorted(str(f) for f in metadata.files("opentelemetry-proto") or ()):
        if path.endswith("_pb2.py"):
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            files.file.add().ParseFromString(module.DESCRIPTOR.serialized_pb)
    serialized: bytes = files.SerializeToString()
    return serialized


class BuildWithOtlpDescriptors(build_py):  # type: ignore[misc]
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "pilotfish"
        target.mkdir(parents=True, exist_ok=True)
        (target / DESCRIPTORS).write_bytes(otlp_descriptor_set())
        (target / VERSION).write_text(metadata.version("opentelemetry-proto") + "\n")


# PILOTFISH_MYPYC=1: the modules of the request path where the interpreter's cost per request
# goes (``python -m bench.bytecodes --modules 40``), both HTTP/2 codecs included, compiled with
# mypyc; the .py files are installed beside the extensions, which Python imports first. Without
# the variable the package is pure Python. The router's stages (``sidecar/route/exchange.py``
# and the stage classes it combines by multiple inheritance) stay interpreted: mypyc allows
# that only for traits. What it saves: "Compiling the request path" in bench/profiles.md.
MYPYC_MODULES = [
    "sidecar/codec/ngh2_codec.py",
    "sidecar/codec/walk.py",
    "sidecar/codec/connection.py",
    "sidecar/codec/receive.py",
    "sidecar/codec/headers.py",
    "sidecar/codec/hpack_encoder.py",
    "sidecar/codec/frames.py",
    "sidecar/codec/events.py",
    "sidecar/codec/validate.py",
    "sidecar/http/h2conn.py",
    "sidecar/http/h2guard.py",
    "sidecar/listen/listener.py",
    "sidecar/route/attempt.py",
    "sidecar/route/table.py",
    "sidecar/route/plan.py",
    "sidecar/route/policy/deadline.py",
    "sidecar/upstream/clusters.py",
    "sidecar/upstream/pool.py",
    "sidecar/upstream/policy/breaker.py",
    "sidecar/upstream/policy/outlier.py",
    "sidecar/upstream/policy/cluster.py",
    "sidecar/upstream/policy/balancers.py",
    "sidecar/timer_wheel.py",
    "sidecar/observability/metrics.py",
    "sidecar/observability/propagation.py",
]


def mypyc_build() -> dict[str, Any]:
    if os.environ.get("PILOTFISH_MYPYC") != "1":
        return {}
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        raise SystemExit(
            "PILOTFISH_MYPYC=1 compiles with mypyc, which type-checks the modules as mypy does: "
            "build in an environment with the dev extra (./run setup), without isolation: "
            "PILOTFISH_MYPYC=1 .venv/bin/pip install --no-build-isolation ..."
        ) from exc
    return {"ext_modules": mypycify(MYPYC_MODULES, opt_level="3")}


if __name__ == "__main__":  # as the build backend runs it; tests import otlp_descriptor_set
    setup(cmdclass={"build_py": BuildWithOtlpDescriptors}, **mypyc_build())
