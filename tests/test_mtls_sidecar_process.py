"""``pilotfish sidecar --ca-token-file``: a real sidecar process gets its certificate from a real
control plane process over the CA API and serves mTLS on its STRICT listener."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from control_plane.ca.settings import CaSettings, build_authority
from pilotfish.cli import main
from sidecar.security.tls import client_context
from tests.control_plane.helpers import MESH_YAML
from tests.support import SidecarProcess, free_port, simple_config
from tests.test_mtls_inbound import ALICE, BOB, App, mtls_call, refused, svid


@contextmanager
def control_plane_process(tmp: Path) -> Iterator[int]:
    (tmp / "mesh.yaml").write_text(MESH_YAML)
    (tmp / "tokens.yaml").write_text("tokens:\n  - {token: bob-secret, service: bob}\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "pilotfish", "control-plane", "--config", str(tmp / "mesh.yaml"),
            "--port", str(port), "--ca-dir", str(tmp / "ca"),
            "--bootstrap-tokens", str(tmp / "tokens.yaml"), "--log-level", "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        for _ in range(300):  # bounded: up to ~30 s to listen
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "exited")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        proc.wait(15)


def test_sidecar_fetches_its_certificate_and_serves_strict_mtls(tmp_path: Path) -> None:
    app = App()
    try:
        with control_plane_process(tmp_path) as cp_port:
            (tmp_path / "token").write_text("bob-secret\n")
            config = simple_config([app.server.address], extra_listener={"mtls": "STRICT"})
            sidecar = SidecarProcess(
                config,
                "--ca-token-file", str(tmp_path / "token"),
                "--ca", f"127.0.0.1:{cp_port}",
                "--service-account", BOB.service_account,
            )  # fmt: skip
            try:
                port = int(config["listeners"][0]["address"].rsplit(":", 1)[1])
                authority = build_authority(CaSettings(root_dir=tmp_path / "ca"), time.time)
                assert mtls_call(port, client_context(svid(authority, ALICE))) == ("0", b"hello")
                assert app.seen == [ALICE.uri]
                assert refused(port, None)
            finally:
                assert sidecar.stop() == 0
    finally:
        app.server.stop()


def test_sidecar_refuses_to_start_without_a_certificate(tmp_path: Path) -> None:
    with control_plane_process(tmp_path) as cp_port:
        (tmp_path / "token").write_text("wrong\n")
        config = simple_config(["127.0.0.1:1"], extra_listener={"mtls": "STRICT"})
        with pytest.raises(RuntimeError, match="no workload certificate: CA: UNAUTHENTICATED"):
            SidecarProcess(
                config,
                "--ca-token-file", str(tmp_path / "token"),
                "--ca", f"127.0.0.1:{cp_port}",
                "--service-account", "bob",
            )  # fmt: skip


def test_identity_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "b.yaml"
    path.write_text("listeners: []\nclusters: []\n")
    token = str(tmp_path / "token")
    assert main(["sidecar", "--config", str(path), "--ca-token-file", token]) == 2
    assert "--ca: required" in capsys.readouterr().err
    args = ["sidecar", "--config", str(path), "--ca-token-file", token, "--ca", "127.0.0.1:1"]
    assert main(args) == 2
    assert "--service-account: required" in capsys.readouterr().err
    assert main([*args, "--service-account", "a/b"]) == 2
    assert "--service-account" in capsys.readouterr().err
