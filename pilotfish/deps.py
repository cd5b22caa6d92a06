"""Detect a broken OpenTelemetry install before anything else runs.

``xds-protos`` ships an old copy of ``opentelemetry/proto/*`` that overwrites the files of
``opentelemetry-proto`` when it is installed after it (grpc/grpc#42926). The OTLP exporter then
fails to import with ``cannot import name 'InstrumentationScope'``. Reinstalling
``opentelemetry-proto`` puts the right files back.
"""

from __future__ import annotations

from importlib import metadata


def fix_command() -> str:
    try:
        version = metadata.version("opentelemetry-proto")
    except metadata.PackageNotFoundError:
        return "python -m pip install opentelemetry-proto"
    return f"python -m pip install --force-reinstall --no-deps opentelemetry-proto=={version}"


def check_dependencies() -> str | None:
    """Return a message saying how to repair the install, or None when it is sound."""
    try:
        from opentelemetry.proto.common.v1 import common_pb2

        common_pb2.InstrumentationScope  # noqa: B018 - the attribute is what xds-protos breaks
    except (ImportError, AttributeError) as exc:
        return (
            "pilotfish: the OpenTelemetry protobuf files are broken (" + str(exc) + ").\n"
            "xds-protos overwrote opentelemetry-proto's files (grpc/grpc#42926). Fix it with:\n"
            f"    {fix_command()}"
        )
    return None
