"""Detect (and repair) a broken OpenTelemetry install before anything else runs.

``xds-protos`` ships an old copy of ``opentelemetry/proto/*`` that overwrites the files of
``opentelemetry-proto`` when pip installs it second (grpc/grpc#42926, open upstream). The OTLP
exporter then fails to import with ``cannot import name 'InstrumentationScope'``. Reinstalling
``opentelemetry-proto`` puts the right files back; ``python -m pilotfish.deps --repair`` does it.

Every ``pilotfish`` command checks at start, cheaply: it reads the generated ``common_pb2.py``
instead of importing it, so a command that never exports a span does not load the OTLP
modules for the check. ``python -m pilotfish.deps`` also imports it, as the sidecar's OTLP
exporter (the OpenTelemetry SDK's) and the tests do.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

COMMON_PB2 = "opentelemetry.proto.common.v1.common_pb2"


def fix_command() -> list[str]:
    from importlib import metadata

    try:
        version = metadata.version("opentelemetry-proto")
    except metadata.PackageNotFoundError:
        return [sys.executable, "-m", "pip", "install", "opentelemetry-proto"]
    return [
        sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps",
        f"opentelemetry-proto=={version}",
    ]


def check_dependencies(*, import_modules: bool = False) -> str | None:
    """Return a message saying how to repair the install, or None when it is sound.

    ``import_modules`` also imports the generated module, as its users do (slower, and it
    loads the protobuf runtime)."""
    problem = _stale_proto_file()
    if problem is None and import_modules:
        try:
            from opentelemetry.proto.common.v1 import common_pb2

            common_pb2.InstrumentationScope  # noqa: B018 - the attribute is what xds-protos breaks
        except (ImportError, AttributeError) as exc:
            problem = str(exc)
    if problem is None:
        return None
    return (
        f"pilotfish: the OpenTelemetry protobuf files are broken ({problem}).\n"
        "xds-protos overwrote opentelemetry-proto's files (grpc/grpc#42926). Fix it with:\n"
        f"    {' '.join(fix_command())}"
    )


def _stale_proto_file() -> str | None:
    """Why ``common_pb2`` is not opentelemetry-proto's own, read from its source: the copy
    xds-protos leaves predates ``InstrumentationScope``, whose name the current one embeds in
    its serialized descriptor."""
    try:
        spec = importlib.util.find_spec(COMMON_PB2)
    except (ImportError, ValueError) as exc:
        return f"cannot find {COMMON_PB2}: {exc}"
    if spec is None or spec.origin is None:
        return f"no module named {COMMON_PB2!r}"
    try:
        source = Path(spec.origin).read_bytes()
    except OSError as exc:
        return f"cannot read {spec.origin}: {exc}"
    if b"InstrumentationScope" not in source:
        return f"{spec.origin} has no InstrumentationScope"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repair", action="store_true", help="reinstall opentelemetry-proto")
    args = parser.parse_args(argv)
    if args.repair:
        import subprocess

        subprocess.run([*fix_command(), "--quiet"], check=True)
        # The check must run in a fresh interpreter: this one may have imported the old files.
        return subprocess.run([sys.executable, "-m", "pilotfish.deps"], check=False).returncode
    problem = check_dependencies(import_modules=True)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    print("pilotfish: dependencies OK (the OpenTelemetry protobuf modules import)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
