"""The first HTTP/1.1 request's authority, from a connection's first bytes."""

from __future__ import annotations

import pytest

from sidecar.listen.authority import MAX_HEAD, Unreadable, first_authority


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: Quotes.Default:7001\r\n\r\n", "quotes.default:7001"),
        (b"GET http://example.org/a HTTP/1.1\r\nHost: other\r\n\r\n", "example.org"),
        (b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n", ""),
        (b"GET / HTTP/1.1\r\nHost: quotes\r\n", None),
    ],
)
def test_h1(head: bytes, expected: str | None) -> None:
    assert first_authority(head) == expected


def test_h1_head_too_large_is_unreadable() -> None:
    with pytest.raises(Unreadable):
        first_authority(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD)
