"""``pilotfish top`` against a running mesh: a control plane process, a sidecar process that
takes its config over xDS, real grpcio backends and real traffic through the sidecar.

Two services: ``steady`` never fails; ``flaky`` has a fault that aborts half of its calls in
the caller's sidecar. ``top`` finds the sidecar through the control plane, as a user runs it:
once for scripts (``--once``, table and JSON), and live in a real terminal under tmux, where
the table must be drawn and then redrawn in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import free_port, wait_for
from tests.test_xds_e2e import (
    ROOT,
    Backend,
    ControlPlane,
    MeshFile,
    Processes,
    Sidecar,
    Traffic,
)

TOP = [sys.executable, "-m", "pilotfish", "top"]
ABORT_PERCENT = 50


@dataclass
class Mesh:
    control_plane: ControlPlane
    sidecar: Sidecar
    traffic: dict[str, Traffic]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    log_dir = tmp_path_factory.mktemp("top-e2e")
    processes = Processes(log_dir)
    backends = {name: Backend(name) for name in ("steady", "flaky")}
    traffic: dict[str, Traffic] = {}
    try:
        mesh_file = MeshFile(log_dir / "mesh.yaml")
        mesh_file.write({
            "steady": {"protocol": "grpc", "endpoints": [backends["steady"].address]},
            "flaky": {
                "protocol": "grpc",
                "endpoints": [backends["flaky"].address],
                "routes": [{
                    "name": "whoami",
                    "match": {"prefix": "/"},
                    "retry": False,
                    "fault": {"abort": {"grpc_status": "unavailable",
                                        "percentage": ABORT_PERCENT}},
                }],
            },
        })
        control_plane = ControlPlane(processes, mesh_file.path, free_port())
        control_plane.wait_serving()
        sidecar = Sidecar(processes, control_plane.address, "caller-1", "caller")
        sidecar.wait_ready()
        for name in backends:
            # About 50 calls/s each, bounded in count and time.
            traffic[name] = Traffic(
                sidecar.outbound, authority=name, interval=0.02, max_calls=5000,
                max_seconds=90,
            ).start()
        yield Mesh(control_plane, sidecar, traffic)
    finally:
        for t in traffic.values():
            t.stop()
        processes.stop_all()
        for backend in backends.values():
            backend.server.stop()


def _top(mesh: Mesh, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TOP, "--address", mesh.control_plane.address, "--once", "--interval", "1", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )


def test_once_shows_each_service_with_its_rate_success_and_latency(mesh: Mesh) -> None:
    result = _top(mesh, "-o", "json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["sidecars"] == ["caller-1"] and doc["unreachable"] == []
    rows = {(r["service"], r["route"]): r for r in doc["rows"]}
    assert {service for service, _ in rows} == {"steady", "flaky"}, rows
    steady, flaky = rows[("steady", "(all)")], rows[("flaky", "(all)")]
    assert steady["direction"] == flaky["direction"] == "outbound"
    assert steady["rps"] > 0 and flaky["rps"] > 0
    assert steady["success_rate"] == 1.0
    # Half of flaky's calls are aborted: never all, never none, over a second of ~50 calls.
    assert 0 < flaky["success_rate"] < 1.0
    assert steady["p50_ms"] > 0 and steady["p99_ms"] >= steady["p50_ms"]
    assert rows[("flaky", "whoami")]["requests"] == flaky["requests"]
    # What the callers saw agrees: flaky's calls failed, steady's did not.
    assert mesh.traffic["steady"].failures() == []
    assert mesh.traffic["flaky"].failures()

    table = _top(mesh)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert re.match(r"pilotfish top  \d\d:\d\d:\d\d  1 sidecar, last 1\.\d s$", lines[0]), lines
    cells = {tuple(line.split()[1:3]): line.split() for line in lines[3:]}
    assert cells[("steady", "(all)")][3] == "100.00%"
    assert cells[("flaky", "(all)")][3] != "100.00%"


def test_admin_addresses_can_be_given_instead(mesh: Mesh) -> None:
    admin = mesh.sidecar.admin_url.removeprefix("http://")
    result = subprocess.run(
        [*TOP, "--admin", admin, "--once", "--interval", "0.5", "-o", "json"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["sidecars"] == [admin]
    assert {r["service"] for r in doc["rows"]} == {"steady", "flaky"}


def test_a_control_plane_that_does_not_answer_is_a_clear_error() -> None:
    result = subprocess.run(
        [*TOP, "--address", f"127.0.0.1:{free_port()}", "--once", "--timeout", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("pilotfish top: control plane 127.0.0.1:"), result.stderr
    assert "UNAVAILABLE" in result.stderr


def test_live_in_a_terminal_the_table_is_redrawn_in_place(mesh: Mesh, tmp_path: Path) -> None:
    tmux = shutil.which("tmux")
    assert tmux is not None, "tmux is installed by .ci/run"
    # A server of its own, so no other tmux session on this machine is touched.
    server = [tmux, "-L", f"pilotfish-top-{os.getpid()}", "-f", "/dev/null"]
    env = dict(os.environ, TERM="xterm-256color")
    command = " ".join([*TOP, "--address", mesh.control_plane.address, "--interval", "0.5"])
    subprocess.run(
        [*server, "new-session", "-d", "-x", "120", "-y", "30", "-c", str(ROOT), command],
        check=True, env=env, timeout=20,
    )
    try:
        def screen() -> str:
            return subprocess.run(
                [*server, "capture-pane", "-p"], capture_output=True, text=True, env=env,
                timeout=10,
            ).stdout

        clock = re.compile(r"^pilotfish top  (\d\d:\d\d:\d\d)", re.M)
        assert wait_for(lambda: "steady" in screen() and "flaky" in screen(), 20), screen()
        first = clock.findall(screen())
        assert len(first) == 1, screen()
        # Refreshed: a later time in the header, and still one table on the screen (redrawn
        # in place, not printed below the last one).
        assert wait_for(lambda: clock.findall(screen())[:1] not in ([], first), 10), screen()
        shown = screen()
        assert len(clock.findall(shown)) == 1, shown
        assert re.search(r"outbound +steady +\(all\) +100\.00%", shown), shown
        assert "(Ctrl-C quits)" in shown
    finally:
        subprocess.run([*server, "kill-server"], env=env, timeout=10, check=False)
