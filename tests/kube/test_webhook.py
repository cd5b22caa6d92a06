"""The injection webhook, as the API server calls it: a real ``pilotfish control-plane``
process serving HTTPS with a certificate the test made, AdmissionReview v1 JSON over TLS
verified against the test's CA, and the JSON patch applied with an independent library
(jsonpatch) to check the Pod it makes against the Kubernetes schemas."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest

from tests.kube.certs import Certs, make_certs
from tests.support import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = ("1.29.0", "1.30.0", "1.31.0", "1.32.0", "1.33.0")


@dataclass
class Webhook:
    url: str
    context: ssl.SSLContext
    process: subprocess.Popen[bytes]
    log: Path

    def post(self, body: bytes) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.context) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def review(self, pod: dict[str, Any], uid: str = "7d0e-1") -> dict[str, Any]:
        status, answer = self.post(json.dumps(admission_review(pod, uid)).encode())
        assert status == 200, answer
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == uid
        return answer["response"]  # type: ignore[no-any-return]


def admission_review(pod: dict[str, Any], uid: str) -> dict[str, Any]:
    """What the API server sends for a Pod created by a ReplicaSet."""
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def pod(annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "generateName": "web-7f5b9c6d4-",
        "namespace": "shop",
        "labels": {"pod-template-hash": "7f5b9c6d4"},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "name": "web-7f5b9c6d4",
                "uid": "0a1b",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "example/web:1",
                    "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}},
                    "livenessProbe": {"httpGet": {"path": "/live", "port": 9090}},
                }
            ],
            "restartPolicy": "Always",
            "serviceAccountName": "default",
        },
    }


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webhook]:
    directory = tmp_path_factory.mktemp("webhook")
    certs: Certs = make_certs(
        directory, ["control-plane.pilotfish.svc", "localhost"], ["127.0.0.1"]
    )
    mesh = directory / "mesh.yaml"
    mesh.write_text("services: {}\n")
    port = free_port()
    log = directory / "control-plane.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pilotfish",
                "control-plane",
                "--config",
                str(mesh),
                "--port",
                str(free_port()),
                "--webhook-address",
                f"127.0.0.1:{port}",
                "--webhook-cert",
                str(certs.cert),
                "--webhook-key",
                str(certs.key),
                "--inject-image",
                "registry.example/pilotfish:1.0",
                # Injected pods get an identity: the CA's roots travel in their annotation.
                "--ca-dir",
                str(directory / "ca"),
                "--inject-ca-address",
                "control-plane.pilotfish.svc:15012",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    context = ssl.create_default_context(cafile=str(certs.ca))
    hook = Webhook(f"https://localhost:{port}/inject", context, process, log)
    try:
        assert wait_for(lambda: "injection webhook on" in log.read_text(), 20), log.read_text()
        yield hook
    finally:
        process.terminate()
        process.wait(10)


def _patched(original: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    result: dict[str, Any] = jsonpatch.apply_patch(original, patch)
    return result


def test_a_new_pod_gets_the_sidecar_by_json_patch(webhook: Webhook) -> None:
    original = pod()
    patched = _patched(original, webhook.review(original))
    inits = {c["name"]: c for c in patched["spec"]["initContainers"]}
    assert list(inits) == ["pilotfish-init", "pilotfish"]
    sidecar = inits["pilotfish"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == "registry.example/pilotfish:1.0"
    args = sidecar["args"]
    assert args[args.index("--service") + 1] == "web"  # from the ReplicaSet's generateName
    init_args = inits["pilotfish-init"]["args"]
    assert init_args[init_args.index("--exclude-inbound-ports") + 1] == "15021,9090"
    roots = (webhook.log.parent / "ca" / "root-cert.pem").read_text()
    assert patched["metadata"]["annotations"] == {
        "pilotfish.io/status": "injected", "pilotfish.io/ca-roots": roots,
    }
    assert args[args.index("--ca") + 1] == "control-plane.pilotfish.svc:15012"
    (volume,) = patched["spec"]["volumes"]
    token = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "pilotfish-ca"
    assert patched["spec"]["containers"] == original["spec"]["containers"]
    for version in VERSIONS:
        kubernetes_validate.validate(patched, version, strict=True)


def test_an_injected_pod_is_allowed_untouched(webhook: Webhook) -> None:
    once = _patched(pod(), webhook.review(pod()))
    response = webhook.review(once, uid="7d0e-2")
    assert response == {"uid": "7d0e-2", "allowed": True}


def test_a_pod_that_opts_out_is_allowed_untouched(webhook: Webhook) -> None:
    response = webhook.review(pod({"sidecar.pilotfish.io/inject": "false"}), uid="7d0e-3")
    assert response == {"uid": "7d0e-3", "allowed": True}


def test_bad_annotations_deny_the_pod_naming_the_field(webhook: Webhook) -> None:
    response = webhook.review(pod({"pilotfish.io/log-level": "loud"}), uid="7d0e-4")
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert "metadata.annotations.pilotfish.io/log-level" in response["status"]["message"]


def test_a_malformed_review_is_a_400_and_the_webhook_keeps_serving(webhook: Webhook) -> None:
    status, answer = webhook.post(b"{not json")
    assert status == 400
    status, answer = webhook.post(json.dumps({"apiVersion": "v1", "kind": "Pod"}).encode())
    assert status == 400 and "AdmissionReview" in answer["error"]
    assert webhook.review(pod(), uid="7d0e-5")["allowed"] is True


def test_a_client_that_does_not_trust_the_ca_is_refused_by_tls(webhook: Webhook) -> None:
    untrusting = ssl.create_default_context()
    request = urllib.request.Request(webhook.url, data=b"{}", method="POST")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(request, timeout=10, context=untrusting)
