"""The Kubernetes manifests in ``k8s/`` parse and agree with each other and with the code.

No cluster runs here: this checks what can be checked offline. Every document validates
against the Kubernetes API schemas (strict, 1.29 to 1.33); every Service selects a Deployment
and targets a port its pods declare; the demo pods carry no hand-written sidecar and, injected
as the control plane's webhook would, their sidecar's flags agree with the interception rules,
the app and the control plane Service; the control plane's RBAC, PodDisruptionBudget and
webhook configuration fit its Deployment; the mesh in the ConfigMap is valid and names the
Services; the webhook certificate script makes a certificate the webhook can serve; the image
builds the way the docs say.
"""

from __future__ import annotations

import shlex
import shutil
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from control_plane.ca.settings import CaSettings, build_authority
from control_plane.kube.inject import (
    INIT,
    NAMESPACE_LABEL,
    SIDECAR,
    STATUS_ANNOTATION,
    InjectOptions,
    inject_object,
)
from control_plane.kube.webhook import PATH as WEBHOOK_PATH
from control_plane.mesh import parse_mesh_text
from control_plane.xds.cache import SnapshotCache
from pilotfish.cli import build_parser
from pilotfish.config.fields import parse_address
from pilotfish.demo.services import STOP_GRACE
from pilotfish.identity import SpiffeId
from sidecar.listen.iptables import options_from_args
from sidecar.main import xds_bootstrap
from sidecar.security.csr import build_csr, generate_key
from sidecar.security.tls import Svid, check_peer, client_context, server_context

K8S = Path(__file__).resolve().parent.parent / "k8s"
CONTROL_NAMESPACE = "pilotfish"
VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}


def load_all() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


DOCS = load_all()


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return found


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


def control_plane_args() -> list[str]:
    (container,) = pod_spec(named("Deployment", "control-plane"))["containers"]
    args: list[str] = container["args"]
    return args


def injection_namespaces() -> set[str]:
    return {
        ns["metadata"]["name"]
        for ns in of_kind("Namespace")
        if ns["metadata"].get("labels", {}).get(NAMESPACE_LABEL) == "enabled"
    }


# Stands for the roots the control plane reads from --ca-roots (the Secret k8s/ca-cert.sh
# makes); the webhook writes them into every injected pod.
ROOTS_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def inject_options() -> InjectOptions:
    """What the control plane's webhook injects, from its flags."""
    args = build_parser().parse_args(control_plane_args())
    return InjectOptions(
        image=args.inject_image, xds_address=args.inject_xds_address,
        native=not args.inject_classic, ca_address=args.inject_ca_address,
        ca_roots_pem=ROOTS_PEM, ca_token_audience=args.ca_token_audience,
        trust_domain=args.trust_domain,
    )


def meshed_pods() -> list[tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """``(deployment name, init container, sidecar, pod spec)`` of every Deployment in a
    namespace labelled for injection, injected as the webhook would."""
    found = []
    for deployment in of_kind("Deployment"):
        if deployment["metadata"]["namespace"] not in injection_namespaces():
            continue
        spec = pod_spec(inject_object(deployment, inject_options()))
        inits = {c["name"]: c for c in spec["initContainers"]}
        found.append((deployment["metadata"]["name"], inits[INIT], inits[SIDECAR], spec))
    return found


def service_port(host: str, port: int, namespace: str) -> bool:
    """Whether ``host:port``, dialled from ``namespace``, names a Service of the manifests."""
    parts = host.removesuffix(".svc.cluster.local").removesuffix(".svc").split(".")
    name, ns = (parts[0], parts[1]) if len(parts) == 2 else (parts[0], namespace)
    return any(
        s["metadata"]["name"] == name
        and s["metadata"]["namespace"] == ns
        and any(p["port"] == port for p in s["spec"]["ports"])
        for s in of_kind("Service")
    )


def test_every_document_is_named_and_namespaced() -> None:
    kinds = {d["kind"] for d in DOCS}
    assert kinds >= {"Namespace", "ConfigMap", "Deployment", "Service"} | CLUSTER_SCOPED
    seen: set[tuple[str, str, str]] = set()
    namespaces = {ns["metadata"]["name"] for ns in of_kind("Namespace")}
    for doc in DOCS:
        assert doc.get("apiVersion"), doc
        namespace = doc["metadata"].get("namespace", "")
        key = (doc["kind"], namespace, doc["metadata"]["name"])
        assert key not in seen, f"duplicate {key}"
        seen.add(key)
        if doc["kind"] in CLUSTER_SCOPED:
            assert not namespace, key
        else:
            assert namespace in namespaces, key
    assert CONTROL_NAMESPACE not in injection_namespaces()  # the control plane is not meshed
    assert injection_namespaces() == {"demo"}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_document_validates_strictly(version: str) -> None:
    for doc in DOCS:
        kubernetes_validate.validate(doc, version, strict=True)
    for deployment in of_kind("Deployment"):
        if deployment["metadata"]["namespace"] in injection_namespaces():
            injected = inject_object(deployment, inject_options())
            kubernetes_validate.validate(injected, version, strict=True)


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
            d
            for d in of_kind("Deployment")
            if d["metadata"]["namespace"] == service["metadata"]["namespace"]
            and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matching) == 1, f"Service {name} selects {len(matching)} Deployments"
        ports = container_ports(pod_spec(matching[0]))
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports, f"Service {name}: targetPort {target} is not declared"


def test_demo_pods_rely_on_injection() -> None:
    demo = [d for d in of_kind("Deployment") if d["metadata"]["namespace"] == "demo"]
    assert {d["metadata"]["name"] for d in demo} == {"quotes", "greeter", "demo-client"}
    for deployment in demo:
        spec = pod_spec(deployment)
        containers = spec["containers"] + spec.get("initContainers", [])
        assert all(not c["name"].startswith("pilotfish") for c in containers)
        assert all(c.get("args", [""])[0] not in ("sidecar", "iptables") for c in containers)
        template = deployment["spec"]["template"]
        assert STATUS_ANNOTATION not in template["metadata"].get("annotations", {})


def test_injected_sidecars_agree_with_their_rules_app_and_control_plane() -> None:
    pods = meshed_pods()
    assert {name for name, *_ in pods} == {"greeter", "quotes", "demo-client"}
    parser = build_parser()
    for name, init, sidecar, spec in pods:
        rules = options_from_args(parser.parse_args(init["args"]))
        assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
        args = parser.parse_args(sidecar["args"])
        # The sidecar runs as the UID the rules exclude; the app must not, or its calls would
        # leave the pod without meeting the sidecar.
        proxy_uid = sidecar["securityContext"]["runAsUser"]
        assert rules.proxy_uid == proxy_uid, name
        for container in spec["containers"]:
            assert container["securityContext"]["runAsUser"] != proxy_uid, name
        assert parse_address("", args.outbound_address) == ("127.0.0.1", rules.outbound_port)
        assert args.outbound_passthrough == "original-destination", name
        if args.app_address:
            assert parse_address("", args.inbound_address) == ("0.0.0.0", rules.inbound_port)
            assert parse_address("", args.app_address)[1] in container_ports(spec), name
        # The admin stays on loopback; the kubelet probes the health port, left alone by the
        # rules, which serves readiness only.
        assert parse_address("", args.admin_address)[0] == "127.0.0.1"
        health_host, health_port = parse_address("", args.health_address)
        assert health_host == "0.0.0.0" and health_port in rules.exclude_inbound_ports
        for probe in ("readinessProbe", "startupProbe"):
            assert sidecar[probe]["httpGet"] == {"path": "/ready", "port": health_port}
        assert sidecar["restartPolicy"] == "Always"  # native: starts before the app
        xds_host, xds_port = parse_address("", args.xds)
        assert service_port(xds_host, xds_port, "demo"), args.xds
        _check_identity(name, args, sidecar, spec)
        outbound = xds_bootstrap(args).listeners[0]
        assert outbound.tcp_passthrough_original_destination


def _check_identity(name: str, args: Any, sidecar: dict[str, Any], spec: dict[str, Any]) -> None:
    """The sidecar holds xDS over the control plane's mTLS port with the pod's identity: a
    token projected for the CA's audience, the roots from the pod's annotation."""
    plane = build_parser().parse_args(control_plane_args())
    ca_host, ca_port = parse_address("", args.ca)
    xds_host, xds_port = parse_address("", args.xds)
    assert service_port(ca_host, ca_port, "demo"), args.ca
    service = named("Service", "control-plane")
    targets = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    ports = container_ports(pod_spec(named("Deployment", "control-plane")))
    assert ports[targets[ca_port]] == plane.ca_tls_port
    assert ports[targets[xds_port]] == plane.xds_mtls_port
    # The names sidecars dial are in the serving certificate.
    assert {ca_host, xds_host} <= set(plane.tls_names.split(","))
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    token_dir, token_file = args.ca_token_file.rsplit("/", 1)
    roots_dir, roots_file = args.control_plane_roots.rsplit("/", 1)
    sources = volumes[mounts[token_dir]]["projected"]["sources"]
    (token,) = [s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s]
    assert token["path"] == token_file
    assert token["audience"] == plane.ca_token_audience == "pilotfish-ca"
    assert token["expirationSeconds"] <= 3600
    roots_volume = volumes[mounts[roots_dir]]["projected"]["sources"]
    (downward,) = [s["downwardAPI"] for s in roots_volume if "downwardAPI" in s]
    (item,) = [i for i in downward["items"] if i["path"] == roots_file]
    annotation = item["fieldRef"]["fieldPath"].removeprefix("metadata.annotations['")
    assert injected_annotations(name)[annotation.removesuffix("']")] == ROOTS_PEM
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]}
    assert args.service_account == "$(POD_SERVICE_ACCOUNT)"
    assert env["POD_SERVICE_ACCOUNT"] == "spec.serviceAccountName"
    assert args.trust_domain == plane.trust_domain
    # Its service account is its service's name: the identity the control plane binds
    # the service's view to (the mesh names no other service_account).
    assert spec["serviceAccountName"] == name
    mesh = parse_mesh_text(
        named("ConfigMap", "mesh")["data"]["mesh.yaml"]
    )
    assert (mesh.services[name].service_account or name) == spec["serviceAccountName"]


def injected_annotations(deployment: str) -> dict[str, str]:
    injected = inject_object(named("Deployment", deployment), inject_options())
    annotations: dict[str, str] = injected["spec"]["template"]["metadata"]["annotations"]
    return annotations


def test_the_control_plane_reviews_tokens_and_keeps_plaintext_on_loopback() -> None:
    binding = named("ClusterRoleBinding", "pilotfish-control-plane-auth-delegator")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
        "name": "system:auth-delegator",
    }
    (subject,) = binding["subjects"]
    assert subject["name"] == pod_spec(named("Deployment", "control-plane"))["serviceAccountName"]
    args = build_parser().parse_args(control_plane_args())
    assert args.kubernetes  # TokenReview goes through the control plane's Kubernetes client
    assert args.plaintext_address == "127.0.0.1"
    assert args.ca_tls_port and args.xds_mtls_port
    # The Service exposes the TLS ports and never the plaintext one.
    service_ports = {p["port"] for p in named("Service", "control-plane")["spec"]["ports"]}
    assert args.port not in service_ports
    # Both replicas sign with the intermediate from the Secret k8s/ca-cert.sh makes.
    (container,) = pod_spec(named("Deployment", "control-plane"))["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(named("Deployment", "control-plane"))["volumes"]}
    for option in ("--ca-cert", "--ca-key", "--ca-roots"):
        path = Path(flag(control_plane_args(), option))
        secret = volumes[mounts[str(path.parent)]]["secret"]
        assert secret["secretName"] == "pilotfish-ca"
    script = (K8S / "ca-cert.sh").read_text()
    assert 'SECRET="${SECRET:-pilotfish-ca}"' in script
    assert "--from-file=ca.crt=" in script and "--from-file=roots.pem=" in script
    # The kubelet probes a port that answers without TLS.
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/ready"
    assert parse_address("", args.metrics_address)[1] == container_ports(
        pod_spec(named("Deployment", "control-plane"))
    )[probe["port"]]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_the_ca_script_makes_an_intermediate_the_control_plane_signs_with(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        ["bash", str(K8S / "ca-cert.sh"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    settings = CaSettings(
        cert_file=tmp_path / "ca.crt", key_file=tmp_path / "ca.key",
        roots_file=tmp_path / "roots.pem",
    )
    authority = build_authority(settings, time.time)
    identity = SpiffeId("cluster.local", "demo", "greeter")
    key = generate_key()
    issued = authority.sign(build_csr(key, identity), identity)
    svid = Svid(identity, key, issued.chain_pem, authority.bundle.pem(), issued.not_after,
                time.time())
    # The sidecars' own strict TLS contexts accept the chain (leaf + intermediate, root).
    server, client = server_context(svid, True), client_context(svid)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(c_in, c_out)
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    done_sides: set[str] = set()
    for _ in range(10):
        for side_name, side in (("client", tls_client), ("server", tls_server)):
            try:
                side.do_handshake()
                done_sides.add(side_name)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert done_sides == {"client", "server"}
    assert check_peer(tls_server, "cluster.local") == identity


def test_apps_keep_serving_while_their_endpoint_drains() -> None:
    for name, _, sidecar, spec in meshed_pods():
        grace = spec.get("terminationGracePeriodSeconds", 30)
        assert "lifecycle" not in sidecar  # native: it stops after the app, nothing to wait for
        for container in spec["containers"]:
            command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
            if command:
                assert command["command"][0] == "sleep", name
                assert 0 < float(command["command"][1]) < grace - STOP_GRACE, name


def test_inline_scripts_compile() -> None:
    for deployment in of_kind("Deployment"):
        for container in pod_spec(deployment)["containers"]:
            command = container.get("command", [])
            if command[:2] == ["python", "-c"]:
                compile(command[2], deployment["metadata"]["name"], "exec")


def test_the_mesh_in_the_config_map_is_valid_and_names_the_services() -> None:
    config_map = named("ConfigMap", "mesh")
    mesh = parse_mesh_text(config_map["data"]["mesh.yaml"], "k8s mesh")
    SnapshotCache(mesh)  # every proxy view is consistent
    services = {(s["metadata"]["name"], s["metadata"]["namespace"]) for s in of_kind("Service")}
    for service in mesh.services.values():
        assert service.endpoints == ()  # pods come from the Kubernetes API
        if service.port is not None:
            assert (service.name, service.namespace) in services, service.name
    sidecar_services = {flag(sidecar["args"], "--service") for _, _, sidecar, _ in meshed_pods()}
    assert sidecar_services <= set(mesh.services)
    tracing = mesh.telemetry.tracing
    assert tracing is not None
    host, port = parse_address("", tracing.otlp_endpoint.removeprefix("http://"))
    assert service_port(host, port, "demo"), tracing.otlp_endpoint
    args = control_plane_args()
    assert flag(args, "--config") == "/etc/pilotfish/mesh.yaml"
    assert "--kubernetes" in args
    # Sidecars all name a service of the mesh (above), so strangers can be refused.
    assert flag(args, "--unknown-nodes") == "reject"


def test_rbac_reads_services_endpointslices_and_pods_only() -> None:
    role = named("ClusterRole", "pilotfish-control-plane")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == {
        (group, resource, verb)
        for group, resource in (
            ("", "services"),
            ("", "pods"),
            ("discovery.k8s.io", "endpointslices"),
        )
        for verb in ("get", "list", "watch")
    }
    binding = named("ClusterRoleBinding", "pilotfish-control-plane")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    deployment = named("Deployment", "control-plane")
    assert subject["name"] == pod_spec(deployment)["serviceAccountName"]
    assert subject["namespace"] == deployment["metadata"]["namespace"]
    assert named("ServiceAccount", subject["name"])["metadata"]["namespace"] == CONTROL_NAMESPACE


def test_two_control_plane_replicas_and_a_disruption_budget() -> None:
    deployment = named("Deployment", "control-plane")
    assert deployment["spec"]["replicas"] == 2
    pdb = named("PodDisruptionBudget", "control-plane")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 0 < pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_the_webhook_configuration_reaches_the_control_plane() -> None:
    (hook,) = named("MutatingWebhookConfiguration", "pilotfish-sidecar-injector")["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["namespaceSelector"] == {"matchLabels": {NAMESPACE_LABEL: "enabled"}}
    assert hook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "operations": ["CREATE"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    ref = hook["clientConfig"]["service"]
    assert ref["path"] == WEBHOOK_PATH
    service = named("Service", ref["name"])
    assert service["metadata"]["namespace"] == ref["namespace"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]]
    deployment = named("Deployment", "control-plane")
    target = container_ports(pod_spec(deployment))[port["targetPort"]]
    args = control_plane_args()
    assert parse_address("", flag(args, "--webhook-address")) == ("0.0.0.0", target)
    # The certificate and key come from the Secret the script makes.
    (container,) = pod_spec(deployment)["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    (tls_volume,) = [
        name for name, path in mounts.items()
        if Path(path) == Path(flag(args, "--webhook-cert")).parent
    ]
    assert Path(flag(args, "--webhook-key")).parent == Path(mounts[tls_volume])
    script = (K8S / "webhook-cert.sh").read_text()
    assert f'SECRET="${{SECRET:-{volumes[tls_volume]["secret"]["secretName"]}}}"' in script
    assert 'WEBHOOK="${WEBHOOK:-pilotfish-sidecar-injector}"' in script


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_the_certificate_script_makes_a_certificate_for_the_service(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(K8S / "webhook-cert.sh"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    client = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    # A TLS handshake in memory, as the API server makes it: the name it dials, our CA.
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    tls_client = client.wrap_bio(c_in, c_out, server_hostname="control-plane.pilotfish.svc")
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    done_sides: set[str] = set()
    for _ in range(10):
        for name, side in (("client", tls_client), ("server", tls_server)):
            try:
                side.do_handshake()
                done_sides.add(name)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    assert done_sides == {"client", "server"}


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
        source
        for line in text.splitlines()
        if line.startswith("COPY ")
        for source in shlex.split(line)[1:-1]
    }
    # setup.py: the build step that bundles opentelemetry-proto's descriptors.
    assert {"pilotfish", "sidecar", "control_plane", "pyproject.toml", "setup.py"} <= copied
    ignore = (K8S / "Dockerfile.dockerignore").read_text().splitlines()
    assert {f"!{name}" for name in copied} <= set(ignore)
