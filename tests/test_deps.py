"""The xds-protos / opentelemetry-proto trap (grpc/grpc#42926): detected, explained, repaired."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pilotfish.deps import check_dependencies, fix_command

# What xds-protos leaves behind: an old common_pb2 without InstrumentationScope.
STALE_COMMON_PB2 = "InstrumentationLibrary = object()\n"


def test_this_install_is_sound() -> None:
    """Every install path we run (./run setup, CI) must end with a working OTLP exporter."""
    assert check_dependencies() is None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    assert OTLPSpanExporter is not None


def test_broken_files_are_detected_at_start_with_the_fix(tmp_path: Path) -> None:
    # Reproduce what xds-protos does to the files: a copy of the installed opentelemetry
    # package, earlier on the path, whose common_pb2 is the stale one.
    import opentelemetry.proto

    installed = Path(opentelemetry.proto.__file__).parent.parent
    shutil.copytree(installed, tmp_path / "opentelemetry", ignore=shutil.ignore_patterns("*.pyc"))
    (tmp_path / "opentelemetry" / "proto" / "common" / "v1" / "common_pb2.py").write_text(
        STALE_COMMON_PB2
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]))
    result = subprocess.run(
        [sys.executable, "-m", "pilotfish", "sidecar", "--config", "unused.yaml"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 3
    assert "grpc/grpc#42926" in result.stderr
    assert "--force-reinstall --no-deps opentelemetry-proto==" in result.stderr
    assert "pip install" in " ".join(fix_command())
