"""Add the Pilotfish sidecar to pod specs: ``pilotfish inject`` and the admission webhook.

Pure functions over the JSON/YAML objects (dictionaries); nothing here reads a cluster.

A meshed pod gets two containers, from the one Pilotfish image:

* ``pilotfish-init``, an init container that installs the interception rules
  (``pilotfish iptables apply``): root, with only ``NET_ADMIN`` and ``NET_RAW``;
* ``pilotfish``, the sidecar, as UID 1337. By default a native sidecar (an init container with
  ``restartPolicy: Always``, Kubernetes 1.29+): its startup probe holds the app back until it is
  ready, it stops after the app, and a Job's pod completes when its app does. ``native=False``
  puts it among the containers instead, for older clusters.

Probes. The kubelet's probes come from the node to the pod's IP, so interception would send
them to the sidecar's inbound port. A probe on the port the sidecar delivers inbound calls to
(the app's first container port) goes through the sidecar to the app like any call: it then
also says that the sidecar is up. A probe on any other port is excluded from interception
(``--exclude-inbound-ports``), so the kubelet reaches the app directly; a probe is never
rewritten. The sidecar's own probes use its health port (15021), which serves readiness only.

Annotations on the pod (template) override the defaults:

* ``sidecar.pilotfish.io/inject: "false"``: leave this pod alone;
* ``pilotfish.io/exclude-inbound-ports``, ``pilotfish.io/exclude-outbound-ports``,
  ``pilotfish.io/exclude-outbound-cidrs``: comma-separated, added to the excluded ones;
* ``pilotfish.io/proxy-cpu``, ``pilotfish.io/proxy-memory``, ``pilotfish.io/proxy-memory-limit``:
  the sidecar's requests and memory limit;
* ``pilotfish.io/log-level``: ``debug``, ``info``, ``warning`` or ``error``;
* ``pilotfish.io/service``: the mesh service name (default: the ``app.kubernetes.io/name`` or
  ``app`` label, else the workload's name).

Workload identity. With ``ca_address`` set, the sidecar gets its certificate from the control
plane's CA and holds its xDS stream over mutual TLS (``xds_address`` is then the mTLS port):
a projected volume gives it a service-account token for the CA's audience (``pilotfish-ca``,
short-lived and refreshed by the kubelet; the pod's own API token is not used) and the mesh's
root certificates, which the injector writes into the pod's ``pilotfish.io/ca-roots``
annotation and the volume exposes as a file (a new pod cannot learn them from the CA it has
yet to trust). The identity is the pod's service account.

Injection marks the pod with ``pilotfish.io/status: injected``; a marked pod, or one that
already has a container named ``pilotfish``, is returned unchanged, so injecting twice is
the same as injecting once. A ``hostNetwork`` pod is left alone (its network is the node's),
and an app that runs as the sidecar's UID is an error (its traffic would bypass the sidecar).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

SIDECAR = "pilotfish"
INIT = "pilotfish-init"
STATUS_ANNOTATION = "pilotfish.io/status"
INJECT_ANNOTATION = "sidecar.pilotfish.io/inject"
NAMESPACE_LABEL = "pilotfish.io/inject"
EXCLUDE_INBOUND = "pilotfish.io/exclude-inbound-ports"
EXCLUDE_OUTBOUND = "pilotfish.io/exclude-outbound-ports"
EXCLUDE_CIDRS = "pilotfish.io/exclude-outbound-cidrs"
PROXY_CPU = "pilotfish.io/proxy-cpu"
PROXY_MEMORY = "pilotfish.io/proxy-memory"
PROXY_MEMORY_LIMIT = "pilotfish.io/proxy-memory-limit"
LOG_LEVEL = "pilotfish.io/log-level"
SERVICE = "pilotfish.io/service"
CA_ROOTS_ANNOTATION = "pilotfish.io/ca-roots"
IDENTITY_VOLUME = "pilotfish-identity"
IDENTITY_DIR = "/var/run/secrets/pilotfish"
TOKEN_FILE = "token"
ROOTS_FILE = "ca-roots.pem"
LOG_LEVELS = ("debug", "info", "warning", "error")

# Where the pod template lives in each kind we inject; other kinds pass through untouched.
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


class InjectError(ValueError):
    """A manifest or annotation that cannot be injected; the message names the field."""


@dataclass(frozen=True, slots=True)
class InjectOptions:
    image: str = "pilotfish:dev"
    image_pull_policy: str = "IfNotPresent"
    xds_address: str = "control-plane.pilotfish.svc:15010"
    native: bool = True
    proxy_uid: int = 1337
    inbound_port: int = 15006
    outbound_port: int = 15001
    admin_port: int = 15000
    health_port: int = 15021
    log_level: str = "info"
    cpu: str = "50m"
    memory: str = "64Mi"
    memory_limit: str = "256Mi"
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = field(default=())
    # Seconds the classic-layout sidecar keeps serving after its pod is told to stop.
    drain_seconds: int = 10
    # Workload identity: the CA's TLS port ("" leaves the sidecar without identity, talking
    # plaintext xDS), the roots sidecars verify the control plane with, the token's audience.
    ca_address: str = ""
    ca_roots_pem: str = ""
    ca_token_audience: str = "pilotfish-ca"
    token_seconds: int = 3600
    trust_domain: str = "cluster.local"


def inject_documents(docs: Iterable[Any], options: InjectOptions) -> list[Any]:
    """Every document with its pod template injected; other kinds (and None) unchanged."""
    return [inject_object(doc, options) if isinstance(doc, dict) else doc for doc in docs]


def inject_object(obj: dict[str, Any], options: InjectOptions) -> dict[str, Any]:
    """A copy of ``obj`` with the sidecar in its pod template, if its kind has one."""
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in TEMPLATE_PATHS:
        return obj
    path = TEMPLATE_PATHS[kind]
    result = copy.deepcopy(obj)
    template: Any = result
    where = kind
    for key in path:
        where = f"{where}.{key}"
        template = template.get(key) if isinstance(template, dict) else None
        if not isinstance(template, dict):
            raise InjectError(f"{where}: expected an object")
    name = (obj.get("metadata") or {}).get("name") or ""
    injected = inject_pod(template, options, default_service=str(name))
    template.clear()
    template.update(injected)
    return result


def wants_injection(pod: Mapping[str, Any]) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(INJECT_ANNOTATION, "true")).lower() not in ("false", "no", "0")


def is_injected(pod: Mapping[str, Any]) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    spec = pod.get("spec") or {}
    names = {
        c.get("name") for c in (spec.get("containers") or []) + (spec.get("initContainers") or [])
    }
    return STATUS_ANNOTATION in annotations or SIDECAR in names


def inject_pod(
    pod: Mapping[str, Any], options: InjectOptions, default_service: str = ""
) -> dict[str, Any]:
    """A pod (or pod template: ``metadata`` and ``spec``) with the sidecar added."""
    result = copy.deepcopy(dict(pod))
    if not wants_injection(result) or is_injected(result):
        return result
    metadata = result.setdefault("metadata", {})
    spec = result.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
        raise InjectError("spec.containers: required")
    if spec.get("hostNetwork"):
        return result  # the node's network namespace: interception would capture the node
    _check_not_proxy_uid(spec, options.proxy_uid)
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    options = _with_annotations(options, annotations)
    service = str(
        annotations.get(SERVICE)
        or labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or default_service
        or metadata.get("generateName", "").rstrip("-")
    )
    if not service:
        raise InjectError(f"metadata.annotations.{SERVICE}: no service name to give the sidecar")
    app_port = _app_port(spec["containers"])
    probe_ports = _probe_ports(spec["containers"]) - ({app_port} if app_port else set())
    init = _init_container(options, sorted(probe_ports))
    sidecar = _sidecar_container(options, service, app_port)
    inits = list(spec.get("initContainers") or [])
    identity: dict[str, str] = {}
    if options.ca_address:
        if not options.ca_roots_pem:
            raise InjectError("the CA's root certificates are needed to inject an identity")
        spec["volumes"] = [*(spec.get("volumes") or []), _identity_volume(options)]
        identity[CA_ROOTS_ANNOTATION] = options.ca_roots_pem
    if options.native:
        sidecar["restartPolicy"] = "Always"
        spec["initContainers"] = [init, sidecar, *inits]
    else:
        spec["initContainers"] = [init, *inits]
        spec["containers"] = [*spec["containers"], sidecar]
        # The classic sidecar fails readiness, then drains, before its SIGTERM.
        grace = spec.get("terminationGracePeriodSeconds", 30)
        spec["terminationGracePeriodSeconds"] = max(grace, options.drain_seconds + 10)
    metadata["annotations"] = {**annotations, **identity, STATUS_ANNOTATION: "injected"}
    return result


def _identity_volume(options: InjectOptions) -> dict[str, Any]:
    roots_field = f"metadata.annotations['{CA_ROOTS_ANNOTATION}']"
    return {
        "name": IDENTITY_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": options.ca_token_audience,
                        "expirationSeconds": options.token_seconds,
                        "path": TOKEN_FILE,
                    }
                },
                {
                    "downwardAPI": {
                        "items": [{"path": ROOTS_FILE, "fieldRef": {"fieldPath": roots_field}}]
                    }
                },
            ],
        },
    }


def _check_not_proxy_uid(spec: Mapping[str, Any], uid: int) -> None:
    """The rules let the sidecar's UID out untouched: an app running as it would bypass the
    sidecar without a trace, so that is an error."""
    pod_uid = (spec.get("securityContext") or {}).get("runAsUser")
    for i, container in enumerate(spec["containers"]):
        own = (container.get("securityContext") or {}).get("runAsUser")
        if (own if own is not None else pod_uid) == uid:
            where = (
                f"spec.containers[{i}].securityContext.runAsUser"
                if own is not None
                else "spec.securityContext.runAsUser"
            )
            raise InjectError(
                f"{where}: {uid} is the sidecar's UID; the app's traffic would bypass the sidecar"
            )


def _with_annotations(options: InjectOptions, annotations: Mapping[str, Any]) -> InjectOptions:
    def ports(key: str) -> tuple[int, ...]:
        text = str(annotations.get(key, "")).strip()
        found = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            if not part.isdigit() or not 0 < int(part) < 65536:
                raise InjectError(f"metadata.annotations.{key}: {part!r} is not a port")
            found.append(int(part))
        return tuple(found)

    level = str(annotations.get(LOG_LEVEL, options.log_level))
    if level not in LOG_LEVELS:
        raise InjectError(
            f"metadata.annotations.{LOG_LEVEL}: expected one of {', '.join(LOG_LEVELS)}"
        )
    cidrs = tuple(
        c.strip() for c in str(annotations.get(EXCLUDE_CIDRS, "")).split(",") if c.strip()
    )
    return replace(
        options,
        log_level=level,
        cpu=str(annotations.get(PROXY_CPU, options.cpu)),
        memory=str(annotations.get(PROXY_MEMORY, options.memory)),
        memory_limit=str(annotations.get(PROXY_MEMORY_LIMIT, options.memory_limit)),
        exclude_inbound_ports=options.exclude_inbound_ports + ports(EXCLUDE_INBOUND),
        exclude_outbound_ports=options.exclude_outbound_ports + ports(EXCLUDE_OUTBOUND),
        exclude_outbound_cidrs=options.exclude_outbound_cidrs + cidrs,
    )


def _app_port(containers: list[Any]) -> int | None:
    """The first TCP container port: where the sidecar delivers inbound calls."""
    for container in containers:
        for port in container.get("ports") or []:
            if port.get("protocol", "TCP") == "TCP" and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return None


def _probe_ports(containers: list[Any]) -> set[int]:
    """Numeric ports of the app's HTTP, TCP and gRPC probes (named ports resolved)."""
    found: set[int] = set()
    for container in containers:
        named = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
        for key in ("livenessProbe", "readinessProbe", "startupProbe"):
            probe = container.get(key) or {}
            for kind in ("httpGet", "tcpSocket", "grpc"):
                port = (probe.get(kind) or {}).get("port")
                port = named.get(port, port) if isinstance(port, str) else port
                if isinstance(port, int):
                    found.add(port)
    return found


def _csv(values: Iterable[object]) -> str:
    return ",".join(str(v) for v in values)


def _init_container(options: InjectOptions, probe_ports: list[int]) -> dict[str, Any]:
    excluded = [options.health_port, *probe_ports, *options.exclude_inbound_ports]
    args = [
        "iptables",
        "apply",
        "--inbound-port",
        str(options.inbound_port),
        "--outbound-port",
        str(options.outbound_port),
        "--proxy-uid",
        str(options.proxy_uid),
        "--exclude-inbound-ports",
        _csv(dict.fromkeys(excluded)),
    ]
    if options.exclude_outbound_ports:
        args += ["--exclude-outbound-ports", _csv(options.exclude_outbound_ports)]
    if options.exclude_outbound_cidrs:
        args += ["--exclude-outbound-cidrs", _csv(options.exclude_outbound_cidrs)]
    return {
        "name": INIT,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "args": args,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
    }


def _sidecar_container(
    options: InjectOptions, service: str, app_port: int | None
) -> dict[str, Any]:
    args = [
        "sidecar",
        "--xds",
        options.xds_address,
        "--node-id",
        "$(POD_NAME)",
        "--service",
        service,
        "--namespace",
        "$(POD_NAMESPACE)",
        "--outbound-address",
        f"127.0.0.1:{options.outbound_port}",
        "--outbound-passthrough",
        "original-destination",
        "--admin-address",
        f"127.0.0.1:{options.admin_port}",
        "--health-address",
        f"0.0.0.0:{options.health_port}",
        "--log-level",
        options.log_level,
    ]
    if app_port is not None:
        args += [
            "--app-address",
            f"127.0.0.1:{app_port}",
            "--inbound-address",
            f"0.0.0.0:{options.inbound_port}",
        ]
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    mounts = []
    if options.ca_address:
        args += [
            "--ca", options.ca_address,
            "--ca-token-file", f"{IDENTITY_DIR}/{TOKEN_FILE}",
            "--control-plane-roots", f"{IDENTITY_DIR}/{ROOTS_FILE}",
            "--service-account", "$(POD_SERVICE_ACCOUNT)",
            "--trust-domain", options.trust_domain,
        ]  # fmt: skip
        env.append({
            "name": "POD_SERVICE_ACCOUNT",
            "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}},
        })
        mounts.append({"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": True})
    ready = {"httpGet": {"path": "/ready", "port": options.health_port}}
    container: dict[str, Any] = {
        "name": SIDECAR,
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "args": args,
        "env": env,
        "ports": [{"name": "pf-health", "containerPort": options.health_port}],
        "startupProbe": {**ready, "periodSeconds": 1, "failureThreshold": 60},
        "readinessProbe": {**ready, "periodSeconds": 2, "failureThreshold": 1},
        "securityContext": {
            "runAsUser": options.proxy_uid,
            "runAsGroup": options.proxy_uid,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "resources": {
            "requests": {"cpu": options.cpu, "memory": options.memory},
            "limits": {"memory": options.memory_limit},
        },
    }
    if mounts:
        container["volumeMounts"] = mounts
    if not options.native:
        # A classic sidecar gets SIGTERM with the app: fail readiness first and keep serving
        # while the endpoint's removal spreads, then drain on SIGTERM.
        fail = (
            "import time, urllib.request as r; r.urlopen(r.Request("
            f'"http://127.0.0.1:{options.admin_port}/healthcheck/fail", method="POST"),'
            f" timeout=2); time.sleep({options.drain_seconds})"
        )
        container["lifecycle"] = {"preStop": {"exec": {"command": ["python", "-c", fail]}}}
    return container
