"""An xDS-driven sidecar whose control plane is not there yet: requests get a 503 that says so
(flag ``NCY``, not ``NR``), and each reconnect attempt is one log line with its reason."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.support import STARTUP_TIMEOUT, free_port, wait_for
from tests.test_xds_e2e import ControlPlane, MeshFile, Processes, Sidecar, processes

__all__ = ["processes"]  # the fixture, imported for this module's tests


def get(sidecar: Sidecar, host: str) -> tuple[int, str, str]:
    """(status, response flags, body) of a GET through the sidecar's outbound listener."""
    request = urllib.request.Request(f"http://{sidecar.outbound}/", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers.get("x-pilotfish-response-flags", ""), ""
    except urllib.error.HTTPError as exc:
        flags = exc.headers.get("x-pilotfish-response-flags", "")
        return exc.code, flags, exc.read().decode()
    except OSError:
        return 0, "", ""  # not listening yet


def test_before_the_first_config_and_after(processes: Processes, tmp_path: Path) -> None:
    port = free_port()
    sidecar = Sidecar(processes, f"127.0.0.1:{port}", "client-1", "client")
    assert wait_for(lambda: get(sidecar, "quotes")[0] != 0, STARTUP_TIMEOUT), sidecar.log()
    status, flags, body = get(sidecar, "quotes")
    assert (status, flags) == (503, "NCY"), body
    assert "no config received yet from the control plane" in body

    attempt = re.compile(
        rf"control plane 127\.0\.0\.1:{port} unreachable \(attempt (\d+): UNAVAILABLE: .+\); "
        r"retrying in \d+\.\d\ds$"
    )

    def attempts_logged() -> int:
        return sum(1 for line in sidecar.log().splitlines() if attempt.search(line))

    assert wait_for(lambda: attempts_logged() >= 3, 20), sidecar.log()
    retry_lines = [line for line in sidecar.log().splitlines() if "unreachable" in line]
    numbers = [int(m.group(1)) for m in map(attempt.search, retry_lines) if m]
    assert numbers[:3] == [1, 2, 3], retry_lines
    assert len(numbers) == len(retry_lines), retry_lines  # each attempt is one whole line
    assert "AioRpcError" not in sidecar.log()
    assert "debug_error_string" not in sidecar.log()

    mesh = MeshFile(tmp_path / "mesh.yaml")
    mesh.write({"quotes": {"endpoints": ["127.0.0.1:9"]}, "client": {"endpoints": []}})
    control_plane = ControlPlane(processes, mesh.path, port)
    control_plane.wait_serving()
    sidecar.wait_ready()
    status, flags, _ = get(sidecar, "nowhere.example")
    assert (status, flags) == (404, "NR")

    # Each applied config says what it changed, in one INFO line.
    applied = [line for line in sidecar.log().splitlines() if "config applied: " in line]
    assert "clusters: added client, quotes" in applied[0], applied
    mesh.write({"quotes": {"endpoints": ["127.0.0.1:9", "127.0.0.1:10"]},
                "client": {"endpoints": []}})

    def endpoint_change_logged() -> bool:
        return "config applied: endpoints: quotes +127.0.0.1:10" in sidecar.log()

    assert wait_for(endpoint_change_logged, 10), sidecar.log()

    # pilotfish proxy-status: every type the sidecar subscribed to is SYNCED, exit code 0.
    def proxy_status() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pilotfish", "proxy-status", "client-1",
             "--address", control_plane.address],
            capture_output=True, text=True, timeout=30,
        )

    assert wait_for(lambda: proxy_status().returncode == 0, 10), proxy_status()
    result = proxy_status()
    assert result.stdout.splitlines() == [
        "NODE      SERVICE  CDS     LDS     EDS     RDS",
        "client-1  client   SYNCED  SYNCED  SYNCED  SYNCED",
    ]

    # /config_dump in Envoy's shape: the clusters as sent, durations as strings, RFC 3339 times.
    configs = sidecar.config_dump()["configs"]
    assert configs[0]["bootstrap"]["node"]["id"] == "client-1"
    (clusters,) = [c for c in configs if c["@type"].endswith(".ClustersConfigDump")]
    by_name = {c["cluster"]["name"]: c for c in clusters["dynamic_active_clusters"]}
    # PassthroughCluster: for an Envoy sidecar; ours relays to the original destination itself.
    assert set(by_name) == {"client", "quotes", "PassthroughCluster"}
    quotes = by_name["quotes"]
    assert quotes["cluster"]["@type"] == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    assert re.fullmatch(r"\d+(\.\d+)?s", quotes["cluster"]["connect_timeout"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", quotes["last_updated"])
    assert quotes["version_info"]
    # The outbound listener the flags made is static, shown beside what the control plane sent.
    (listeners,) = [c for c in configs if c["@type"].endswith(".ListenersConfigDump")]
    assert [e["listener"]["name"] for e in listeners["static_listeners"]] == ["outbound"]
    assert "virtualOutbound" in {e["name"] for e in listeners["dynamic_listeners"]}
