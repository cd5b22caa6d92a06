"""Check (and repair) the OpenTelemetry protobuf modules that the SDK's OTLP exporters import.

``xds-protos`` ships an old copy of ``opentelemetry/proto/*`` (every release, 1.58 to 1.85,
from before ``InstrumentationScope``), at the same paths as ``opentelemetry-proto``
(grpc/grpc#42926, open upstream). Whichever of the two pip installs last owns the files, and
in a single ``pip install`` it is always ``xds-protos``: pip installs a package before its
dependents and, among independent ones, the fewer levels of dependencies first, and
``opentelemetry-proto`` (on protobuf alone) is a level below ``xds-protos`` (on grpcio too).
The older files then break ``from opentelemetry.exporter.otlp.proto.grpc.trace_exporter
import OTLPSpanExporter`` with ``cannot import name 'InstrumentationScope'``. They are
overwritten in place: opentelemetry-proto's own copy is gone from the disk.

No ``pilotfish`` command refuses to start over it. A wheel of Pilotfish carries the
descriptors of the real modules and serves them in place of the overwritten files
(``pilotfish/otlp_protos.py``), so the OTLP exporters, which the sidecar exports spans with,
import after a plain ``pip install``. ``python -m pilotfish.deps`` says whether the modules
work and how; ``--repair`` reinstalls opentelemetry-proto over an overwritten copy (what a
source tree or an editable install, which carry no descriptors, need).
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from pilotfish.otlp_protos import DISTRIBUTION, bundled_version, replaced_files


def fix_command() -> list[str]:
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return [sys.executable, "-m", "pip", "install", DISTRIBUTION]
    return [
        sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps",
        f"{DISTRIBUTION}=={version}",
    ]


def check_dependencies() -> str | None:
    """Why the OTLP exporters cannot import here, with the fix; None when they can (their files
    are sound, or overwritten but served from the descriptors this wheel carries)."""
    replaced = replaced_files()
    if replaced is None:
        problem = f"{DISTRIBUTION} is not installed"
    elif replaced:
        if bundled_version() == metadata.version(DISTRIBUTION):
            return None
        problem = (
            f"{len(replaced)} of {DISTRIBUTION}'s modules were overwritten, e.g. {replaced[0]} "
            "(xds-protos ships older copies at the same paths, grpc/grpc#42926), and this "
            "install of pilotfish carries no descriptors for this version"
        )
    else:
        return None
    return (
        f"pilotfish: the OpenTelemetry protobuf modules do not work: {problem}.\n"
        "The sidecar exports spans with the OpenTelemetry OTLP exporters, which need them. "
        "Fix with:\n"
        f"    {' '.join(fix_command())}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repair", action="store_true", help="reinstall opentelemetry-proto")
    args = parser.parse_args(argv)
    if args.repair:
        import subprocess

        subprocess.run([*fix_command(), "--quiet"], check=True)
        # The check must run in a fresh interpreter: this one may have imported the old files.
        return subprocess.run([sys.executable, "-m", "pilotfish.deps"], check=False).returncode
    from pilotfish.otlp_protos import install

    served = install()
    problem = check_dependencies()
    if problem is None:
        # The proof users need: the import that the clobbered files break.
        try:
            from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
        except ImportError as exc:
            problem = f"pilotfish: the OpenTelemetry protobuf modules do not import: {exc}"
        else:
            del InstrumentationScope
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    how = (
        f" (served from the descriptors bundled with pilotfish: xds-protos overwrote "
        f"{len(replaced_files() or ())} of {DISTRIBUTION}'s files)"
        if served
        else ""
    )
    print(f"pilotfish: dependencies OK (the OpenTelemetry protobuf modules import){how}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
