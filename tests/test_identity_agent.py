"""``pilotfish identity-agent`` as a real process against a real control plane, and
``pilotfish ca-root`` stepping a root rotation."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from envoy.service.secret.v3 import sds_pb2_grpc

from control_plane.ca.settings import CaSettings, build_authority
from pilotfish.cli import main
from sidecar.security.sds import CERTIFICATE_NAME, ROOT_NAME
from tests.test_sds import _request, _secrets
from tests.test_workload_identity import ALICE, TOKENS, control_plane


def _agent(port: int, token: Path, socket: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "pilotfish", "identity-agent",
            "--ca", f"127.0.0.1:{port}", "--token-file", str(token),
            "--service-account", ALICE.service_account, "--namespace", ALICE.namespace,
            "--sds-socket", str(socket), "--log-level", "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def test_agent_serves_its_certificate_over_sds_and_stops_on_sigterm(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with control_plane(tmp_path) as plane:
            token = tmp_path / "token"
            token.write_text(TOKENS[ALICE] + "\n")
            socket = tmp_path / "sds.sock"
            agent = _agent(plane.port, token, socket)
            try:
                for _ in range(200):  # bounded: up to ~20 s for the process to start
                    if socket.exists() or agent.poll() is not None:
                        break
                    await asyncio.sleep(0.1)
                assert socket.exists(), agent.communicate(timeout=5)
                assert stat.S_IMODE(os.stat(socket).st_mode) & 0o077 == 0
                async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
                    call = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets()
                    await call.write(_request())
                    secrets = _secrets(await asyncio.wait_for(call.read(), 10))
                    assert set(secrets) == {CERTIFICATE_NAME, ROOT_NAME}
                    call.cancel()
                assert plane.ca is not None and plane.ca.counters.issued == 1
            finally:
                agent.send_signal(signal.SIGTERM)
                _, err = await asyncio.to_thread(agent.communicate, timeout=20)
            assert agent.returncode == 0, err
            assert not socket.exists()

    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_agent_exits_with_the_cas_reason_when_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with control_plane(tmp_path) as plane:
            token = tmp_path / "token"
            token.write_text("wrong")
            agent = _agent(plane.port, token, tmp_path / "sds.sock")
            _, err = await asyncio.to_thread(agent.communicate, timeout=30)
            assert agent.returncode == 1
            assert "UNAUTHENTICATED" in err and "unknown bootstrap token" in err

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_ca_root_rotation_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "ca"
    settings = CaSettings(root_dir=ca_dir)
    first = build_authority(settings, lambda: 1_800_000_000.0).signer.certificate
    assert main(["ca-root", "stage", "--ca-dir", str(ca_dir)]) == 0
    assert "staged" in capsys.readouterr().out
    assert main(["ca-root", "stage", "--ca-dir", str(ca_dir)]) == 1
    assert "already staged" in capsys.readouterr().err
    assert len(build_authority(settings, lambda: 1_800_000_000.0).bundle.roots) == 2
    assert main(["ca-root", "activate", "--ca-dir", str(ca_dir)]) == 0
    authority = build_authority(settings, lambda: 1_800_000_000.0)
    assert authority.signer.certificate != first and first in authority.bundle.roots
    assert main(["ca-root", "retire", "--ca-dir", str(ca_dir)]) == 0
    assert build_authority(settings, lambda: 1_800_000_000.0).bundle.roots == (
        authority.signer.certificate,
    )
    assert main(["ca-root", "activate", "--ca-dir", str(ca_dir)]) == 1
