"""The admin API is not the pod network's: checked from another network namespace.

A sidecar in ``pod`` has its admin bound to every address (as a careless manifest would) and
its health port on 15021. From ``peer``, the kubelet's view: the health port answers
readiness and nothing else, and no request that changes state (POST) is taken on the admin
port; from loopback inside the pod the same requests work. Needs root (skipped otherwise).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_interception import (
    ADMIN_PORT,
    POD_IP,
    Netns,
    World,
    _run_as_proxy,
    running_world,
    sidecar_bootstrap,
)

HEALTH_PORT = 15021

pytestmark = pytest.mark.timeout(120)


def start_exposed_admin(pod: Netns, peer: Netns, workdir: Path) -> None:
    config = sidecar_bootstrap()
    config["admin"] = {
        "address": "0.0.0.0",
        "port": ADMIN_PORT,
        "health_address": f"0.0.0.0:{HEALTH_PORT}",
    }
    path = workdir / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)
    pod.spawn(
        *_run_as_proxy(sys.executable, "-m", "pilotfish", "sidecar", "--config", str(path)),
        log=workdir / "sidecar.log",
    )


@pytest.fixture(scope="module")
def exposed() -> Iterator[World]:
    with running_world(start_exposed_admin) as w:
        yield w


def test_the_health_port_serves_readiness_only(exposed: World) -> None:
    peer = exposed.peer
    for path in ("/ready", "/healthz/ready"):
        reply = peer.get(f"http://{POD_IP}:{HEALTH_PORT}{path}")
        assert (reply["status"], reply["body"]) == (200, "LIVE\n"), reply
    for method, path in (
        ("GET", "/stats"),
        ("GET", "/config_dump"),
        ("POST", "/quitquitquit"),
        ("POST", "/healthcheck/fail"),
    ):
        reply = peer.get(f"http://{POD_IP}:{HEALTH_PORT}{path}", method=method)
        assert reply["status"] == 404, (method, path, reply)


def test_state_changes_are_refused_from_outside_the_pod(exposed: World) -> None:
    peer, pod = exposed.peer, exposed.pod
    for path in ("/healthcheck/fail", "/quitquitquit", "/healthcheck/ok"):
        reply = peer.get(f"http://{POD_IP}:{ADMIN_PORT}{path}", method="POST")
        assert reply["status"] == 403, (path, reply)
    # Nothing happened: still ready, still running.
    assert pod.get(f"http://127.0.0.1:{ADMIN_PORT}/ready")["status"] == 200
    assert peer.get(f"http://{POD_IP}:{HEALTH_PORT}/ready")["status"] == 200
    # From loopback, the preStop hook's way, they work.
    fail = pod.get(f"http://127.0.0.1:{ADMIN_PORT}/healthcheck/fail", method="POST")
    assert fail["status"] == 200, fail
    assert peer.get(f"http://{POD_IP}:{HEALTH_PORT}/ready")["status"] == 503
    ok = pod.get(f"http://127.0.0.1:{ADMIN_PORT}/healthcheck/ok", method="POST")
    assert ok["status"] == 200, ok
    assert peer.get(f"http://{POD_IP}:{HEALTH_PORT}/ready")["status"] == 200
