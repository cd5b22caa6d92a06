"""Service-account tokens checked through TokenReview: the real Kubernetes client library
against an HTTP server answering the TokenReview API, then the CA over gRPC end to end."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from control_plane.ca.auth import KubernetesTokens, ReviewUnavailable, Unauthenticated
from control_plane.ca.settings import CaSettings
from control_plane.ca.token_review import KubeTokenReviewer
from control_plane.kube.options import KubernetesOptions
from control_plane.kube.watch import api_client
from control_plane.main import start_control_plane
from pilotfish.gen.pilotfish.ca.v1 import ca_pb2, ca_pb2_grpc
from pilotfish.identity import SpiffeId
from sidecar.security.csr import build_csr, generate_key
from tests.control_plane.helpers import MESH_YAML

# What the API server knows: token -> (username, audiences).
TOKENS = {
    "pod-token": ("system:serviceaccount:shop:cart", ["pilotfish-ca"]),
    "other-audience": ("system:serviceaccount:shop:cart", ["vault"]),
}


class TokenReviewApi:
    def __init__(self) -> None:
        self.reviews: list[dict[str, Any]] = []
        self.fail = False
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                api.reviews.append(body)
                if api.fail or self.path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    self._send(500, {"kind": "Status", "status": "Failure", "code": 500})
                    return
                spec = body["spec"]
                known = TOKENS.get(spec["token"])
                wanted = set(spec.get("audiences") or [])
                status: dict[str, Any] = {"authenticated": False, "error": "invalid token"}
                if known is not None and (not wanted or wanted & set(known[1])):
                    status = {
                        "authenticated": True,
                        "user": {"username": known[0]},
                        "audiences": sorted(wanted & set(known[1])),
                    }
                elif known is not None:
                    status = {"authenticated": False, "error": "token audiences do not match"}
                self._send(201, {**body, "status": status})

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def kubeconfig(self, path: Path) -> Path:
        server = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": server}}],
                    "users": [{"name": "u", "user": {"token": "control-plane-token"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        return path


@contextmanager
def token_review_api() -> Iterator[TokenReviewApi]:
    api = TokenReviewApi()
    thread = threading.Thread(target=api.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api.httpd.shutdown()
        api.httpd.server_close()
        thread.join(5)


def test_reviewer_maps_the_api_servers_answers(tmp_path: Path) -> None:
    async def scenario() -> None:
        with token_review_api() as server:
            api = await api_client(str(server.kubeconfig(tmp_path / "kubeconfig")))
            try:
                tokens = KubernetesTokens(KubeTokenReviewer(api), "cluster.local", ["pilotfish-ca"])
                assert await tokens.authenticate("pod-token") == SpiffeId(
                    "cluster.local", "shop", "cart"
                )
                assert server.reviews[0]["spec"] == {
                    "token": "pod-token",
                    "audiences": ["pilotfish-ca"],
                }
                with pytest.raises(Unauthenticated, match="audiences do not match"):
                    await tokens.authenticate("other-audience")
                with pytest.raises(Unauthenticated, match="invalid token"):
                    await tokens.authenticate("forged")
                server.fail = True
                with pytest.raises(ReviewUnavailable, match="500"):
                    await tokens.authenticate("pod-token")
            finally:
                await api.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_ca_issues_for_a_reviewed_service_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        with token_review_api() as server:
            kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
            mesh = tmp_path / "mesh.yaml"
            mesh.write_text(MESH_YAML)
            plane = await start_control_plane(
                mesh,
                "127.0.0.1",
                0,
                ca=CaSettings(root_dir=tmp_path / "ca", token_audiences=("pilotfish-ca",)),
                kubernetes=KubernetesOptions(kubeconfig=str(kubeconfig)),
            )
            try:
                async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
                    stub = ca_pb2_grpc.CertificateAuthorityStub(channel)
                    cart = SpiffeId("cluster.local", "shop", "cart")

                    async def sign(who: SpiffeId, token: str) -> Any:
                        request = ca_pb2.SignCertificateRequest(
                            csr_pem=build_csr(generate_key(), who).decode()
                        )
                        return await stub.SignCertificate(
                            request, metadata=(("authorization", f"Bearer {token}"),), timeout=10
                        )

                    assert (await sign(cart, "pod-token")).spiffe_id == cart.uri
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await sign(SpiffeId("cluster.local", "kube-system", "admin"), "pod-token")
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await sign(cart, "forged")
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    server.fail = True
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await sign(cart, "pod-token")
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            finally:
                await plane.stop(grace=None)

    asyncio.run(asyncio.wait_for(scenario(), 60))
