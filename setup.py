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
from importlib import metadata
from pathlib import Path

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


if __name__ == "__main__":  # as the build backend runs it; tests import otlp_descriptor_set
    setup(cmdclass={"build_py": BuildWithOtlpDescriptors})
