"""Malformed requests and smuggling shapes are refused at the edge, each on its own stream
(HTTP/2: RST_STREAM PROTOCOL_ERROR) or with 400 (HTTP/1.1), before anything is routed; the
client's other streams and the upstream connections are unaffected and nothing leaks."""

from __future__ import annotations

import socket
from functools import partial

import pytest

from pilotfish.config.route_policy import CircuitBreakerConfig
from tests.hostile import wire
from tests.hostile.canary import Canary
from tests.hostile.conftest import Paths, Proxy
from tests.support import wait_for


def _request(
    path: bytes, method: bytes = b"GET", *extra: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", b"app"),
        (b":path", path),
        *extra,
    ]


# (name, header fields, body or None). Every path has "bad" in it: no upstream may see one.
REFUSED_AT_HEADERS = {
    "space in :path": _request(b"/bad path"),
    "raw byte in :path": _request(b"/bad\xff"),
    "relative :path": _request(b"bad"),
    "space in :method": _request(b"/bad", b"GE T"),
    "lower case :method": _request(b"/bad", b"get"),
    "content-length not a number": _request(b"/bad", b"POST", (b"content-length", b"abc")),
    "two content-lengths": _request(
        b"/bad", b"POST", (b"content-length", b"1"), (b"content-length", b"2")
    ),
    "control character 0x01 in a value": _request(b"/bad", b"GET", (b"x-a", b"a\x01b")),
    "DEL in a value": _request(b"/bad", b"GET", (b"x-a", b"a\x7fb")),
    "upper case name": _request(b"/bad", b"GET", (b"X-A", b"1")),
    "transfer-encoding": _request(b"/bad", b"POST", (b"transfer-encoding", b"chunked")),
    "userinfo in :authority": [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"u@app"),
        (b":path", b"/bad"),
    ],
}


@pytest.mark.parametrize("upstream", ["/", "/h1/"])
def test_malformed_h2_requests_are_reset_on_their_own_stream(proxy: Proxy, upstream: str) -> None:
    client = wire.Client(proxy.address)
    prefix = upstream.encode()
    sid = 1
    bad: dict[int, str] = {}
    for name, fields in REFUSED_AT_HEADERS.items():
        fields = [
            (n, prefix + v[1:] if n == b":path" and v.startswith(b"/") else v) for n, v in fields
        ]
        client.send(
            client.headers(sid, fields, end_stream=False) + wire.frame(wire.DATA, 1, sid, b"x")
        )
        bad[sid] = name
        sid += 2
    good = sid
    client.send(client.headers(good, _request(prefix + b"ok")))
    frames = client.frames(seconds=5, until=lambda fr: good in wire.statuses(fr))
    client.close()
    resets = wire.resets(frames)
    assert {bad[s]: resets.get(s) for s in bad} == {n: wire.PROTOCOL_ERROR for n in bad.values()}
    assert wire.statuses(frames).get(good) == b"200"
    assert wire.goaway_codes(frames) == []  # the connection itself was fine
    seen = proxy.h2.paths_seen + Paths.seen
    assert not [p for p in seen if "bad" in p]


@pytest.mark.parametrize("upstream", ["/", "/h1/"])
@pytest.mark.parametrize(("declared", "sent"), [(10, 5), (5, 10), (5, 0)])
def test_body_that_disagrees_with_content_length_is_reset(
    proxy: Proxy, upstream: str, declared: int, sent: int
) -> None:
    client = wire.Client(proxy.address)
    fields = _request(
        upstream.encode() + b"mismatch", b"POST", (b"content-length", str(declared).encode())
    )
    head = client.headers(1, fields, end_stream=not sent)
    body = wire.frame(wire.DATA, wire.END_STREAM, 1, b"x" * sent) if sent else b""
    client.send(head + body + client.headers(3, _request(upstream.encode() + b"ok")))
    frames = client.frames(
        seconds=5, until=lambda fr: 3 in wire.statuses(fr) and 1 in wire.resets(fr)
    )
    client.close()
    assert wire.resets(frames).get(1) == wire.PROTOCOL_ERROR
    assert 1 not in wire.statuses(frames)
    assert wire.statuses(frames).get(3) == b"200"
    # Nothing stays counted against either cluster: the upstream request was cancelled.
    assert wait_for(
        lambda: (
            proxy.stat("cluster.app.upstream_rq_active") == 0
            and proxy.stat("cluster.h1.upstream_rq_active") == 0
        )
    )


def _at_least(proxy: Proxy, stat: str, value: int) -> bool:
    return proxy.stat(stat) >= value


def test_many_refused_requests_leave_the_http1_cluster_usable(proxy: Proxy) -> None:
    """150 requests routed to an HTTP/1.1 upstream whose bodies then disagree with their
    content-length: each is reset, its upstream connection given back, others still get in."""
    post = _request(b"/h1/mismatch", b"POST", (b"content-length", b"10"))
    with Canary(proxy.address, path="/h1/ok") as canary:
        assert canary.wait_for_answers(3)
        for _ in range(3):
            routed = proxy.stat("cluster.h1.upstream_rq_total") + 50
            client = wire.Client(proxy.address)
            sids = range(1, 100, 2)
            client.send(b"".join(client.headers(sid, post, end_stream=False) for sid in sids))
            # Every request is on its way upstream before its short body ends it.
            assert wait_for(partial(_at_least, proxy, "cluster.h1.upstream_rq_total", routed))
            client.send(b"".join(wire.frame(wire.DATA, wire.END_STREAM, s, b"x" * 5) for s in sids))
            frames = client.frames(seconds=5, until=lambda fr: len(wire.resets(fr)) == 50)
            client.close()
            assert set(wire.resets(frames).values()) == {wire.PROTOCOL_ERROR}
        answered = canary.ok
        assert canary.wait_for_answers(answered + 3)
    assert canary.failed == []
    # Nothing is left counted against the cluster's request and pending limits (connections
    # opened for the reset requests stay in the pool, idle, for the next requests).
    assert wait_for(lambda: proxy.stat("cluster.h1.upstream_rq_active") == 0)
    limits = "cluster.h1.circuit_breakers.default"
    default = CircuitBreakerConfig().max_requests
    assert proxy.stat(f"{limits}.remaining_rq") == default
    assert proxy.stat(f"{limits}.remaining_pending") == CircuitBreakerConfig().max_pending_requests


def _h1(proxy: Proxy, raw: bytes) -> bytes:
    host, port = proxy.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(raw)
        out = b""
        while True:
            try:
                data = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not data:
                break
            out += data
    return out


SMUGGLING = {
    "CL and TE": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    "TE and CL": b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
    "CL and tab-TE": b"Content-Length: 4\r\nTransfer-Encoding:\tchunked\r\n",
    "obfuscated TE": b"Transfer-Encoding: xchunked\r\n",
    "TE list": b"Transfer-Encoding: chunked, identity\r\n",
    "space before colon": b"Transfer-Encoding : chunked\r\n",
    "two CLs": b"Content-Length: 4\r\nContent-Length: 5\r\n",
    "CL not a number": b"Content-Length: 4x\r\n",
    "control character": b"X-A: a\x01b\r\nContent-Length: 4\r\n",
}


@pytest.mark.parametrize("shape", sorted(SMUGGLING))
def test_h1_smuggling_shapes_are_refused(proxy: Proxy, shape: str) -> None:
    raw = (
        b"POST /h1/bad-smuggle HTTP/1.1\r\nHost: app\r\n"
        + SMUGGLING[shape]
        + b"\r\n0\r\n\r\nGET /h1/bad-hidden HTTP/1.1\r\nHost: app\r\n\r\n"
    )
    answer = _h1(proxy, raw)
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 600 and answer.count(b"HTTP/1.1") == 1, answer[:200]
    assert not [p for p in Paths.seen + proxy.h2.paths_seen if "bad" in p]


def test_h1_folded_header_is_unfolded_before_it_is_relayed(proxy: Proxy) -> None:
    """RFC 9112 section 5.2 lets a proxy replace obs-fold with spaces instead of refusing."""
    answer = _h1(
        proxy, b"GET /echo HTTP/1.1\r\nHost: app\r\nX-A: one\r\n two\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"x-a": "one two"' in answer
