"""mTLS in xDS, as Envoy reads it: TLS transport sockets on clusters and inbound listeners.

- A cluster whose service takes mTLS gets an ``UpstreamTlsContext``: ALPN ``h2``, the workload
  certificate from SDS secret ``default``, the trust bundle from ``ROOTCA``, and the service's
  SPIFFE ID as the one URI SAN accepted.
- An inbound listener in STRICT mode gets a ``DownstreamTlsContext`` requiring a client
  certificate; in PERMISSIVE mode a ``tls_inspector`` and two filter chains, one for TLS (client
  certificate optional) and one for plaintext.

Secrets come over SDS from the pod's own agent (``pilotfish identity-agent``), never from the
control plane: an Envoy bootstrap defines the cluster ``pilotfish-sds`` on the agent's socket.
Pilotfish's sidecar reads the same fields and uses its own certificate.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import wrappers_pb2

from control_plane.xds.proto_util import pack
from pilotfish.config.security import MtlsMode
from pilotfish.identity import SpiffeId

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
SDS_CLUSTER = "pilotfish-sds"
CERTIFICATE_SECRET = "default"
ROOT_SECRET = "ROOTCA"


def _sds(name: str) -> secret_pb2.SdsSecretConfig:
    source = config_source_pb2.ConfigSource(
        resource_api_version=config_source_pb2.V3,
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC,
            transport_api_version=config_source_pb2.V3,
            grpc_services=[
                grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=SDS_CLUSTER)
                )
            ],
        ),
    )
    return secret_pb2.SdsSecretConfig(name=name, sds_config=source)


def _san(matcher: string_pb2.StringMatcher) -> common_pb2.SubjectAltNameMatcher:
    return common_pb2.SubjectAltNameMatcher(
        san_type=common_pb2.SubjectAltNameMatcher.URI, matcher=matcher
    )


def _common(alpn: list[str], san: common_pb2.SubjectAltNameMatcher) -> tls_pb2.CommonTlsContext:
    return tls_pb2.CommonTlsContext(
        alpn_protocols=alpn,
        tls_certificate_sds_secret_configs=[_sds(CERTIFICATE_SECRET)],
        combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=common_pb2.CertificateValidationContext(
                match_typed_subject_alt_names=[san]
            ),
            validation_context_sds_secret_config=_sds(ROOT_SECRET),
        ),
    )


def upstream_tls(expected: SpiffeId) -> base_pb2.TransportSocket:
    context = tls_pb2.UpstreamTlsContext(
        common_tls_context=_common(["h2"], _san(string_pb2.StringMatcher(exact=expected.uri)))
    )
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(context))


def downstream_tls(trust_domain: str, strict: bool) -> base_pb2.TransportSocket:
    san = _san(string_pb2.StringMatcher(prefix=f"spiffe://{trust_domain}/"))
    context = tls_pb2.DownstreamTlsContext(
        common_tls_context=_common(["h2", "http/1.1"], san),
        require_client_certificate=wrappers_pb2.BoolValue(value=strict),
    )
    return base_pb2.TransportSocket(name=TLS_TRANSPORT_SOCKET, typed_config=pack(context))


def apply_inbound_mtls(listener: listener_pb2.Listener, mode: MtlsMode, trust_domain: str) -> None:
    """Turn the listener's one plaintext filter chain into STRICT or PERMISSIVE mTLS."""
    plain = listener_components_pb2.FilterChain()
    plain.CopyFrom(listener.filter_chains[0])
    tls_chain = listener_components_pb2.FilterChain()
    tls_chain.CopyFrom(plain)
    tls_chain.transport_socket.CopyFrom(downstream_tls(trust_domain, mode is MtlsMode.STRICT))
    del listener.filter_chains[:]
    if mode is MtlsMode.STRICT:
        listener.filter_chains.append(tls_chain)
        return
    listener.listener_filters.append(
        listener_components_pb2.ListenerFilter(
            name=TLS_INSPECTOR, typed_config=pack(tls_inspector_pb2.TlsInspector())
        )
    )
    tls_chain.filter_chain_match.transport_protocol = "tls"
    plain.filter_chain_match.transport_protocol = "raw_buffer"
    listener.filter_chains.extend([tls_chain, plain])
