from __future__ import annotations

import pytest

from sidecar.listen.listener import H2_PREFACE, detect_protocol


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (H2_PREFACE, "h2"),
        (H2_PREFACE + b"\x00\x00", "h2"),
        (H2_PREFACE[:10], None),
        (b"P", None),
        (b"PRI * HTTP/1.1", "h1"),  # diverges from the preface: an HTTP/1.1 request
        (b"GET / HTTP/1.1\r\n", "h1"),
        (b"GET", None),
        (b"POST ", "h1"),
        (b"M-SEARCH * HTTP/1.1", "h1"),
        (b"\x16\x03\x01\x02\x00", "other"),  # TLS ClientHello
        (b"SSH-2.0-OpenSSH", "other"),
        (b"get / HTTP/1.1", "other"),
        (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", "other"),
    ],
)
def test_detect_protocol(head: bytes, expected: str | None) -> None:
    assert detect_protocol(head) == expected
