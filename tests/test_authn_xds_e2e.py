"""JWT and authorization from the mesh file, end to end: a control plane process serves them
over ADS as Envoy's jwt_authn and RBAC filters; a sidecar process enforces them in front of a
real grpcio app; real grpcio and HTTP/1.1 clients call it.

- Tokens: valid, bad signature, expired, wrong audience; a key rotated in the JWKS file; a claim
  forwarded (the client's copy replaced). Rules: path with claim, method, header. A live edit of
  the mesh file changes the policy, and the sidecar process is the same one.
- Per route: a route exempt from JWT (``jwt: off``) with its own allow-all rule answers without
  a token, or with a refused one; a route with its own claim rule denies what the service allows.
- Identities over STRICT mTLS: callers are three sidecars with their own certificates; one
  allowed by principal, one not listed, one listed but in a namespace a deny rule names.
"""

from __future__ import annotations

import http.client
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import yaml

from tests.support import GrpcServer, free_port, identity, wait_for
from tests.test_xds_e2e import MeshFile, Processes, Sidecar
from tests.unit.security.test_jwt_authn import EC_KEY, OTHER_EC_KEY, jwk, jwks
from tests.unit.security.test_jwt_authn import sign as sign_at

ISSUER = "https://issuer.example"
DENIED = "http.inbound|billing.downstream_rq_rbac_denied"
UNAUTHENTICATED = "http.inbound|billing.downstream_rq_jwt_denied"


def sign(key: Any, kid: str, **claims: Any) -> str:
    return sign_at(key, kid, "ES256", **{"exp": time.time() + 300, **claims})


class App:
    """``test.Echo/Echo``, ``test.Echo/Other`` and ``test.Echo/Health``, recording each call's
    metadata."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

        def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.metadata.append(dict(context.invocation_metadata()))
            return request

        handler = grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=identity, response_serializer=identity
        )
        self.server = GrpcServer(
            "test.Echo", {"Echo": handler, "Other": handler, "Health": handler}
        )


def call(
    address: str,
    token: str | None,
    method: str = "Echo",
    extra: tuple[tuple[str, str], ...] = (),
    authority: str | None = None,
) -> grpc.StatusCode:
    metadata = ((("authorization", f"Bearer {token}"),) if token else ()) + extra
    options = [("grpc.default_authority", authority)] if authority else []
    with grpc.insecure_channel(address, options=options) as channel:
        stub = channel.unary_unary(
            f"/test.Echo/{method}", request_serializer=identity, response_deserializer=identity
        )
        try:
            stub(b"x", metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


def http1(address: str, method: str) -> tuple[int, str | None]:
    """The status, and the response flags of a local reply."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, "/status", body=b"" if method == "POST" else None)
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("x-pilotfish-response-flags")
    finally:
        conn.close()


def is_ready(sidecar: Sidecar) -> bool:
    return sidecar.admin("/ready")[0] == 200


def billing_mesh(inbound: str, jwks_file: Path, scope: str) -> str:
    return yaml.safe_dump(
        {
            "security": {
                "jwt_providers": {
                    "idp": {
                        "issuer": ISSUER,
                        "audiences": ["orders"],
                        "jwks": {"file": str(jwks_file), "refresh": "1h", "min_refetch": "0s"},
                        "algorithms": ["ES256"],
                        "forward_claims": {"sub": "x-user"},
                    }
                }
            },
            "services": {
                "billing": {
                    "endpoints": [inbound],
                    "jwt": {"providers": ["idp"], "required": False},
                    "authorization": {
                        "deny": [{"to": {"headers": [{"name": "x-block", "exact": "yes"}]}}],
                        "allow": [
                            {
                                "to": {"paths": ["/test.Echo/Echo"]},
                                "when": {"claims": {"scope": [scope]}},
                            },
                            {"to": {"methods": ["GET"]}},
                        ],
                    },
                    "routes": [
                        {
                            "name": "health",
                            "match": {"path": "/test.Echo/Health"},
                            "jwt": "off",
                            "authorization": {"allow": [{}]},
                        },
                        {
                            "name": "gold",
                            "match": {
                                "path": "/test.Echo/Echo",
                                "headers": [{"name": "x-tier", "exact": "gold"}],
                            },
                            "authorization": {"allow": [{"when": {"claims": {"scope": ["gold"]}}}]},
                        },
                        {"name": "rest", "match": {"prefix": "/"}},
                    ],
                }
            },
        },
        sort_keys=False,
    )


def test_jwt_and_request_rules_from_the_mesh_file(tmp_path: Path) -> None:
    app = App()
    processes = Processes(tmp_path)
    try:
        jwks_file = tmp_path / "jwks.json"
        jwks_file.write_text(jwks(jwk(EC_KEY, "e1", "ES256")))
        inbound = f"127.0.0.1:{free_port()}"
        mesh = MeshFile(tmp_path / "mesh.yaml")
        mesh.write_text(billing_mesh(inbound, jwks_file, "echo"))
        port = free_port()
        plane = processes.start(
            "control-plane", ["control-plane", "--config", str(mesh.path), "--port", str(port)]
        )
        assert wait_for(lambda: "control plane serving" in plane.log(), 15), plane.log()
        billing = Sidecar(
            processes, f"127.0.0.1:{port}", "billing-1", "billing",
            "--app-address", app.server.address, "--inbound-address", inbound,
        )  # fmt: skip
        billing.wait_ready()
        pid = billing.process.proc.pid
        ok, unauthenticated, denied = (
            grpc.StatusCode.OK,
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        )

        # Tokens.
        good = sign(EC_KEY, "e1", sub="alice", scope="echo")
        assert call(inbound, good, extra=(("x-user", "mallory"),)) == ok
        assert app.metadata[-1]["x-user"] == "alice"  # the client's copy was replaced
        assert call(inbound, sign(OTHER_EC_KEY, "e1", scope="echo")) == unauthenticated
        assert call(inbound, sign(EC_KEY, "e1", scope="echo", exp=time.time() - 3600)) == (
            unauthenticated
        )
        assert call(inbound, sign(EC_KEY, "e1", scope="echo", aud="billing")) == unauthenticated
        assert billing.stat(UNAUTHENTICATED) == 3

        # The provider rotates its key in the JWKS file: the new key id makes the sidecar read
        # the file again; the retired key is refused from then on.
        jwks_file.write_text(jwks(jwk(OTHER_EC_KEY, "e2", "ES256")))
        assert call(inbound, sign(OTHER_EC_KEY, "e2", sub="bob", scope="echo")) == ok
        assert app.metadata[-1]["x-user"] == "bob"
        assert call(inbound, good) == unauthenticated
        rotated = sign(OTHER_EC_KEY, "e2", scope="echo")

        # Rules: path and claim, header (deny wins), method.
        assert call(inbound, sign(OTHER_EC_KEY, "e2", scope="other")) == denied  # claim
        assert call(inbound, rotated, method="Other") == denied  # path
        assert call(inbound, rotated, extra=(("x-block", "yes"),)) == denied  # header
        assert call(inbound, None) == denied  # no token, no claim: only GET is allowed
        assert http1(inbound, "POST") == (403, "RBAC")
        assert http1(inbound, "GET")[0] != 403  # allowed: it reaches the app (which is not HTTP)
        assert billing.stat(DENIED) == 5

        # Per route. Exempt from JWT: no token, or one the service refuses (the retired key).
        assert call(inbound, None, method="Health") == ok
        assert call(inbound, good, method="Health") == ok
        assert billing.stat(UNAUTHENTICATED) == 4  # the retired key, refused once above
        # Its own rule wants another scope than the service's, which lets `rotated` in.
        gold = (("x-tier", "gold"),)
        assert call(inbound, rotated, extra=gold) == denied
        assert call(inbound, sign(OTHER_EC_KEY, "e2", sub="carol", scope="gold"), extra=gold) == ok
        assert app.metadata[-1]["x-user"] == "carol"
        assert billing.stat(DENIED) == 6

        # A live edit: the claim rule now wants another scope; same sidecar process.
        mesh.write_text(billing_mesh(inbound, jwks_file, "echo.v2"))
        assert wait_for(lambda: call(inbound, rotated) == denied, 10), billing.log()
        served = len(app.metadata)
        assert call(inbound, sign(OTHER_EC_KEY, "e2", scope="echo.v2")) == ok
        assert billing.process.proc.pid == pid and billing.process.proc.poll() is None
        assert len(app.metadata) == served + 1
    finally:
        processes.stop_all()
        app.server.stop()


def test_identity_and_namespace_rules_over_strict_mtls(tmp_path: Path) -> None:
    app = App()
    processes = Processes(tmp_path)
    try:
        inbound = f"127.0.0.1:{free_port()}"
        web = "spiffe://cluster.local/ns/default/sa/web"
        intruder = "spiffe://cluster.local/ns/sandbox/sa/intruder"
        (tmp_path / "mesh.yaml").write_text(
            yaml.safe_dump(
                {
                    "security": {"mtls": {"mode": "STRICT"}},
                    "services": {
                        "web": {"endpoints": []},
                        "other": {"endpoints": []},
                        "intruder": {"endpoints": [], "namespace": "sandbox"},
                        "billing": {
                            "endpoints": [inbound],
                            "authorization": {
                                "deny": [{"from": {"namespaces": ["sandbox"]}}],
                                "allow": [{"from": {"principals": [web, intruder]}}],
                            },
                        },
                    },
                }
            )
        )
        callers = {"web": "default", "other": "default", "intruder": "sandbox"}
        (tmp_path / "tokens.yaml").write_text(
            "tokens:\n"
            + "".join(
                f"  - {{token: {who}-secret, service: {who}, namespace: {ns}}}\n"
                for who, ns in {**callers, "billing": "default"}.items()
            )
        )
        for who in (*callers, "billing"):
            (tmp_path / f"{who}.token").write_text(f"{who}-secret\n")
        port = free_port()
        plane = processes.start(
            "control-plane",
            [
                "control-plane", "--config", str(tmp_path / "mesh.yaml"), "--port", str(port),
                "--ca-dir", str(tmp_path / "ca"),
                "--bootstrap-tokens", str(tmp_path / "tokens.yaml"),
            ],
        )  # fmt: skip
        assert wait_for(lambda: "control plane serving" in plane.log(), 15), plane.log()
        xds = f"127.0.0.1:{port}"
        billing = Sidecar(
            processes, xds, "billing-1", "billing",
            "--app-address", app.server.address, "--inbound-address", inbound,
            "--ca-token-file", str(tmp_path / "billing.token"),
        )  # fmt: skip
        sidecars = {}
        for who, ns in callers.items():
            token = str(tmp_path / f"{who}.token")
            sidecars[who] = Sidecar(
                processes, xds, f"{who}-1", who, "--namespace", ns, "--ca-token-file", token
            )
        for sidecar in (billing, *sidecars.values()):
            # Five processes making keys and fetching certificates at once: more than the
            # usual 15 s on a loaded machine.
            assert wait_for(partial(is_ready, sidecar), 60), sidecar.log()

        codes = {
            who: call(sidecar.outbound, None, authority="billing")
            for who, sidecar in sidecars.items()
        }
        assert codes == {
            "web": grpc.StatusCode.OK,
            "other": grpc.StatusCode.PERMISSION_DENIED,  # not an allowed principal
            "intruder": grpc.StatusCode.PERMISSION_DENIED,  # allowed, but its namespace denied
        }
        assert [m.get("x-pilotfish-peer-identity") for m in app.metadata] == [web]
        assert billing.stat(DENIED) == 2
    finally:
        processes.stop_all()
        app.server.stop()
