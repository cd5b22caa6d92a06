"""The Kubernetes manifests in ``k8s/`` parse and agree with each other and with the code.

No cluster runs here: this checks what can be checked offline. Every Service selects a
Deployment and targets a port its pods declare; each sidecar's flags agree with its init
container's interception rules, its app, the control plane Service and Jaeger; the mesh in the
ConfigMap is valid and names the Services; the image builds the way the docs say.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from control_plane.mesh import parse_mesh_text
from control_plane.xds.cache import SnapshotCache
from pilotfish.cli import build_parser
from pilotfish.config.fields import parse_address
from pilotfish.demo.services import STOP_GRACE
from sidecar.listen.iptables import options_from_args
from sidecar.main import xds_bootstrap

K8S = Path(__file__).resolve().parent.parent / "k8s"
NAMESPACE = "pilotfish"
DRAIN_TIMEOUT = 5.0  # the sidecar's default drain_timeout


def load_all() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


DOCS = load_all()


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == kind]


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def container_ports(spec: dict[str, Any]) -> dict[str | int, int]:
    """Every declared port of the pod's (long-running) containers, by name and by number."""
    ports: dict[str | int, int] = {}
    for container in spec["containers"]:
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def meshed_pods() -> list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """``(deployment name, init container, sidecar container, pod spec)`` for meshed pods."""
    found = []
    for deployment in of_kind("Deployment"):
        spec = pod_spec(deployment)
        sidecars = [c for c in spec["containers"] if c.get("args", [""])[0] == "sidecar"]
        if not sidecars:
            continue
        (init,) = spec["initContainers"]
        found.append((deployment["metadata"]["name"], init, sidecars[0], spec))
    return found


def test_every_document_is_named_and_namespaced() -> None:
    assert {d["kind"] for d in DOCS} >= {"Namespace", "ConfigMap", "Deployment", "Service"}
    seen: set[tuple[str, str]] = set()
    for doc in DOCS:
        assert doc.get("apiVersion"), doc
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, key
    assert ("Namespace", NAMESPACE) in seen


def test_deployments_select_their_own_pods() -> None:
    for deployment in of_kind("Deployment"):
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]
        names = [c["name"] for c in pod_spec(deployment)["containers"]]
        assert len(names) == len(set(names))


def test_every_service_targets_a_declared_port_of_the_pods_it_selects() -> None:
    for service in of_kind("Service"):
        name = service["metadata"]["name"]
        selector = service["spec"]["selector"]
        matching = [
            d for d in of_kind("Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, f"Service {name} selects {len(matching)} Deployments"
        ports = container_ports(pod_spec(matching[0]))
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports, f"Service {name}: targetPort {target} is not declared"


def service_port(host: str, port: int) -> bool:
    """Whether ``host:port`` names a Service of the manifests (short or cluster DNS name)."""
    short = host.removesuffix(f".{NAMESPACE}.svc.cluster.local")
    return any(
        s["metadata"]["name"] == short and any(p["port"] == port for p in s["spec"]["ports"])
        for s in of_kind("Service")
    )


def test_sidecars_agree_with_their_init_container_app_and_services() -> None:
    pods = meshed_pods()
    assert {name for name, *_ in pods} >= {"greeter", "quotes"}
    parser = build_parser()
    for name, init, sidecar, spec in pods:
        rules = options_from_args(parser.parse_args(init["args"]))
        assert "NET_ADMIN" in init["securityContext"]["capabilities"]["add"], name
        args = parser.parse_args(sidecar["args"])
        # The sidecar runs as the UID the rules exclude; the app must not, or its calls would
        # leave the pod without meeting the sidecar.
        proxy_uid = sidecar["securityContext"]["runAsUser"]
        assert rules.proxy_uid == proxy_uid, name
        for container in spec["containers"]:
            if container is not sidecar:
                assert container["securityContext"]["runAsUser"] != proxy_uid, name
        # Ports: the rules redirect to where the sidecar listens.
        assert parse_address("", args.outbound_address) == ("127.0.0.1", rules.outbound_port)
        assert args.outbound_passthrough == "original-destination", name
        if args.app_address:
            assert parse_address("", args.inbound_address) == ("0.0.0.0", rules.inbound_port)
            app_port = parse_address("", args.app_address)[1]
            assert app_port in container_ports(spec), name
        else:
            assert rules.include_inbound_ports == (), f"{name} has no inbound listener"
        # The kubelet probes the admin port, which the rules leave alone.
        admin_host, admin_port = parse_address("", args.admin_address)
        assert admin_host == "0.0.0.0"
        assert admin_port in rules.exclude_inbound_ports
        for probe in ("readinessProbe", "startupProbe"):
            assert sidecar[probe]["httpGet"] == {"path": "/ready", "port": admin_port}
        # The control plane and Jaeger are Services of these manifests.
        xds_host, xds_port = parse_address("", args.xds)
        assert service_port(xds_host, xds_port), args.xds
        env = {e["name"]: e.get("value") for e in sidecar["env"]}
        otlp = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        assert otlp is not None and otlp.startswith("http://")
        assert service_port(*parse_address("", otlp.removeprefix("http://"))), otlp
        # The bootstrap the sidecar builds from these flags relays non-HTTP to where it went.
        outbound = xds_bootstrap(args).listeners[0]
        assert outbound.tcp_passthrough_original_destination


def test_graceful_shutdown_fits_in_the_grace_period() -> None:
    for name, _, sidecar, spec in meshed_pods():
        command = sidecar["lifecycle"]["preStop"]["exec"]["command"]
        assert command[:2] == ["python", "-c"]
        script = command[2]
        compile(script, f"{name} preStop", "exec")
        assert "/healthcheck/fail" in script and "method=\"POST\"" in script
        wait = float(script.rsplit("time.sleep(", 1)[1].split(")")[0])
        sidecar_done = wait + DRAIN_TIMEOUT
        grace = spec["terminationGracePeriodSeconds"]
        assert grace > sidecar_done, name
        for container in spec["containers"]:
            if container is sidecar:
                continue
            app_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
            if app_stop:
                # The app serves until the sidecar has drained, and stops within the grace.
                command = app_stop["command"]
                assert command[0] == "sleep", name
                assert sidecar_done <= float(command[1]) < grace - STOP_GRACE, name


def test_inline_scripts_compile() -> None:
    for deployment in of_kind("Deployment"):
        for container in pod_spec(deployment)["containers"]:
            command = container.get("command", [])
            if command[:2] == ["python", "-c"]:
                compile(command[2], deployment["metadata"]["name"], "exec")


def test_the_mesh_in_the_config_map_is_valid_and_names_the_services() -> None:
    (config_map,) = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "mesh"]
    mesh = parse_mesh_text(config_map["data"]["mesh.yaml"], "k8s mesh")
    SnapshotCache(mesh)  # every proxy view is consistent
    for service in mesh.services.values():
        for endpoint in service.endpoints:
            assert service_port(endpoint.host, endpoint.port), endpoint.address
    sidecar_services = {
        flag(sidecar["args"], "--service") for _, _, sidecar, _ in meshed_pods()
    }
    assert sidecar_services <= set(mesh.services)
    (deployment,) = [d for d in of_kind("Deployment") if d["metadata"]["name"] == "control-plane"]
    (container,) = pod_spec(deployment)["containers"]
    assert flag(container["args"], "--config") == "/etc/pilotfish/mesh.yaml"
    assert container["volumeMounts"][0]["mountPath"] == "/etc/pilotfish"


@pytest.mark.parametrize(
    "line",
    [
        "FROM python:3.11-slim",
        "RUN pip install --no-cache-dir . \\",
        "    && pilotfish --version \\",
        "USER 1337:1337",
        'ENTRYPOINT ["pilotfish"]',
    ],
)
def test_dockerfile(line: str) -> None:
    assert line in (K8S / "Dockerfile").read_text().splitlines()


def test_the_dockerfile_copies_every_package() -> None:
    text = (K8S / "Dockerfile").read_text()
    copied = {
        shlex.split(line)[1] for line in text.splitlines() if line.startswith("COPY ")
    }
    assert {"pilotfish", "sidecar", "control_plane"} <= copied
