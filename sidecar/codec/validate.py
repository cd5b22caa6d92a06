"""Request and response headers as HTTP/2 carries them, checked before anything is routed.

RFC 9113 section 8.2 and 8.3 for the pseudo-headers and field names, RFC 9110 for methods,
field values and Content-Length. Pure functions over header lists, shared by the HTTP/2 codec
(per decoded header block) and the HTTP/1.1 side (``field_value_problem``), so both protocols
refuse the same requests.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REQUEST, RESPONSE, TRAILERS = 0, 1, 2

_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
# RFC 9110 section 5.5: a field value is visible characters, spaces and tabs (and obs-text);
# other control characters are what request smuggling through a lenient parser is made of.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|^[ \t]|[ \t]$")
# A method is a token (RFC 9110 section 9.1). Lower case letters are refused too: every
# registered method is upper case, and the HTTP/1.1 side of a listener only recognises upper
# case methods, so both protocols accept the same requests.
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Z]+")
_SCHEME = re.compile(rb"[a-zA-Z][a-zA-Z0-9+.\-]*")
# RFC 3986: a path and query are visible ASCII; anything else arrives percent-encoded. An
# HTTP/1.1 upstream would fail to frame a request line with spaces or raw bytes in it.
_BAD_PATH = re.compile(rb"[^\x21-\x7e]")
_BAD_AUTHORITY = re.compile(rb"[^\x21-\x7e]|@")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_RESPONSE_PSEUDO = frozenset({b":status"})


def problem(kind: int, headers: tuple[tuple[bytes, bytes], ...]) -> str | None:
    """Why ``headers`` are malformed as a block of ``kind``, or None when they are fine."""
    allowed = _REQUEST_PSEUDO if kind == REQUEST else _RESPONSE_PSEUDO if kind == RESPONSE else None
    pseudo: dict[bytes, bytes] = {}
    regular = False
    name_ok = _NAME.fullmatch
    bad_value = _BAD_VALUE.search
    length: bytes | None = None
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return f"pseudo-header {name!r} after a regular header"
            if allowed is None or name not in allowed:
                return f"pseudo-header {name!r} not allowed here"
            if name in pseudo:
                return f"duplicate pseudo-header {name!r}"
            pseudo[name] = value
        else:
            regular = True
            if name_ok(name) is None:
                return f"invalid header name {name!r}"
            if name in _CONNECTION_SPECIFIC:
                return f"connection-specific header {name!r}"
            if name == b"te" and value != b"trailers":
                return "te header other than trailers"
            if name == b"content-length":
                # RFC 9110 section 8.6: digits only; copies must agree (a proxy that picks
                # one of two different lengths is how requests are smuggled).
                if _DIGITS.fullmatch(value) is None:
                    return "content-length is not a number"
                if length is not None and value != length:
                    return "conflicting content-length headers"
                length = value
        if bad_value(value) is not None:
            return f"invalid value for header {name!r}"
    if kind == REQUEST:
        method = pseudo.get(b":method")
        if not method:
            return "request without :method"
        if _METHOD.fullmatch(method) is None:
            return "invalid :method"
        authority = pseudo.get(b":authority")
        if authority is not None and _BAD_AUTHORITY.search(authority) is not None:
            return "invalid :authority"
        if method == b"CONNECT":
            if b":authority" not in pseudo or b":scheme" in pseudo or b":path" in pseudo:
                return "malformed CONNECT request"
            return None
        scheme = pseudo.get(b":scheme")
        path = pseudo.get(b":path")
        if not scheme or not path:
            return "request without :scheme or :path"
        if _SCHEME.fullmatch(scheme) is None:
            return "invalid :scheme"
        if _BAD_PATH.search(path) is not None:
            return "invalid :path"
        if path[:1] != b"/" and (path != b"*" or method != b"OPTIONS"):
            return ":path neither absolute nor * (for OPTIONS)"
    elif kind == RESPONSE:
        status = pseudo.get(b":status")
        if status is None or len(status) != 3 or not status.isdigit():
            return "response without a valid :status"
    return None


def content_length(headers: tuple[tuple[bytes, bytes], ...]) -> int:
    """The content-length of a block ``problem`` found fine, or -1 when it has none."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return -1




def field_value_problem(fields: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The first field whose value has a character RFC 9110 forbids, for HTTP/1.1 requests
    (whose parser already refuses NUL, CR and LF and trims the ends)."""
    search = _BAD_VALUE.search
    for name, value in fields:
        if search(value) is not None:
            return f"invalid value for header {bytes(name)!r}"
    return None
