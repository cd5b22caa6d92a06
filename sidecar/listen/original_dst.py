"""Where an intercepted connection was going before iptables redirected it to us.

A ``REDIRECT`` rewrites the destination of a connection to the sidecar's port; conntrack keeps
the original, and Linux hands it back through ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` as a
``struct sockaddr_in``. IPv4 only: IPv6 needs ``IP6T_SO_ORIGINAL_DST`` on ``SOL_IPV6``.
"""

from __future__ import annotations

import socket
import struct
from typing import Protocol

# From linux/netfilter_ipv4.h; the socket module does not export it.
SO_ORIGINAL_DST = 80
SOCKADDR_IN_SIZE = 16


class OriginalDestinationError(Exception):
    """The connection has no usable original destination; the message says why."""


class _SocketLike(Protocol):
    """What we need of a socket; uvloop hands out a pseudo-socket, not a ``socket.socket``."""

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes: ...

    def getsockname(self) -> object: ...


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """``(host, port)`` from a ``struct sockaddr_in``.

    ``sin_family`` is in host byte order; ``sin_port`` and ``sin_addr`` are in network order.
    """
    if len(raw) < 8:
        raise OriginalDestinationError(f"sockaddr_in too short ({len(raw)} bytes)")
    (family,) = struct.unpack_from("=H", raw, 0)
    if family != socket.AF_INET:
        raise OriginalDestinationError(f"not an IPv4 address (family {family})")
    (port,) = struct.unpack_from("!H", raw, 2)
    return socket.inet_ntoa(raw[4:8]), port


def original_destination(sock: _SocketLike) -> tuple[str, int]:
    """The original ``(host, port)`` of an accepted, redirected connection.

    Raises ``OriginalDestinationError`` when the kernel has none (no conntrack entry, not
    IPv4) and when it is the socket's own address: the client dialled the listener itself
    rather than being redirected to it, and relaying would connect back to us forever.
    """
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    except OSError as exc:
        raise OriginalDestinationError(f"SO_ORIGINAL_DST: {exc.strerror or exc}") from exc
    destination = parse_sockaddr_in(raw)
    local = sock.getsockname()
    if isinstance(local, tuple) and tuple(local[:2]) == destination:
        raise OriginalDestinationError(
            f"{destination[0]}:{destination[1]} is this listener (not a redirected connection)"
        )
    return destination
