"""The xds-protos / opentelemetry-proto trap (grpc/grpc#42926): no pilotfish command depends on
the clobbered files, and the check for those who want the SDK's exporters names the damage."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pilotfish.deps import check_dependencies, fix_command

REPO = Path(__file__).resolve().parent.parent
# What xds-protos leaves behind: an old common_pb2 without InstrumentationScope.
STALE_COMMON_PB2 = "InstrumentationLibrary = object()\n"


def test_this_install_is_sound() -> None:
    """Every install path we run (./run setup, CI) must end with a working OTLP exporter."""
    assert check_dependencies() is None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    assert OTLPSpanExporter is not None


def _clobbered_copy(tmp_path: Path) -> dict[str, str]:
    """A copy of the installed opentelemetry package, earlier on the path, with the stale
    common_pb2, and an opentelemetry-proto distribution whose RECORD has the real file's hash:
    what a single ``pip install`` of opentelemetry-proto and xds-protos leaves."""
    import opentelemetry.proto

    installed = Path(opentelemetry.proto.__file__).parent.parent
    shutil.copytree(installed, tmp_path / "opentelemetry", ignore=shutil.ignore_patterns("*.pyc"))
    common = tmp_path / "opentelemetry" / "proto" / "common" / "v1" / "common_pb2.py"
    digest = hashlib.sha256(common.read_bytes()).digest()
    common.write_text(STALE_COMMON_PB2)
    info = tmp_path / "opentelemetry_proto-9.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: opentelemetry-proto\n"
                                   "Version: 9.9.9\n")
    hashed = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    (info / "RECORD").write_text(
        f"opentelemetry/proto/common/v1/common_pb2.py,sha256={hashed},{len(STALE_COMMON_PB2)}\n"
    )
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))


def test_commands_work_with_the_clobbered_files(tmp_path: Path) -> None:
    env = _clobbered_copy(tmp_path)
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services:\n  quotes:\n    endpoints: [127.0.0.1:50071]\n")
    for argv in (["--help"], ["--version"], ["validate", str(mesh)]):
        result = subprocess.run(
            [sys.executable, "-m", "pilotfish", *argv],
            capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
        )
        assert result.returncode == 0, (argv, result.stderr)
        assert "opentelemetry" not in result.stderr


def test_the_check_names_the_overwritten_files_and_the_fix(tmp_path: Path) -> None:
    env = _clobbered_copy(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "pilotfish.deps"],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "1 of opentelemetry-proto's modules were overwritten" in result.stderr
    assert "opentelemetry/proto/common/v1/common_pb2.py" in result.stderr
    assert "--force-reinstall --no-deps opentelemetry-proto==9.9.9" in result.stderr
    assert "pip install" in " ".join(fix_command())


def test_overwritten_modules_are_built_from_the_bundled_descriptors(tmp_path: Path) -> None:
    """What a wheel does where xds-protos overwrote the files: the descriptors setup.py bundles
    rebuild the modules, and OpenTelemetry's OTLP exporter imports and encodes with them."""
    env = _clobbered_copy(tmp_path)
    package = tmp_path / "pilotfish"
    shutil.copytree(REPO / "pilotfish", package, ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.spec_from_file_location("pilotfish_setup", REPO / "setup.py")
    assert spec is not None and spec.loader is not None
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    (package / "_otlp_descriptors.binpb").write_bytes(setup.otlp_descriptor_set())
    (package / "_otlp_descriptors.version").write_text("9.9.9\n")
    script = (
        "from pilotfish.otlp_protos import install\n"
        "assert install()\n"
        "from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter\n"
        "from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope\n"
        "print(InstrumentationScope(name='pilotfish', version='1').SerializeToString().hex())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    # name = 1, version = 2: the wire format of the real message.
    assert result.stdout.strip() == "0a0970696c6f74666973681201" + "31"
    result = subprocess.run(
        [sys.executable, "-m", "pilotfish.deps"],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "served from the descriptors bundled with pilotfish" in result.stdout
    # Without descriptors for the installed version, nothing is bypassed and the check says so.
    (package / "_otlp_descriptors.version").write_text("1.0.0\n")
    result = subprocess.run(
        [sys.executable, "-m", "pilotfish.deps"],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "carries no descriptors for this version" in result.stderr
