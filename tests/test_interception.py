"""iptables interception, for real: two network namespaces joined by a veth pair.

``pod`` (10.200.0.1) holds an app (HTTP on :8000), a sidecar running as UID 1337 (the UID the
rules exclude) and the rules that ``pilotfish iptables`` installs. ``peer`` (10.200.0.2) holds
an HTTP server (:8080) and a TCP echo server (:7000). All traffic stays inside namespaces the
test creates; the namespaces (and every process in them) are removed afterwards.

Needs root, ``ip netns``, ``iptables-save``/``iptables-restore`` and ``setpriv``; skipped with
the reason otherwise. CI has them (``.ci/run`` installs iproute2 and iptables).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

TOOLS = str(Path(__file__).with_name("netns_tools.py"))
POD_IP = "10.200.0.1"
PEER_IP = "10.200.0.2"
PROXY_UID = 1337
APP_PORT = 8000
PEER_HTTP_PORT = 8080
PEER_TCP_PORT = 7000
ADMIN_PORT = 15000
COMMAND_TIMEOUT = 20.0

pytestmark = pytest.mark.timeout(180)

T = TypeVar("T")


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces and iptables are Linux only"
    if os.geteuid() != 0:
        return "needs root: the test creates network namespaces and iptables rules"
    for tool in ("ip", "iptables-save", "iptables-restore", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} not found (apt-get install iproute2 iptables util-linux)"
    return None


@dataclass
class Netns:
    name: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"in {self.name}: {' '.join(argv)} exited {done.returncode}:\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done

    def spawn(self, *argv: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.processes.append(process)
        return process

    def tool(self, *argv: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.run(sys.executable, TOOLS, *argv).stdout)
        return result

    def get(self, url: str, host: str | None = None, method: str = "GET") -> dict[str, Any]:
        return self.tool("http-get", url, "--method", method, *(("--host", host) if host else ()))

    def pilotfish(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "pilotfish", *argv)

    def nat_rules(self) -> str:
        return self.run("iptables-save", "-t", "nat").stdout

    def stop_processes(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


@dataclass
class World:
    pod: Netns
    peer: Netns
    workdir: Path

    def stats(self) -> dict[str, int]:
        body = self.pod.get(f"http://127.0.0.1:{ADMIN_PORT}/stats")["body"]
        rows = (line.split(": ", 1) for line in body.splitlines() if ": " in line)
        return {name: int(value) for name, value in rows if value.strip().lstrip("-").isdigit()}

    def sidecar_log(self) -> str:
        return (self.workdir / "sidecar.log").read_text(errors="replace")


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (AssertionError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            last, value = exc, None
        if value is not None:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; last error: {last}")


def sidecar_bootstrap() -> dict[str, Any]:
    """Inbound to the app; outbound by authority to ``peer``, anything else not HTTP passed
    through to its original destination."""
    return {
        "node_id": "pod",
        "drain_timeout": "1s",
        "admin": {"address": "0.0.0.0", "port": ADMIN_PORT},
        "listeners": [
            {"name": "inbound", "address": "0.0.0.0:15006", "route_config": "inbound"},
            {
                "name": "outbound",
                "address": "127.0.0.1:15001",
                "route_config": "outbound",
                "tcp_passthrough": {"original_destination": True, "connect_timeout": "2s"},
                "protocol_detect_timeout": "200ms",
            },
        ],
        "route_configs": [
            {
                "name": "inbound",
                "virtual_hosts": [
                    {
                        "domains": ["*"],
                        "request_headers_to_add": [
                            {"name": "x-pilotfish-via", "value": "inbound"}
                        ],
                        "response_headers_to_add": [
                            {"name": "x-pilotfish-inbound", "value": "pod"}
                        ],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                    }
                ],
            },
            {
                "name": "outbound",
                "virtual_hosts": [
                    {
                        "domains": ["peer"],
                        "request_headers_to_add": [
                            {"name": "x-pilotfish-via", "value": "outbound"}
                        ],
                        "response_headers_to_add": [
                            {"name": "x-pilotfish-outbound", "value": "peer"}
                        ],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "peer"}}],
                    }
                ],
            },
        ],
        "clusters": [
            {"name": "app", "protocol": "http1", "endpoints": [f"127.0.0.1:{APP_PORT}"]},
            {"name": "peer", "protocol": "http1", "endpoints": [f"{PEER_IP}:{PEER_HTTP_PORT}"]},
        ],
    }


def _delete_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=COMMAND_TIMEOUT,
                   check=False)


StartSidecar = Callable[[Netns, Netns, Path], None]


@contextlib.contextmanager
def running_world(start_sidecar: StartSidecar) -> Iterator[World]:
    """Namespaces, servers and a sidecar (started by ``start_sidecar``); all gone afterwards."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    tag = f"pf{os.getpid()}{secrets.token_hex(2)}"
    pod, peer = Netns(f"{tag}-pod"), Netns(f"{tag}-peer")
    # Readable by the sidecar's UID, unlike pytest's tmp_path.
    workdir = Path(tempfile.mkdtemp(prefix="pilotfish-netns-"))
    created: list[str] = []
    try:
        for ns in (pod, peer):
            done = subprocess.run(["ip", "netns", "add", ns.name], capture_output=True,
                                  text=True, timeout=COMMAND_TIMEOUT, check=False)
            if done.returncode != 0:
                pytest.skip(f"ip netns add failed (no CAP_SYS_ADMIN?): {done.stderr.strip()}")
            created.append(ns.name)
        # Both ends are created inside the namespaces: nothing touches the host's network.
        pod.run("ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth0",
                "netns", peer.name)
        for ns, ip in ((pod, POD_IP), (peer, PEER_IP)):
            ns.run("ip", "link", "set", "lo", "up")
            ns.run("ip", "addr", "add", f"{ip}/30", "dev", "veth0")
            ns.run("ip", "link", "set", "veth0", "up")
        if pod.run("iptables-save", "-t", "nat", check=False).returncode != 0:
            pytest.skip("the iptables nat table is not available in a network namespace here")
        # Someone else's rules, which must survive `pilotfish iptables clean`.
        pod.run("iptables", "-t", "nat", "-N", "KEEP_ME")
        pod.run("iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9999",
                "-j", "KEEP_ME")

        workdir.chmod(0o755)
        pod.spawn(sys.executable, TOOLS, "http-server", "--port", str(APP_PORT), "--name", "app",
                  log=workdir / "app.log")
        peer.spawn(sys.executable, TOOLS, "http-server", "--port", str(PEER_HTTP_PORT),
                   "--name", "peer", log=workdir / "peer-http.log")
        peer.spawn(sys.executable, TOOLS, "tcp-echo", "--port", str(PEER_TCP_PORT),
                   log=workdir / "peer-tcp.log")
        start_sidecar(pod, peer, workdir)
        w = World(pod, peer, workdir)
        wait_until("the app", lambda: pod.get(f"http://127.0.0.1:{APP_PORT}/"))
        wait_until("the peer", lambda: peer.get(f"http://127.0.0.1:{PEER_HTTP_PORT}/"))
        wait_until("the echo server",
                   lambda: peer.tool("tcp-send", "127.0.0.1", str(PEER_TCP_PORT), "x") or None)
        try:
            wait_until(
                "the sidecar's /ready",
                lambda: pod.get(f"http://127.0.0.1:{ADMIN_PORT}/ready")["status"] == 200 or None,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{w.sidecar_log()[-3000:]}") from None
        yield w
    finally:
        pod.stop_processes()
        peer.stop_processes()
        for name in created:
            _delete_netns(name)
        shutil.rmtree(workdir, ignore_errors=True)


def _run_as_proxy(*argv: str) -> tuple[str, ...]:
    return ("setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}", "--clear-groups", *argv)


def start_static_sidecar(pod: Netns, peer: Netns, workdir: Path) -> None:
    config = workdir / "sidecar.yaml"
    config.write_text(yaml.safe_dump(sidecar_bootstrap()))
    config.chmod(0o644)
    pod.spawn(*_run_as_proxy(sys.executable, "-m", "pilotfish", "sidecar", "--config",
                             str(config), "--log-level", "debug"),
              log=workdir / "sidecar.log")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with running_world(start_static_sidecar) as w:
        yield w


@pytest.fixture
def intercepted(world: World) -> Iterator[World]:
    """The rules in force, as the init container installs them, for one test."""
    world.pod.pilotfish("iptables", "apply")
    try:
        yield world
    finally:
        world.pod.pilotfish("iptables", "clean")


def test_inbound_http_goes_through_the_sidecar(intercepted: World) -> None:
    reply = intercepted.peer.get(f"http://{POD_IP}:{APP_PORT}/inbound")
    assert reply["status"] == 200, reply
    assert reply["headers"].get("x-pilotfish-inbound") == "pod"
    seen = json.loads(reply["body"])
    assert seen["server"] == "app"
    assert seen["headers"].get("x-pilotfish-via") == "inbound"
    # The sidecar delivered it over loopback, as its own (excluded) UID.
    assert seen["client"] == "127.0.0.1"


def test_excluded_inbound_port_reaches_the_admin_directly(intercepted: World) -> None:
    reply = intercepted.peer.get(f"http://{POD_IP}:{ADMIN_PORT}/ready")
    assert reply["status"] == 200, reply
    assert "LIVE" in reply["body"]
    assert "x-pilotfish-inbound" not in reply["headers"]


def test_outbound_http_is_routed_by_authority(intercepted: World) -> None:
    before = intercepted.stats()
    reply = intercepted.pod.get(f"http://{PEER_IP}:{PEER_HTTP_PORT}/outbound", host="peer")
    assert reply["status"] == 200, reply
    assert reply["headers"].get("x-pilotfish-outbound") == "peer"
    seen = json.loads(reply["body"])
    assert seen["server"] == "peer"
    assert seen["headers"].get("x-pilotfish-via") == "outbound"
    after = intercepted.stats()
    total = "http.outbound.downstream_cx_total"
    assert after.get(total, 0) > before.get(total, 0)

    # The route decides, not the address: the app dialled a port nobody listens on.
    reply = intercepted.pod.get(f"http://{PEER_IP}:9/elsewhere", host="peer")
    assert reply["status"] == 200, reply
    assert json.loads(reply["body"])["path"] == "/elsewhere"


def test_outbound_tcp_passes_through_to_the_original_destination(intercepted: World) -> None:
    counter = "cluster.original_dst.upstream_cx_total"
    before = intercepted.stats().get(counter, 0)
    reply = intercepted.pod.tool("tcp-send", PEER_IP, str(PEER_TCP_PORT), "hello, raw tcp")
    assert reply["reply"] == "echo: hello, raw tcp"
    assert intercepted.stats().get(counter, 0) == before + 1, intercepted.sidecar_log()[-3000:]


def test_a_direct_connection_to_the_outbound_port_is_not_relayed_to_itself(
    intercepted: World,
) -> None:
    counter = "http.outbound.downstream_cx_original_dst_unknown"
    before = intercepted.stats().get(counter, 0)
    reply = intercepted.pod.tool("tcp-send", "127.0.0.1", "15001", "not redirected")
    assert reply["reply"] == ""
    assert intercepted.stats().get(counter, 0) == before + 1


def test_apply_twice_then_clean_removes_exactly_ours(world: World) -> None:
    pod = world.pod
    pod.pilotfish("iptables", "apply")
    pod.pilotfish("iptables", "apply")
    rules = pod.nat_rules()
    assert rules.count("-A PREROUTING -p tcp -j PILOTFISH_INBOUND") == 1, rules
    assert rules.count("-A OUTPUT -p tcp -j PILOTFISH_OUTPUT") == 1, rules
    assert rules.count("--uid-owner 1337") == 1, rules

    pod.pilotfish("iptables", "clean")
    rules = pod.nat_rules()
    assert "PILOTFISH" not in rules, rules
    assert ":KEEP_ME" in rules and "-j KEEP_ME" in rules, rules
    # Nothing left to remove: clean is a no-op, not an error.
    pod.pilotfish("iptables", "clean")

    # Without the rules, traffic no longer meets the sidecar.
    reply = world.peer.get(f"http://{POD_IP}:{APP_PORT}/direct")
    assert reply["status"] == 200
    assert "x-pilotfish-inbound" not in reply["headers"]
    assert "x-pilotfish-via" not in json.loads(reply["body"])["headers"]
    counter = "cluster.original_dst.upstream_cx_total"
    before = world.stats().get(counter, 0)
    assert world.pod.tool("tcp-send", PEER_IP, str(PEER_TCP_PORT), "direct")["reply"] == (
        "echo: direct"
    )
    assert world.stats().get(counter, 0) == before


# ------------------------------------------- as `pilotfish inject` configures a sidecar

XDS_PORT = 15010
KUBE_API_PORT = 6443
KUBE_SERVICE_PORT = 7001
MESH = {
    "services": {
        "app": {
            "protocol": "http1",
            "port": APP_PORT,
            "endpoints": [f"{POD_IP}:{APP_PORT}"],
            "depends_on": ["peer", "quotes"],
        },
        # A Kubernetes Service: its pod (the peer's HTTP server) comes from the API server.
        "quotes": {"namespace": "default", "protocol": "http1", "endpoints": []},
        "peer": {
            "protocol": "http1",
            "port": PEER_HTTP_PORT,
            "endpoints": [f"{PEER_IP}:{PEER_HTTP_PORT}"],
            "depends_on": [],
        },
    }
}


def start_xds_sidecar(pod: Netns, peer: Netns, workdir: Path) -> None:
    """A control plane in ``peer``; in ``pod`` a sidecar with the flags injection gives it."""
    mesh = workdir / "mesh.yaml"
    mesh.write_text(yaml.safe_dump(MESH))
    # A Kubernetes API server in the peer's namespace, serving the Service "quotes" (port
    # 7001) whose one pod is the peer's HTTP server.
    from tests.kube_fake import FakeKubeApi, endpoint, endpoint_slice, service

    objects = workdir / "kube-objects.json"
    # Its ClusterIP is the peer's address, which the pod can route to: HTTP/2 dialled to
    # ClusterIP:port is the mesh's.
    objects.write_text(json.dumps({
        "services": [service("quotes", "default", KUBE_SERVICE_PORT, cluster_ip=PEER_IP,
                             port_name="http")],
        "endpointslices": [endpoint_slice("quotes-1", "default", "quotes", PEER_HTTP_PORT,
                                          [endpoint(PEER_IP)], port_name="http")],
    }))
    fake = FakeKubeApi()
    fake.port = KUBE_API_PORT
    kubeconfig = fake.kubeconfig(workdir / "kubeconfig")
    peer.spawn(sys.executable, str(Path(__file__).with_name("kube_fake.py")), "--port",
               str(KUBE_API_PORT), "--objects", str(objects), log=workdir / "kube-api.log")
    wait_until("the Kubernetes API", lambda: peer.get(
        f"http://127.0.0.1:{KUBE_API_PORT}/api/v1/services")["status"] == 200 or None)
    peer.spawn(sys.executable, "-m", "pilotfish", "control-plane", "--config", str(mesh),
               "--address", "0.0.0.0", "--port", str(XDS_PORT), "--kubernetes",
               "--kubeconfig", str(kubeconfig), log=workdir / "cp.log")
    pod.spawn(
        *_run_as_proxy(
            sys.executable, "-m", "pilotfish", "sidecar",
            "--xds", f"{PEER_IP}:{XDS_PORT}", "--node-id", "app-1", "--service", "app",
            "--app-address", f"127.0.0.1:{APP_PORT}", "--inbound-address", "0.0.0.0:15006",
            "--outbound-address", "127.0.0.1:15001",
            "--outbound-passthrough", "original-destination",
            "--admin-address", f"127.0.0.1:{ADMIN_PORT}",
        ),
        log=workdir / "sidecar.log",
    )


@pytest.fixture(scope="module")
def xds_world() -> Iterator[World]:
    with running_world(start_xds_sidecar) as w:
        # The rules go in first in a pod; here the sidecar's xDS stream (UID 1337) is already
        # up, and must stay up: its traffic is not redirected.
        w.pod.pilotfish("iptables", "apply")
        yield w


def test_xds_sidecar_behind_the_rules(xds_world: World) -> None:
    w = xds_world
    inbound = "http.inbound|app.downstream_cx_total"
    outbound = "http.outbound.downstream_cx_total"
    passthrough = "cluster.original_dst.upstream_cx_total"
    before = w.stats()

    # (a) inbound: the peer calls the pod's app port; the inbound listener takes it.
    reply = w.peer.get(f"http://{POD_IP}:{APP_PORT}/in")
    assert reply["status"] == 200, reply
    assert json.loads(reply["body"])["client"] == "127.0.0.1"
    # (b) outbound HTTP, routed by authority with the route config the control plane sent.
    reply = w.pod.get(f"http://{PEER_IP}:{PEER_HTTP_PORT}/out", host=f"peer:{PEER_HTTP_PORT}")
    assert reply["status"] == 200, reply
    assert json.loads(reply["body"])["server"] == "peer"
    # (c) outbound raw TCP, to its original destination.
    reply = w.pod.tool("tcp-send", PEER_IP, str(PEER_TCP_PORT), "over xds")
    assert reply["reply"] == "echo: over xds"

    # (d) an unknown HTTP host goes to its original destination, untouched by the mesh.
    reply = w.pod.get(f"http://{PEER_IP}:{PEER_HTTP_PORT}/plain", host="example.org")
    assert reply["status"] == 200, reply
    seen = json.loads(reply["body"])
    assert seen["server"] == "peer" and seen["path"] == "/plain"
    assert "x-pilotfish-via" not in seen["headers"]

    after = w.stats()
    for counter in (inbound, outbound):
        assert after.get(counter, 0) > before.get(counter, 0), (counter, after)
    assert after.get(passthrough, 0) == before.get(passthrough, 0) + 2


def test_xds_sidecar_routes_kubernetes_names(xds_world: World) -> None:
    """The app calls a Kubernetes Service by its DNS name; the mesh route takes it to the pod
    the API server lists (the port dialled has nothing listening: the route decides)."""
    w = xds_world
    for host in ("quotes.default.svc.cluster.local:7001", "quotes.default.svc.cluster.local",
                 "quotes.default:7001", "quotes"):
        def call(host: str = host) -> dict[str, Any] | None:
            return _ok(w.pod.get(f"http://{PEER_IP}:{KUBE_SERVICE_PORT}/k8s", host=host))

        reply = wait_until(host, call)
        seen = json.loads(reply["body"])
        assert seen["server"] == "peer" and seen["path"] == "/k8s", seen
        assert seen["client"] == POD_IP


def test_xds_sidecar_looks_a_host_up_in_the_routes_of_the_port_dialled(xds_world: World) -> None:
    """The control plane serves a route configuration per port (Envoy's shape): a mesh host
    dialled on a port that is not its own is not the mesh's there, and goes where the app
    sent it, untouched, as in Envoy."""
    w = xds_world
    # quotes is on 7001: routed by the mesh there (once discovery has served it)...
    wait_until("quotes on its port", lambda: _ok(
        w.pod.get(f"http://{PEER_IP}:{KUBE_SERVICE_PORT}/own-port", host="quotes")))
    counter = "http.outbound.downstream_cx_passthrough_unknown_authority"
    before = w.stats().get(counter, 0)
    assert _ok(w.pod.get(f"http://{PEER_IP}:{KUBE_SERVICE_PORT}/own-port", host="quotes"))
    assert w.stats().get(counter, 0) == before
    # ...but not on 8080, where the route configuration holds peer only.
    reply = w.pod.get(f"http://{PEER_IP}:{PEER_HTTP_PORT}/other-port", host="quotes")
    assert reply["status"] == 200, reply
    seen = json.loads(reply["body"])
    assert seen["server"] == "peer" and seen["path"] == "/other-port"
    assert w.stats().get(counter, 0) == before + 1


def test_xds_sidecar_decides_http2_by_the_address_dialled(xds_world: World) -> None:
    """gRPC-style HTTP/2 (prior knowledge) dialled to a Service's ClusterIP:port is routed by
    the mesh; dialled to an address the mesh does not know, it goes there untouched."""
    w = xds_world
    authority = "quotes.default.svc.cluster.local:7001"

    def via_cluster_ip() -> dict[str, Any] | None:
        reply = w.pod.tool("h2-get", PEER_IP, str(KUBE_SERVICE_PORT), "/h2", authority)
        return reply if reply.get("status") == 200 else None

    reply = wait_until("HTTP/2 to the ClusterIP", via_cluster_ip)
    seen = json.loads(reply["body"])
    assert seen["server"] == "peer" and seen["path"] == "/h2", seen  # the pod, on 8080
    counter = "http.outbound.downstream_cx_passthrough_unknown_authority"
    before = w.stats().get(counter, 0)
    # Port 9 of the peer is not a Service: relayed there, where nothing listens.
    reply = w.pod.tool("h2-get", PEER_IP, "9", "/h2", authority)
    assert "error" in reply, reply
    assert w.stats().get(counter, 0) == before + 1


def _ok(reply: dict[str, Any]) -> dict[str, Any] | None:
    return reply if reply["status"] == 200 else None
