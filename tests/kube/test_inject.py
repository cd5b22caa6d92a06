"""``pilotfish inject``: the real command on multi-document YAML, its output validated against
the Kubernetes API schemas (kubernetes-validate, strict, offline) for 1.29 to 1.33."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from control_plane.kube.inject import (
    INIT,
    SIDECAR,
    TEMPLATE_PATHS,
    InjectError,
    InjectOptions,
    inject_pod,
)
from tests.kube.manifests import untouched, workloads

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")


def inject(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pilotfish", "inject", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("inject") / "app.yaml"
    path.write_text(yaml.safe_dump_all([*workloads(), *untouched()], sort_keys=False))
    return path


@pytest.fixture(scope="module")
def injected(source: Path) -> list[dict[str, Any]]:
    done = inject("-f", str(source))
    assert done.returncode == 0, done.stderr
    return list(yaml.safe_load_all(done.stdout))


def _template(obj: dict[str, Any]) -> dict[str, Any]:
    found: Any = obj
    for key in TEMPLATE_PATHS[obj["kind"]]:
        found = found[key]
    return found  # type: ignore[no-any-return]


def _containers(obj: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    spec = _template(obj)["spec"]
    init = {c["name"]: c for c in spec.get("initContainers", [])}
    return init[INIT], init[SIDECAR], [c["name"] for c in spec["containers"]]


def _arg(container: dict[str, Any], flag: str) -> str:
    args = container["args"]
    return str(args[args.index(flag) + 1])


def test_every_workload_kind_is_injected_and_other_kinds_are_not(
    injected: list[dict[str, Any]],
) -> None:
    assert len(injected) == len(workloads()) + len(untouched())
    for obj in injected[: len(workloads())]:
        init, sidecar, containers = _containers(obj)
        assert containers == ["app"], obj["kind"]  # native: the sidecar is an init container
        spec = _template(obj)["spec"]
        assert [c["name"] for c in spec["initContainers"]] == [INIT, SIDECAR]
        assert sidecar["restartPolicy"] == "Always"
        assert sidecar["startupProbe"]["httpGet"] == {"path": "/ready", "port": 15021}
        assert init["securityContext"]["capabilities"] == {
            "add": ["NET_ADMIN", "NET_RAW"],
            "drop": ["ALL"],
        }
        assert sidecar["securityContext"]["runAsUser"] == 1337
        assert "capabilities" not in spec.get("securityContext", {})
        assert _arg(sidecar, "--admin-address") == "127.0.0.1:15000"
        assert _arg(sidecar, "--health-address") == "0.0.0.0:15021"
        assert _arg(sidecar, "--app-address") == "127.0.0.1:8080"
        assert _template(obj)["metadata"]["annotations"]["pilotfish.io/status"] == "injected"
    assert injected[len(workloads()) :] == untouched()


def test_probes_on_the_served_port_go_through_the_sidecar_others_are_excluded(
    injected: list[dict[str, Any]],
) -> None:
    web = injected[0]
    init, sidecar, _ = _containers(web)
    # readiness on "http" (8080, the served port) stays intercepted; liveness on "mgmt" (9090)
    # and the startup tcpSocket on 9091 reach the app directly. Probes are not rewritten.
    assert _arg(init, "--exclude-inbound-ports") == "15021,9090,9091"
    app = _template(web)["spec"]["containers"][0]
    assert app["readinessProbe"] == {"httpGet": {"path": "/ready", "port": "http"}}
    assert _arg(sidecar, "--service") == "web"


def test_annotations_override_ports_resources_and_log_level(
    injected: list[dict[str, Any]],
) -> None:
    db = {o["kind"]: o for o in injected}["StatefulSet"]
    assert _arg(_containers(db)[1], "--log-level") == "debug"
    agent = {o["kind"]: o for o in injected}["DaemonSet"]
    init, sidecar, _ = _containers(agent)
    assert _arg(init, "--exclude-outbound-ports") == "5432,6379"
    assert _arg(init, "--exclude-outbound-cidrs") == "169.254.169.254/32"
    assert _arg(init, "--exclude-inbound-ports") == "15021,9100"
    assert sidecar["resources"] == {
        "requests": {"cpu": "200m", "memory": "128Mi"},
        "limits": {"memory": "1Gi"},
    }


def test_injecting_twice_changes_nothing_and_stdin_works(source: Path) -> None:
    once = inject("-f", str(source))
    twice = inject("-f", "-", stdin=once.stdout)
    assert twice.returncode == 0, twice.stderr
    assert twice.stdout == once.stdout


def test_classic_layout(source: Path) -> None:
    done = inject("-f", str(source), "--classic")
    assert done.returncode == 0, done.stderr
    web = next(yaml.safe_load_all(done.stdout))
    spec = _template(web)["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [INIT]
    sidecar = spec["containers"][-1]
    assert sidecar["name"] == SIDECAR and "restartPolicy" not in sidecar
    assert "preStop" in sidecar["lifecycle"]
    for version in VERSIONS:
        kubernetes_validate.validate(web, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_output_validates_strictly(injected: list[dict[str, Any]], version: str) -> None:
    for obj in injected:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_kubernetes_validate_command_accepts_the_output(
    injected: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "injected.yaml"
    path.write_text(yaml.safe_dump_all(injected))
    command = Path(sys.executable).with_name("kubernetes-validate")
    for version in (VERSIONS[0], VERSIONS[-1]):
        done = subprocess.run(
            [str(command), "--strict", "--quiet", "-k", version, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_strict_check_can_fail(injected: list[dict[str, Any]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(injected[0]))
    _template(broken)["spec"]["initContainers"][1]["restartPolicy_typo"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def test_bad_annotations_name_the_field(tmp_path: Path) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": {"pilotfish.io/exclude-inbound-ports": "80,x"}},
        "spec": {"containers": [{"name": "app", "image": "x"}]},
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(pod))
    done = inject("-f", str(path))
    assert done.returncode == 2
    assert "metadata.annotations.pilotfish.io/exclude-inbound-ports: 'x' is not a port" in (
        done.stderr
    )
    with pytest.raises(InjectError, match="log-level"):
        inject_pod(
            {"metadata": {"annotations": {"pilotfish.io/log-level": "loud"}}, "spec": pod["spec"]},
            InjectOptions(),
            "p",
        )


def test_an_app_running_as_the_sidecar_uid_is_an_error() -> None:
    spec = {"securityContext": {"runAsUser": 1337}, "containers": [{"name": "a", "image": "x"}]}
    with pytest.raises(InjectError, match=r"^spec.securityContext.runAsUser: 1337 is the sidecar"):
        inject_pod({"metadata": {}, "spec": spec}, InjectOptions(), "p")
    spec["containers"][0]["securityContext"] = {"runAsUser": 1000}  # type: ignore[index]
    assert inject_pod({"metadata": {}, "spec": spec}, InjectOptions(), "p")["spec"]


def test_host_network_pods_are_left_alone() -> None:
    pod = {"metadata": {}, "spec": {"hostNetwork": True, "containers": [{"name": "a"}]}}
    assert inject_pod(pod, InjectOptions(), "p") == pod


def test_workload_identity_projects_a_ca_token_and_the_roots(
    source: Path, tmp_path: Path
) -> None:
    roots = tmp_path / "roots.pem"
    roots.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    done = inject(
        "-f", str(source), "--ca-address", "control-plane.pilotfish.svc:15012",
        "--xds-address", "control-plane.pilotfish.svc:15011", "--ca-roots", str(roots),
    )
    assert done.returncode == 0, done.stderr
    objects = list(yaml.safe_load_all(done.stdout))
    web = objects[0]
    template = _template(web)
    _, sidecar, _ = _containers(web)
    assert _arg(sidecar, "--ca") == "control-plane.pilotfish.svc:15012"
    assert _arg(sidecar, "--xds") == "control-plane.pilotfish.svc:15011"
    assert _arg(sidecar, "--service-account") == "$(POD_SERVICE_ACCOUNT)"
    token_path = _arg(sidecar, "--ca-token-file")
    roots_path = _arg(sidecar, "--control-plane-roots")
    (mount,) = sidecar["volumeMounts"]
    assert mount["readOnly"] and token_path.startswith(mount["mountPath"] + "/")
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    token, downward = volume["projected"]["sources"]
    assert token["serviceAccountToken"] == {
        "audience": "pilotfish-ca", "expirationSeconds": 3600,
        "path": token_path.rsplit("/", 1)[1],
    }
    (item,) = downward["downwardAPI"]["items"]
    assert item["path"] == roots_path.rsplit("/", 1)[1]
    assert item["fieldRef"]["fieldPath"] == "metadata.annotations['pilotfish.io/ca-roots']"
    assert template["metadata"]["annotations"]["pilotfish.io/ca-roots"] == roots.read_text()
    # The app's own volumes are kept, and only the sidecar mounts the token.
    for container in template["spec"]["containers"]:
        assert all(m["name"] != mount["name"] for m in container.get("volumeMounts", []))
    for obj in objects:
        kubernetes_validate.validate(obj, VERSIONS[-1], strict=True)
    twice = inject("-f", "-", "--ca-address", "x:1", "--ca-roots", str(roots), stdin=done.stdout)
    assert twice.stdout == done.stdout


def test_workload_identity_needs_the_roots(source: Path, tmp_path: Path) -> None:
    done = inject("-f", str(source), "--ca-address", "control-plane.pilotfish.svc:15012")
    assert done.returncode == 2
    assert "--ca-address needs --ca-roots" in done.stderr
    (tmp_path / "empty.pem").write_text("")
    done = inject("-f", str(source), "--ca-address", "cp:15012",
                  "--ca-roots", str(tmp_path / "empty.pem"))
    assert done.returncode == 2 and "no PEM certificate" in done.stderr
    with pytest.raises(InjectError, match="root certificates"):
        inject_pod({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}},
                   InjectOptions(ca_address="cp:15012"))
