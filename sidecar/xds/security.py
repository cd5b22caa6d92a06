"""mTLS settings out of xDS: the TLS transport sockets ``control_plane.xds.security_xds`` writes.

The sidecar does not fetch the SDS secrets those name: it uses its own workload certificate
(``pilotfish sidecar --ca-token-file``). What it takes from xDS is whether to use TLS, whether a
client certificate is required, and which SPIFFE IDs an upstream may have.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2

from pilotfish.config.errors import ConfigError
from pilotfish.config.security import MtlsMode, UpstreamMtls
from pilotfish.identity import InvalidSpiffeId, SpiffeId

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
_UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_DOWNSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def _unpack_tls(
    socket: base_pb2.TransportSocket, message: object, type_name: str, path: str
) -> None:
    if socket.name != TLS_TRANSPORT_SOCKET:
        raise ConfigError(f"{path}.name", f"only {TLS_TRANSPORT_SOCKET} is supported")
    if socket.typed_config.TypeName() != type_name:
        raise ConfigError(f"{path}.typed_config", f"expected {type_name}")
    if not socket.typed_config.Unpack(message):
        raise ConfigError(f"{path}.typed_config", "cannot decode")


def _san_identities(context: tls_pb2.CommonTlsContext, path: str) -> frozenset[SpiffeId]:
    """Exact URI SAN matchers are the identities accepted; none (or prefixes): any."""
    validation = context.combined_validation_context.default_validation_context
    identities = set()
    for i, san in enumerate(validation.match_typed_subject_alt_names):
        if san.san_type != common_pb2.SubjectAltNameMatcher.URI:
            continue
        if san.matcher.WhichOneof("match_pattern") == "exact":
            try:
                identities.add(SpiffeId.parse(san.matcher.exact))
            except InvalidSpiffeId as exc:
                raise ConfigError(
                    f"{path}.match_typed_subject_alt_names[{i}].matcher.exact", str(exc)
                ) from None
    return frozenset(identities)


def translate_upstream_mtls(cluster: cluster_pb2.Cluster, path: str) -> UpstreamMtls | None:
    if not cluster.HasField("transport_socket"):
        return None
    socket_path = f"{path}.transport_socket"
    context = tls_pb2.UpstreamTlsContext()
    _unpack_tls(cluster.transport_socket, context, _UPSTREAM_TLS, socket_path)
    common = context.common_tls_context
    if list(common.alpn_protocols) not in ([], ["h2"]):
        raise ConfigError(f"{socket_path}.common_tls_context.alpn_protocols", "only h2")
    return UpstreamMtls(_san_identities(common, f"{socket_path}.common_tls_context"))


def translate_inbound_mtls(
    listener: listener_pb2.Listener, path: str
) -> tuple[listener_components_pb2.FilterChain, MtlsMode | None]:
    """The chain to serve, and the mTLS mode: one plain chain (None), one TLS chain (STRICT),
    or a TLS and a plaintext chain told apart by ``transport_protocol`` (PERMISSIVE)."""
    for i, lf in enumerate(listener.listener_filters):
        if lf.name != TLS_INSPECTOR:
            raise ConfigError(f"{path}.listener_filters[{i}]", f"only {TLS_INSPECTOR}")
    chains = list(listener.filter_chains)
    if len(chains) == 1:
        chain = chains[0]
        if chain.HasField("filter_chain_match"):
            raise ConfigError(f"{path}.filter_chains[0].filter_chain_match", "not supported")
        if not chain.HasField("transport_socket"):
            return chain, None
        strict = _require_client_certificate(chain, f"{path}.filter_chains[0]")
        if not strict:
            raise ConfigError(
                f"{path}.filter_chains[0].transport_socket",
                "TLS without a client certificate needs a plaintext chain beside it (PERMISSIVE)",
            )
        return chain, MtlsMode.STRICT
    if len(chains) == 2:
        by_protocol = {
            c.filter_chain_match.transport_protocol: (i, c) for i, c in enumerate(chains)
        }
        if set(by_protocol) != {"tls", "raw_buffer"}:
            raise ConfigError(
                f"{path}.filter_chains",
                "two chains must match transport_protocol tls and raw_buffer",
            )
        i, tls_chain = by_protocol["tls"]
        _, plain = by_protocol["raw_buffer"]
        _require_client_certificate(tls_chain, f"{path}.filter_chains[{i}]")
        if list(tls_chain.filters) != list(plain.filters):
            raise ConfigError(f"{path}.filter_chains", "the two chains must have the same filters")
        return plain, MtlsMode.PERMISSIVE
    raise ConfigError(f"{path}.filter_chains", "one chain, or a tls and a raw_buffer chain")


def _require_client_certificate(chain: listener_components_pb2.FilterChain, path: str) -> bool:
    context = tls_pb2.DownstreamTlsContext()
    _unpack_tls(chain.transport_socket, context, _DOWNSTREAM_TLS, f"{path}.transport_socket")
    return bool(context.require_client_certificate.value)
