"""HTTP/1.1 and HTTP/2 through a real sidecar: protocol translation, local replies, pools."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from tests.h2_upstream import H2Upstream
from tests.support import ThreadedSidecar, running_sidecar, simple_config, wait_for

CURL = shutil.which("curl")


class EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.headers.get("transfer-encoding") == "chunked":
            body = _read_chunked(self.rfile)
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = _echo
    do_POST = _echo

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _read_chunked(rfile: Any) -> bytes:
    body = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0], 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b""):
                pass
            return bytes(body)
        body += rfile.read(size)
        rfile.readline()


@pytest.fixture
def h1_upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def h2_upstream() -> Iterator[H2Upstream]:
    upstream = H2Upstream()
    yield upstream
    upstream.stop()


@pytest.fixture
def h2_sidecar(h2_upstream: H2Upstream) -> Iterator[ThreadedSidecar]:
    with running_sidecar(simple_config([h2_upstream.address], timeout="2s")) as sc:
        yield sc


def h1_request(
    address: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


class RawH2Client:
    """A minimal blocking HTTP/2 client on a raw socket, for frame-level tests."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.h2.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.h2.data_to_send())

    def read_until(self, predicate: Any, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        while not any(predicate(e) for e in self.events):
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return False
            if not data:
                self.events.append(h2.events.ConnectionTerminated())
                return any(predicate(e) for e in self.events)
            self.events.extend(self.h2.receive_data(data))
            self.flush()
        return True

    def request(self, path: str, body: bytes = b"", method: str = "GET") -> int:
        sid = self.h2.get_next_available_stream_id()
        headers = [
            (":method", method),
            (":scheme", "http"),
            (":authority", "test"),
            (":path", path),
        ]
        self.h2.send_headers(sid, headers, end_stream=not body)
        for offset in range(0, len(body), 16384):
            chunk = body[offset : offset + 16384]
            self.h2.send_data(sid, chunk, end_stream=offset + len(chunk) == len(body))
        self.flush()
        return sid

    def status(self, sid: int) -> str | None:
        for e in self.events:
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                # header_encoding="utf-8" gives str, whatever h2's annotations say
                for name, value in e.headers:
                    if name in (":status", b":status"):
                        return value.decode() if isinstance(value, bytes) else str(value)
        return None

    def close(self) -> None:
        self.sock.close()


# -- protocol translation ------------------------------------------------------------------


def test_h1_client_to_h2_upstream(h2_upstream: H2Upstream, h2_sidecar: ThreadedSidecar) -> None:
    body = b"hello" * 1000
    status, _, data = h1_request(
        h2_sidecar.address, "POST", "/echo", body, {"Host": "svc.local", "X-Custom": "1"}
    )
    assert status == 200
    echo = json.loads(data)
    assert echo["headers"][":authority"] == "svc.local"
    assert echo["headers"][":method"] == "POST"
    assert echo["headers"]["x-custom"] == "1"
    assert "connection" not in echo["headers"] and "host" not in echo["headers"]
    assert echo["body_len"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_h1_chunked_upload_of_8_mib_to_h2_upstream(
    h2_upstream: H2Upstream, h2_sidecar: ThreadedSidecar
) -> None:
    chunk = bytes(range(256)) * 256
    chunks = [chunk] * 128
    host, port = h2_sidecar.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    conn.request("POST", "/echo", body=iter(chunks), encode_chunked=True)
    response = conn.getresponse()
    echo = json.loads(response.read())
    assert response.status == 200
    assert echo["body_len"] == 8 * 1024 * 1024
    assert echo["body_sha256"] == hashlib.sha256(b"".join(chunks)).hexdigest()


def test_h1_keep_alive_reuses_connection(h2_sidecar: ThreadedSidecar) -> None:
    host, port = h2_sidecar.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    for _ in range(5):
        conn.request("GET", "/echo")
        assert conn.getresponse().read()
    conn.close()
    assert h2_sidecar.stat("http.ingress.downstream_cx_total") == 1
    assert h2_sidecar.stat("http.ingress.downstream_rq_2xx") == 5


def test_h2_client_to_h1_upstream(h1_upstream: str) -> None:
    with running_sidecar(simple_config([h1_upstream], protocol="http1")) as sc:
        client = RawH2Client(sc.address)
        body = b"z" * 60_000  # within the initial window: this raw client does no flow control
        sid = client.request("/echo?x=1", body, method="POST")
        assert client.read_until(
            lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == sid
        )
        data = b"".join(
            e.data
            for e in client.events
            if isinstance(e, h2.events.DataReceived) and e.stream_id == sid
        )
        echo = json.loads(data)
        assert client.status(sid) == "200"
        assert echo["method"] == "POST" and echo["path"] == "/echo?x=1"
        assert echo["headers"]["host"] == "test"
        assert echo["headers"]["transfer-encoding"] == "chunked"
        assert echo["body_len"] == len(body)
        client.close()


def test_h1_to_h1_keeps_upstream_connection(h1_upstream: str) -> None:
    with running_sidecar(simple_config([h1_upstream], protocol="http1")) as sc:
        for _ in range(3):
            status, _, data = h1_request(sc.address, "GET", "/echo")
            assert status == 200 and json.loads(data)["method"] == "GET"
        assert sc.stat("cluster.app.upstream_cx_total") == 1


@pytest.mark.skipif(CURL is None, reason="curl is installed by .ci/run")
@pytest.mark.parametrize("flag", ["--http2-prior-knowledge", "--http1.1"])
def test_curl(flag: str, h2_sidecar: ThreadedSidecar) -> None:
    out = subprocess.run(
        [
            str(CURL),
            "-sS",
            flag,
            "-H",
            "x-hello: world",
            "-d",
            "payload",
            "-w",
            "\n%{http_version} %{http_code}",
            f"http://{h2_sidecar.address}/echo",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    body, _, trailer = out.rpartition("\n")
    version, code = trailer.split()
    assert code == "200"
    assert version == ("2" if "http2" in flag else "1.1")
    echo = json.loads(body)
    assert echo["headers"]["x-hello"] == "world" and echo["body_len"] == 7


# -- local replies -------------------------------------------------------------------------


def test_local_replies_carry_status_and_flag(h2_upstream: H2Upstream) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    config = simple_config(
        [h2_upstream.address],
        timeout="300ms",
        routes=[
            {"match": {"prefix": "/dead"}, "route": {"cluster": "dead"}},
            {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "300ms"}},
        ],
        extra_clusters=[{"name": "dead", "endpoints": [dead], "connect_timeout": "1s"}],
    )
    config["route_configs"][0]["virtual_hosts"][0]["domains"] = ["known"]
    with running_sidecar(config) as sc:
        cases = [
            ("other-host", "/echo", 404, "NR"),
            ("known", "/dead", 503, "UF"),
            ("known", "/hang", 504, "UT"),
            ("known", "/reset", 503, "UR"),
        ]
        for host, path, status, flag in cases:
            got, headers, body = h1_request(sc.address, "GET", path, headers={"Host": host})
            assert (got, headers.get("x-pilotfish-response-flags")) == (status, flag), path
            assert body
        assert sc.stat("cluster.app.upstream_rq_timeout") == 1
        assert sc.stat("cluster.dead.upstream_cx_connect_fail") >= 1


# -- upstream HTTP/2 connection management --------------------------------------------------


def test_goaway_unprocessed_stream_is_sent_again(
    h2_upstream: H2Upstream, h2_sidecar: ThreadedSidecar
) -> None:
    assert h1_request(h2_sidecar.address, "GET", "/echo")[0] == 200  # warm a connection
    status, _, _ = h1_request(h2_sidecar.address, "POST", "/goaway-once", b"body")
    assert status == 200
    assert h2_upstream.paths_seen.count("/goaway-once") == 2
    assert h2_sidecar.stat("cluster.app.upstream_rq_retry") == 1
    assert h2_sidecar.stat("cluster.app.upstream_cx_goaway") == 1
    assert h2_upstream.connections == 2
    assert h1_request(h2_sidecar.address, "GET", "/echo")[0] == 200


def test_refused_stream_is_sent_again(h2_upstream: H2Upstream, h2_sidecar: ThreadedSidecar) -> None:
    status, _, _ = h1_request(h2_sidecar.address, "POST", "/refuse-once", b"body")
    assert status == 200
    assert h2_sidecar.stat("cluster.app.upstream_rq_retry") == 1


def test_peer_max_concurrent_streams_is_honoured() -> None:
    upstream = H2Upstream(max_concurrent_streams=1)
    try:
        with running_sidecar(simple_config([upstream.address])) as sc:
            client = RawH2Client(sc.address)
            sids = [client.request("/slow/200") for _ in range(4)]
            assert client.read_until(
                lambda e: sum(isinstance(x, h2.events.StreamEnded) for x in client.events) >= 4, 10
            )
            assert all(client.status(s) == "200" for s in sids)
            assert upstream.max_seen_concurrency == 1
            assert upstream.connections >= 2
            client.close()
    finally:
        upstream.stop()


def test_upstream_reset_mid_response_reaches_client(
    h2_upstream: H2Upstream, h2_sidecar: ThreadedSidecar
) -> None:
    client = RawH2Client(h2_sidecar.address)
    sid = client.request("/reset-mid")
    assert client.read_until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == sid)
    assert client.status(sid) == "200"
    ok = client.request("/echo")  # the same downstream connection keeps working
    assert client.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == ok)
    client.close()


def test_client_reset_mid_body_resets_upstream(
    h2_upstream: H2Upstream, h2_sidecar: ThreadedSidecar
) -> None:
    client = RawH2Client(h2_sidecar.address)
    sid = client.h2.get_next_available_stream_id()
    client.h2.send_headers(
        sid, [(":method", "POST"), (":scheme", "http"), (":authority", "t"), (":path", "/echo")]
    )
    client.h2.send_data(sid, b"part of a body")
    client.flush()
    assert wait_for(lambda: h2_upstream.paths_seen == [] and h2_upstream.connections == 1)
    client.h2.reset_stream(sid, 0x8)
    client.flush()
    assert wait_for(lambda: len(h2_upstream.resets_seen) == 1)
    ok = client.request("/echo")
    assert client.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == ok)
    client.close()


# -- misbehaving downstreams ----------------------------------------------------------------


def test_garbage_preface_is_closed_and_others_unaffected(h2_sidecar: ThreadedSidecar) -> None:
    host, port = h2_sidecar.address.rsplit(":", 1)
    bad = socket.create_connection((host, int(port)), timeout=5)
    bad.sendall(b"\x16\x03\x01\x00\xa5garbage that is not http")
    assert bad.recv(100) == b""  # closed by the proxy
    bad.close()
    assert h1_request(h2_sidecar.address, "GET", "/echo")[0] == 200
    assert h2_sidecar.stat("http.ingress.downstream_cx_protocol_unknown") == 1


def test_invalid_frame_gets_goaway_protocol_error(h2_sidecar: ThreadedSidecar) -> None:
    good = RawH2Client(h2_sidecar.address)
    bad = RawH2Client(h2_sidecar.address)
    # A DATA frame on stream 0 is a connection error of type PROTOCOL_ERROR (RFC 9113 6.1).
    bad.sock.sendall(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd")
    assert bad.read_until(lambda e: isinstance(e, h2.events.ConnectionTerminated))
    goaway = next(e for e in bad.events if isinstance(e, h2.events.ConnectionTerminated))
    assert goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    sid = good.request("/echo")
    assert good.read_until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == sid)
    good.close()
    bad.close()


def test_oversized_headers(h2_sidecar: ThreadedSidecar) -> None:
    huge = "v" * (70 * 1024)
    status, _, _ = h1_request(h2_sidecar.address, "GET", "/echo", headers={"x-big": huge})
    assert status == 431
    client = RawH2Client(h2_sidecar.address)
    sid = client.h2.get_next_available_stream_id()
    client.h2.send_headers(
        sid,
        [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "t"),
            (":path", "/echo"),
            ("x-big", huge),
        ],
        end_stream=True,
    )
    client.flush()
    assert client.read_until(
        lambda e: isinstance(e, (h2.events.ConnectionTerminated, h2.events.StreamReset))
    )
    client.close()
    assert h1_request(h2_sidecar.address, "GET", "/echo")[0] == 200


def test_malformed_h1_request_gets_400(h2_sidecar: ThreadedSidecar) -> None:
    host, port = h2_sidecar.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    reply = sock.recv(1000)
    assert reply.startswith(b"HTTP/1.1 400")
    sock.close()


# -- TCP passthrough ------------------------------------------------------------------------


def _tcp_server(banner: bytes = b"") -> tuple[socket.socket, threading.Thread]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            if banner:
                conn.sendall(banner)
            while data := conn.recv(65536):
                conn.sendall(data.upper())
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv, thread


@pytest.mark.parametrize("banner", [b"", b"220 server speaks first\r\n"])
def test_tcp_passthrough(banner: bytes, h2_upstream: H2Upstream) -> None:
    srv, _ = _tcp_server(banner)
    port = srv.getsockname()[1]
    config = simple_config(
        [h2_upstream.address],
        extra_listener={"tcp_passthrough": {"cluster": "raw"}, "protocol_detect_timeout": "100ms"},
        extra_clusters=[{"name": "raw", "protocol": "tcp", "endpoints": [f"127.0.0.1:{port}"]}],
    )
    try:
        with running_sidecar(config) as sc:
            host, lport = sc.address.rsplit(":", 1)
            sock = socket.create_connection((host, int(lport)), timeout=5)
            if banner:
                assert sock.recv(100) == banner  # nothing sent: relayed after the detect timeout
            sock.sendall(b"\x00\x01binary stuff")
            assert sock.recv(100) == b"\x00\x01BINARY STUFF"
            sock.close()
            # HTTP on the same listener still goes through the HTTP path
            assert h1_request(sc.address, "GET", "/echo")[0] == 200
    finally:
        srv.close()


# -- admin --------------------------------------------------------------------------------


def test_admin_endpoints(h2_sidecar: ThreadedSidecar) -> None:
    assert h1_request(h2_sidecar.address, "GET", "/echo")[0] == 200
    assert h2_sidecar.admin("/ready") == (200, "LIVE\n")
    status, dump = h2_sidecar.admin("/config_dump")
    assert status == 200
    assert json.loads(dump)["bootstrap"]["clusters"]["app"]["protocol"] == "http2"
    # A static sidecar's parts in Envoy's shape too: static_* in typed dumps.
    configs = {c["@type"].rsplit(".", 1)[1]: c for c in json.loads(dump)["configs"]}
    [cluster] = configs["ClustersConfigDump"]["static_clusters"]
    assert cluster["cluster"]["name"] == "app" and cluster["cluster"]["type"] == "STATIC"
    assert cluster["last_updated"].endswith("Z")
    listeners = configs["ListenersConfigDump"]["static_listeners"]
    assert [e["listener"]["@type"] for e in listeners] == [
        "type.googleapis.com/envoy.config.listener.v3.Listener"] * len(listeners) != []
    assert configs["RoutesConfigDump"]["static_route_configs"] != []
    assert "dynamic_listeners" not in configs["ListenersConfigDump"]
    status, clusters = h2_sidecar.admin("/clusters")
    assert "app::127.0.0.1:" in clusters and "::cx_active::1" in clusters
    status, prom = h2_sidecar.admin("/stats/prometheus")
    assert 'pilotfish_cluster_upstream_rq_total{cluster="app"} 1' in prom
    assert "# TYPE pilotfish_cluster_upstream_rq_total counter" in prom
    assert 'pilotfish_cluster_circuit_breakers_default_remaining_rq{cluster="app"} 1024' in prom
    _, stats = h2_sidecar.admin("/stats")
    assert "cluster.app.circuit_breakers.default.rq_open: 0" in stats
    assert h2_sidecar.admin("/healthcheck/fail")[0] == 405  # state changes need POST
    assert h2_sidecar.admin("/healthcheck/fail", "POST")[0] == 200
    assert h2_sidecar.admin("/ready")[0] == 503
    assert h2_sidecar.admin("/healthcheck/ok", "POST")[0] == 200
    assert h2_sidecar.admin("/ready")[0] == 200
