"""Original destination: sockaddr_in parsing, the loop guard, and the listener config."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest

from pilotfish.cli import build_parser
from pilotfish.config.bootstrap import parse_bootstrap
from pilotfish.config.errors import ConfigError
from sidecar.listen.original_dst import (
    SO_ORIGINAL_DST,
    OriginalDestinationError,
    original_destination,
    parse_sockaddr_in,
)
from sidecar.main import xds_bootstrap


def sockaddr_in(host: str, port: int, family: int = socket.AF_INET) -> bytes:
    return struct.pack("=H", family) + struct.pack("!H", port) + socket.inet_aton(host) + bytes(8)


class FakeSocket:
    def __init__(self, raw: bytes | OSError, local: tuple[str, int]) -> None:
        self.raw = raw
        self.local = local
        self.asked: tuple[int, int, int] | None = None

    def getsockopt(self, level: int, optname: int, buflen: int, /) -> bytes:
        self.asked = (level, optname, buflen)
        if isinstance(self.raw, OSError):
            raise self.raw
        return self.raw

    def getsockname(self) -> object:
        return self.local


@pytest.mark.parametrize(
    ("host", "port"), [("10.200.0.2", 7000), ("0.0.0.0", 1), ("255.255.255.255", 65535)]
)
def test_parse_sockaddr_in(host: str, port: int) -> None:
    assert parse_sockaddr_in(sockaddr_in(host, port)) == (host, port)


def test_parse_rejects_other_families_and_short_input() -> None:
    with pytest.raises(OriginalDestinationError, match="not an IPv4 address"):
        parse_sockaddr_in(sockaddr_in("1.2.3.4", 80, family=socket.AF_INET6))
    with pytest.raises(OriginalDestinationError, match="too short"):
        parse_sockaddr_in(b"\x02\x00")


def test_original_destination_asks_sol_ip_so_original_dst() -> None:
    sock = FakeSocket(sockaddr_in("10.0.0.7", 5432), ("127.0.0.1", 15001))
    assert original_destination(sock) == ("10.0.0.7", 5432)
    assert sock.asked == (socket.SOL_IP, SO_ORIGINAL_DST, 16)


def test_no_conntrack_entry_is_an_error() -> None:
    sock = FakeSocket(OSError(2, "No such file or directory"), ("127.0.0.1", 15001))
    with pytest.raises(OriginalDestinationError, match="No such file"):
        original_destination(sock)


def test_a_connection_dialled_straight_to_the_listener_is_refused() -> None:
    # Relaying it would connect to ourselves, again and again.
    sock = FakeSocket(sockaddr_in("127.0.0.1", 15001), ("127.0.0.1", 15001))
    with pytest.raises(OriginalDestinationError, match="is this listener"):
        original_destination(sock)


def bootstrap(tcp_passthrough: dict[str, Any], **listener: Any) -> dict[str, Any]:
    return {
        "listeners": [
            {"address": "127.0.0.1:15001", "tcp_passthrough": tcp_passthrough, **listener}
        ],
        "clusters": [{"name": "raw", "protocol": "tcp", "endpoints": ["127.0.0.1:9000"]}],
    }


def test_listener_original_destination_parses() -> None:
    doc = bootstrap({"original_destination": True, "connect_timeout": "2s"}, mode="tcp")
    listener = parse_bootstrap(doc).listeners[0]
    assert listener.tcp_passthrough_original_destination
    assert listener.tcp_passthrough_cluster is None
    assert listener.original_destination_connect_timeout == 2.0
    assert listener.mode == "tcp"


@pytest.mark.parametrize(
    ("tcp_passthrough", "message"),
    [
        (
            {"cluster": "raw", "original_destination": True},
            "listeners[0].tcp_passthrough: exactly one of cluster, original_destination",
        ),
        ({}, "listeners[0].tcp_passthrough: exactly one of cluster, original_destination"),
        (
            {"cluster": "raw", "connect_timeout": "1s"},
            "listeners[0].tcp_passthrough.connect_timeout: only with original_destination",
        ),
        (
            {"original_destination": True, "connect_timeout": "soon"},
            "listeners[0].tcp_passthrough.connect_timeout: expected a duration",
        ),
    ],
)
def test_listener_passthrough_errors(tcp_passthrough: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bootstrap(bootstrap(tcp_passthrough))
    assert str(info.value).startswith(message)


def test_xds_outbound_listener_original_destination_flag() -> None:
    base = ["sidecar", "--xds", "127.0.0.1:15010"]
    parser = build_parser()
    plain = xds_bootstrap(parser.parse_args(base)).listeners[0]
    assert plain.name == "outbound" and not plain.tcp_passthrough_original_destination
    args = parser.parse_args([*base, "--outbound-passthrough", "original-destination"])
    assert xds_bootstrap(args).listeners[0].tcp_passthrough_original_destination
