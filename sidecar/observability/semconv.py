"""OpenTelemetry semantic-convention attributes for the proxy's spans, from its headers."""

from __future__ import annotations

from collections.abc import Mapping

Headers = list[tuple[bytes, bytes]]
AttrValue = str | bool | int | float

_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY"}
)
# gRPC codes a server span reports as an error: the server's failures, not the caller's mistakes.
_GRPC_SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})


def is_error(server: bool, grpc: bool, status: int, grpc_status: int | None) -> bool:
    """Whether a span ends in error: 5xx (server) / 4xx and 5xx (client), or the gRPC rule."""
    if grpc and grpc_status is not None:
        return grpc_status in _GRPC_SERVER_ERRORS if server else grpc_status != 0
    return status >= 500 if server else status >= 400


def request_attributes(headers: Headers) -> dict[str, AttrValue]:
    """Semantic-convention attributes of a request, from its (pseudo-)headers."""
    method = path = authority = scheme = b""
    user_agent = content_type = b""
    for name, value in headers:
        if name == b":method":
            method = value
        elif name == b":path":
            path = value
        elif name == b":authority" or (name == b"host" and not authority):
            authority = value
        elif name == b":scheme":
            scheme = value
        elif name == b"content-type":
            content_type = value
        elif name == b"user-agent":
            user_agent = value
    attrs: dict[str, AttrValue] = {}
    method_text = method.decode("latin-1")
    if method_text in _KNOWN_METHODS:
        attrs["http.request.method"] = method_text
    else:
        attrs["http.request.method"] = "_OTHER"
        attrs["http.request.method_original"] = method_text
    url_path = path.decode("latin-1").split("?", 1)[0]
    attrs["url.path"] = url_path
    if scheme:
        attrs["url.scheme"] = scheme.decode("latin-1")
    if authority:
        host, port = split_host_port(authority.decode("latin-1"))
        attrs["server.address"] = host
        if port:
            attrs["server.port"] = port
    if user_agent:
        attrs["user_agent.original"] = user_agent.decode("latin-1")
    if content_type.startswith(b"application/grpc"):
        attrs["rpc.system"] = "grpc"
        service, _, rpc_method = url_path.lstrip("/").partition("/")
        if service and rpc_method:
            attrs["rpc.service"] = service
            attrs["rpc.method"] = rpc_method
    return attrs


def span_name(attrs: Mapping[str, AttrValue]) -> str:
    if "rpc.service" in attrs:
        return f"{attrs['rpc.service']}/{attrs['rpc.method']}"
    method = attrs["http.request.method"]
    return "HTTP" if method == "_OTHER" else str(method)


def split_host_port(authority: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` / ``host`` → (host, port or 0)."""
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif authority.count(":") == 1:
        host, _, port = authority.partition(":")
    else:  # a bare host, or a bare IPv6 address
        host, port = authority, ""
    return host, int(port) if port.isdigit() else 0


def grpc_status_of(headers: Headers) -> int | None:
    """The ``grpc-status`` of response trailers (or of a trailers-only response's headers)."""
    for name, value in headers:
        if name == b"grpc-status":
            return int(value) if value.isdigit() else None
    return None
