"""Detect (and repair) a broken OpenTelemetry install before anything else runs.

``xds-protos`` ships an old copy of ``opentelemetry/proto/*`` that overwrites the files of
``opentelemetry-proto`` when pip installs it second (grpc/grpc#42926, open upstream). The OTLP
exporter then fails to import with ``cannot import name 'InstrumentationScope'``. Reinstalling
``opentelemetry-proto`` puts the right files back; ``python -m pilotfish.deps --repair`` does it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata


def fix_command() -> list[str]:
    try:
        version = metadata.version("opentelemetry-proto")
    except metadata.PackageNotFoundError:
        return [sys.executable, "-m", "pip", "install", "opentelemetry-proto"]
    return [
        sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps",
        f"opentelemetry-proto=={version}",
    ]


def check_dependencies() -> str | None:
    """Return a message saying how to repair the install, or None when it is sound."""
    try:
        from opentelemetry.proto.common.v1 import common_pb2

        common_pb2.InstrumentationScope  # noqa: B018 - the attribute is what xds-protos breaks
    except (ImportError, AttributeError) as exc:
        return (
            f"pilotfish: the OpenTelemetry protobuf files are broken ({exc}).\n"
            "xds-protos overwrote opentelemetry-proto's files (grpc/grpc#42926). Fix it with:\n"
            f"    {' '.join(fix_command())}"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repair", action="store_true", help="reinstall opentelemetry-proto")
    args = parser.parse_args(argv)
    if args.repair:
        subprocess.run([*fix_command(), "--quiet"], check=True)
        # The check must run in a fresh interpreter: this one may have imported the old files.
        return subprocess.run([sys.executable, "-m", "pilotfish.deps"], check=False).returncode
    problem = check_dependencies()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    print("pilotfish: dependencies OK (OTLP exporter importable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
