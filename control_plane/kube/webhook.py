"""The injection webhook: a mutating admission webhook served by the control plane over TLS.

The API server POSTs an ``AdmissionReview`` (``admission.k8s.io/v1``) for every Pod created in
a namespace labelled ``pilotfish.io/inject=enabled`` (the MutatingWebhookConfiguration's
``namespaceSelector``: the webhook never sees the others). The answer allows the Pod, with a
JSON patch that adds the sidecar, exactly as ``pilotfish inject`` would (``inject.py``). A Pod
that opts out (``sidecar.pilotfish.io/inject: "false"``) or is already injected is allowed
unchanged. A Pod whose Pilotfish annotations are wrong is denied, with the field named: it
asked for the mesh and would otherwise run without it unnoticed.

``review`` is pure (a dictionary in, a dictionary out); ``start_webhook`` serves it with
aiohttp on an HTTPS port.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from control_plane.kube.inject import (
    InjectError,
    InjectOptions,
    inject_pod,
    is_injected,
    wants_injection,
)

log = logging.getLogger(__name__)

API_VERSION = "admission.k8s.io/v1"
PATH = "/inject"
# The API server's own limit for a review body is 3 MiB; a Pod is far smaller.
MAX_BODY = 3 * 1024 * 1024


class BadReview(ValueError):
    """Not an AdmissionReview this webhook can answer; the message names the field."""


def review(body: Any, options: InjectOptions) -> dict[str, Any]:
    """The AdmissionReview response for the review ``body``."""
    if not isinstance(body, dict):
        raise BadReview("expected a JSON object")
    if body.get("apiVersion") != API_VERSION or body.get("kind") != "AdmissionReview":
        raise BadReview(f"apiVersion, kind: expected {API_VERSION} AdmissionReview")
    request = body.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise BadReview("request.uid: required")
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    answer = {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
    pod = request.get("object")
    kind = (request.get("kind") or {}).get("kind")
    if kind != "Pod" or request.get("operation", "CREATE") != "CREATE" or not isinstance(pod, dict):
        return answer  # only Pod creation is ours; anything else passes untouched
    if not wants_injection(pod) or is_injected(pod):
        return answer
    labels = (pod.get("metadata") or {}).get("labels") or {}
    try:
        injected = inject_pod(pod, options, default_service=_owner_name(pod, labels))
    except InjectError as exc:
        response["allowed"] = False
        response["status"] = {"code": 400, "message": f"pilotfish injection: {exc}"}
        return answer
    patch = json_patch(pod, injected)
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return answer


def _owner_name(pod: Mapping[str, Any], labels: Mapping[str, Any]) -> str:
    """A service name when the labels give none: the Pod's generateName without the hash
    suffixes a ReplicaSet adds (``web-7f5b9c-`` → ``web``)."""
    generate = str((pod.get("metadata") or {}).get("generateName") or "").rstrip("-")
    owners = (pod.get("metadata") or {}).get("ownerReferences") or []
    if owners and owners[0].get("kind") == "ReplicaSet" and "-" in generate:
        generate = generate.rsplit("-", 1)[0]
    return generate or str((pod.get("metadata") or {}).get("name") or "")


def json_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """RFC 6902 operations turning ``before`` into ``after``, for what injection changes:
    whole fields of ``spec`` and of ``metadata`` (its annotations), added or replaced."""
    ops: list[dict[str, Any]] = []
    for section in ("metadata", "spec"):
        old, new = before.get(section) or {}, after.get(section) or {}
        if section not in before:
            ops.append({"op": "add", "path": f"/{section}", "value": new})
            continue
        for key, value in new.items():
            if old.get(key) != value:
                op = "replace" if key in old else "add"
                ops.append({"op": op, "path": f"/{section}/{_escape(key)}", "value": value})
    return ops


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


async def start_webhook(
    options: InjectOptions, host: str, port: int, tls: ssl.SSLContext
) -> web.AppRunner:
    """Serve ``POST /inject`` (and ``GET /healthz``) over TLS; returns the runner to stop."""

    async def inject(request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=json.loads)
            answer = review(body, options)
        except (ValueError, BadReview) as exc:
            log.warning("webhook: bad review from %s: %s", request.remote, exc)
            return web.json_response({"error": str(exc)}, status=400)
        response = answer["response"]
        log.info(
            "webhook: %s %s",
            response["uid"],
            "patched" if "patch" in response else "allowed" if response["allowed"] else "denied",
        )
        return web.json_response(answer)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(PATH, inject)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=tls).start()
    return runner
