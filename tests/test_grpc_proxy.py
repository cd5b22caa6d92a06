"""gRPC through the sidecar, end to end: real grpcio servers and clients, no mocks.

Each test names the proxy behaviour it pins down: metadata and trailers relayed both ways,
streams relayed message by message (not buffered), backpressure across the proxy, statuses and
their details untouched, cancellation and deadlines passed upstream, the proxy's own local
replies (timeout, no route, upstream down) with their response flags, and connection reuse.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import psutil
import pytest

from tests.support import (
    GrpcServer,
    SidecarProcess,
    ThreadedSidecar,
    running_sidecar,
    simple_config,
    wait_for,
)

SERVICE = "pilotfish.test.Echo"
FLAGS_HEADER = "x-pilotfish-response-flags"
STREAM_MESSAGES = 1000
BIG_MESSAGE = 1 << 20
BIG_MESSAGES = 64
RSS_GROWTH_LIMIT = 48 << 20
SLOW_READS = 8
# How many 1 MiB messages a sender may get ahead of a stalled reader: the windows and socket
# buffers of grpcio (about 8 direct, without a proxy) and of the sidecar, not the whole stream.
MAX_AHEAD = 24
# Bytes a client carrying 1 MiB messages must accept in one message (plus framing).
BIG_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 4 * BIG_MESSAGE),
    ("grpc.max_send_message_length", 4 * BIG_MESSAGE),
]
# A status the spec defines in binary trailing metadata: a google.rpc.Status, serialized.
# Hand-encoded (code=3, message="bad", one detail of type "t" with value "x") so the test needs
# no grpcio-status; the proxy must pass it through byte for byte, including a zero byte.
STATUS_DETAILS = b"\x08\x03\x12\x03bad\x1a\x08\n\x01t\x12\x03x\x00\xff"
ERROR_DETAILS = "field 'name' is wrong: 100% ünïcode, and a newline\nhere"


@dataclass
class Observed:
    """What the upstream server saw, for tests to assert on."""

    metadata: dict[str, str | bytes] = field(default_factory=dict)
    time_remaining: float | None = None
    started: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    big_sha256: str = ""
    # Large transfers: messages the sender has produced, and how far it got ahead of the reader.
    produced: int = 0
    max_ahead: int = 0


class EchoService:
    """Handlers for every test, on raw bytes."""

    def __init__(self) -> None:
        self.observed = Observed()

    def reset(self) -> Observed:
        self.observed = Observed()
        return self.observed

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Sleep": grpc.unary_unary_rpc_method_handler(self.sleep),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "FailWithDetails": grpc.unary_unary_rpc_method_handler(self.fail_with_details),
            "Count": grpc.unary_stream_rpc_method_handler(self.count),
            "Ticks": grpc.unary_stream_rpc_method_handler(self.ticks),
            "Big": grpc.unary_stream_rpc_method_handler(self.big),
            "SlowSink": grpc.stream_unary_rpc_method_handler(self.slow_sink),
            "RejectUpload": grpc.stream_unary_rpc_method_handler(self.reject_upload),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        seen = {key: value for key, value in context.invocation_metadata()}
        self.observed.metadata = seen
        context.send_initial_metadata(
            (
                ("x-initial", "first"),
                ("x-echo-request-id", str(seen.get("x-request-id", ""))),
            )
        )
        context.set_trailing_metadata(
            (
                ("x-trailing", "last"),
                ("x-trailing-bin", b"\x00\x01\xfe\xff"),
            )
        )
        return b"echo:" + request

    def sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        """Sleep ``request`` seconds, noticing the caller going away."""
        observed = self.observed
        observed.time_remaining = context.time_remaining()
        context.add_callback(observed.cancelled.set)
        observed.started.set()
        deadline = time.monotonic() + float(request.decode())
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.01)
        return b"slept"

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, ERROR_DETAILS)
        raise AssertionError("abort returns only by raising")

    def fail_with_details(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("grpc-status-details-bin", STATUS_DETAILS),))
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("see details")
        return b""

    def reject_upload(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        next(requests)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message was enough")
        raise AssertionError("abort returns only by raising")

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request.decode())):
            yield _numbered(i)

    def ticks(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """A tick every 20 ms for up to 10 s, or until the caller goes away."""
        observed = self.observed
        context.add_callback(observed.cancelled.set)
        observed.started.set()
        for i in range(500):
            if not context.is_active():
                return
            yield _numbered(i)
            time.sleep(0.02)

    def big(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        observed = self.observed
        digest = hashlib.sha256()
        for chunk in _big_messages(observed):
            digest.update(chunk)
            yield chunk
        # Known only once every message has been produced; the client compares at the end.
        observed.big_sha256 = digest.hexdigest()

    def slow_sink(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        count, sha256 = _consume_slowly(requests, self.observed)
        return f"{count}:{sha256}".encode()

    def collect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        digest = hashlib.sha256()
        count = 0
        for message in requests:
            digest.update(message)
            count += 1
        return f"{count}:{digest.hexdigest()}".encode()

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in requests:
            yield b"echo:" + message


def _numbered(i: int) -> bytes:
    # Varying sizes, so frames of different lengths cross the proxy.
    return f"{i:06d}:".encode() + bytes([i % 251]) * (i % 97)


def _big_messages(observed: Observed) -> Iterator[bytes]:
    for i in range(BIG_MESSAGES):
        observed.produced = i + 1
        yield os.urandom(BIG_MESSAGE)


def _consume_slowly(messages: Iterator[bytes], observed: Observed) -> tuple[int, str]:
    """Read like a slow receiver at first, noting how far the sender runs ahead meanwhile."""
    digest = hashlib.sha256()
    count = 0
    for message in messages:
        digest.update(message)
        count += 1
        if count <= SLOW_READS:
            time.sleep(0.25)
            # Without backpressure across the proxy the sender would be done by now.
            observed.max_ahead = max(observed.max_ahead, observed.produced - count)
    return count, digest.hexdigest()


def _method(service: str = SERVICE, name: str = "Echo") -> str:
    return f"/{service}/{name}"


def response_flags(error: grpc.Call) -> str | None:
    """The proxy's response flag, from trailing or (trailers-only response) initial metadata."""
    for metadata in (error.trailing_metadata(), error.initial_metadata()):
        for key, value in metadata or ():
            if key == FLAGS_HEADER:
                return str(value)
    return None


class RssSampler:
    """Samples a process's RSS every few milliseconds in a thread; ``growth`` is peak - start."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process
        self.baseline = self.peak = 0
        self._running = False
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self.baseline = self.peak = self.process.memory_info().rss
        self._running = True
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._running = False
        self._thread.join(5)
        self.peak = max(self.peak, self.process.memory_info().rss)


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """A loopback address where connects are refused: bound (so no one else takes the port)
    but never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def service() -> EchoService:
    return EchoService()


@pytest.fixture(scope="module")
def upstream(service: EchoService) -> Iterator[GrpcServer]:
    # Enough workers that no test waits for a free handler thread (the stalled readers hold 20).
    server = GrpcServer(SERVICE, service.handlers(), workers=48)
    yield server
    server.stop()


@pytest.fixture
def observed(service: EchoService) -> Observed:
    return service.reset()


@pytest.fixture
def sidecar(upstream: GrpcServer) -> Iterator[ThreadedSidecar]:
    """A sidecar in front of ``upstream`` with the route timeout disabled (long streams)."""
    with running_sidecar(simple_config([upstream.address], timeout="0s")) as sc:
        yield sc


@pytest.fixture
def channel(sidecar: ThreadedSidecar) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(sidecar.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=5)
        yield ch


# --- 1. unary and metadata ---------------------------------------------------------------------


def test_unary_call_relays_metadata_both_ways(
    channel: grpc.Channel, observed: Observed, sidecar: ThreadedSidecar
) -> None:
    call = channel.unary_unary(_method())
    response, state = call.with_call(
        b"hello",
        metadata=(("x-request-id", "req-42"), ("x-token-bin", b"\x00\xffbinary")),
        timeout=5,
    )

    assert response == b"echo:hello"
    assert observed.metadata["x-request-id"] == "req-42"
    assert observed.metadata["x-token-bin"] == b"\x00\xffbinary"
    initial = dict(state.initial_metadata())
    assert initial["x-initial"] == "first"
    assert initial["x-echo-request-id"] == "req-42"
    trailing = dict(state.trailing_metadata())
    assert trailing["x-trailing"] == "last"
    assert trailing["x-trailing-bin"] == b"\x00\x01\xfe\xff"
    assert FLAGS_HEADER not in initial and FLAGS_HEADER not in trailing
    assert state.code() is grpc.StatusCode.OK
    assert sidecar.stat("cluster.app.upstream_rq_2xx") == 1


def test_large_metadata_values_cross_the_proxy() -> None:
    # How fast they cross is the encoder's business: see
    # tests/unit/test_h2conn.py::test_large_header_values_are_sent_as_plain_literals.
    large_metadata = [("grpc.max_metadata_size", 256 << 10)]
    server = grpc.server(futures.ThreadPoolExecutor(4), options=large_metadata)

    def echo_blob(request: bytes, context: grpc.ServicerContext) -> bytes:
        blob = dict(context.invocation_metadata())["x-blob"]
        context.send_initial_metadata((("x-blob-back", blob),))
        return b""

    handlers = {"EchoBlob": grpc.unary_unary_rpc_method_handler(echo_blob)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with (
            running_sidecar(simple_config([f"127.0.0.1:{port}"])) as sidecar,
            grpc.insecure_channel(sidecar.address, large_metadata) as channel,
        ):
            call = channel.unary_unary(_method(name="EchoBlob"))
            for _ in range(3):
                # Unique each time, as tokens are: no HPACK table entry can stand in for it.
                blob = os.urandom(20_000).hex()
                _, state = call.with_call(b"", metadata=(("x-blob", blob),), timeout=20)
                assert dict(state.initial_metadata())["x-blob-back"] == blob
    finally:
        server.stop(0).wait(5)


# --- 2. streaming --------------------------------------------------------------------------------


def test_server_streaming_relays_every_message_in_order(channel: grpc.Channel) -> None:
    call = channel.unary_stream(_method(name="Count"))
    received = list(call(str(STREAM_MESSAGES).encode(), timeout=20))

    assert received == [_numbered(i) for i in range(STREAM_MESSAGES)]


def test_client_streaming_relays_every_message_in_order(channel: grpc.Channel) -> None:
    messages = [_numbered(i) for i in range(STREAM_MESSAGES)]
    expected = hashlib.sha256(b"".join(messages)).hexdigest()

    response = channel.stream_unary(_method(name="Collect"))(iter(messages), timeout=20)

    assert response == f"{STREAM_MESSAGES}:{expected}".encode()


def test_bidi_streaming_is_relayed_message_by_message(channel: grpc.Channel) -> None:
    """Ping-pong: message i+1 is sent only after echo i arrived, which a proxy that waited for
    the end of the request (or held a response back) could never complete."""
    echoed: queue.Queue[bytes] = queue.Queue()
    sent: list[bytes] = []

    def requests() -> Iterator[bytes]:
        for i in range(STREAM_MESSAGES):
            message = _numbered(i)
            sent.append(message)
            yield message
            try:
                echoed.get(timeout=5)
            except queue.Empty:
                return  # the echo never came: the count check below fails

    received: list[bytes] = []
    for response in channel.stream_stream(_method(name="Chat"))(requests(), timeout=30):
        received.append(response)
        echoed.put(response)

    assert len(received) == STREAM_MESSAGES
    assert received == [b"echo:" + m for m in sent]


# --- 3. a large stream with a slow reader: bounded memory ----------------------------------------


@pytest.mark.parametrize("direction", ["server-streaming", "client-streaming"])
def test_large_stream_to_slow_reader_keeps_sidecar_memory_bounded(
    upstream: GrpcServer, observed: Observed, direction: str
) -> None:
    sidecar = SidecarProcess(simple_config([upstream.address], timeout="0s"))
    try:
        process = psutil.Process(sidecar.proc.pid)
        with grpc.insecure_channel(sidecar.address, options=BIG_CHANNEL_OPTIONS) as channel:
            # Warm up: connections both ways exist, so they do not count as growth.
            assert channel.unary_unary(_method())(b"warm", timeout=5) == b"echo:warm"
            with RssSampler(process) as rss:
                if direction == "server-streaming":
                    responses = channel.unary_stream(_method(name="Big"))(b"", timeout=60)
                    count, sha256 = _consume_slowly(responses, observed)
                    expected_sha256 = observed.big_sha256
                else:
                    sent = hashlib.sha256()

                    def requests() -> Iterator[bytes]:
                        for message in _big_messages(observed):
                            sent.update(message)
                            yield message

                    reply = channel.stream_unary(_method(name="SlowSink"))(requests(), timeout=60)
                    count_text, _, sha256 = reply.decode().partition(":")
                    count = int(count_text)
                    expected_sha256 = sent.hexdigest()
    finally:
        sidecar.stop()

    assert count == BIG_MESSAGES
    assert sha256 == expected_sha256
    assert 0 < observed.max_ahead <= MAX_AHEAD, "the sender was not held back"
    assert rss.growth < RSS_GROWTH_LIMIT, f"sidecar RSS grew {rss.growth / 2**20:.1f} MiB"


# Regression: the proxy credits a DATA frame back to the upstream only once the downstream has
# taken the bytes. With a small connection window, a few stalled readers used it all up and
# every other call multiplexed on that upstream connection hung.
def test_stalled_readers_do_not_block_other_calls_on_the_upstream_connection(
    sidecar: ThreadedSidecar,
) -> None:
    stalled_options = [
        *BIG_CHANNEL_OPTIONS,
        # Small fixed windows, as a slow client has: the proxy, not grpcio, must hold the bytes.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 65536),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    with grpc.insecure_channel(sidecar.address, stalled_options) as stalled:
        calls = [stalled.unary_stream(_method(name="Big"))(b"", timeout=20) for _ in range(20)]
        try:
            assert wait_for(lambda: sidecar.stat("cluster.app.upstream_rq_active") == 20)
            time.sleep(1)  # the upstream fills every window it is given
            with grpc.insecure_channel(
                sidecar.address, [("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                assert channel.unary_unary(_method())(b"bystander", timeout=3) == (
                    b"echo:bystander"
                )
            assert sidecar.stat("cluster.app.upstream_cx_total") == 1  # it did share
        finally:
            for call in calls:
                call.cancel()


# --- 4. error statuses ---------------------------------------------------------------------------


def test_error_status_and_message_pass_through_unchanged(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(_method(name="Fail"))(b"", timeout=5)

    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == ERROR_DETAILS
    assert response_flags(error) is None


def test_binary_status_details_pass_through_byte_for_byte(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(_method(name="FailWithDetails"))(b"", timeout=5)

    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error.details() == "see details"
    assert dict(error.trailing_metadata())["grpc-status-details-bin"] == STATUS_DETAILS


def test_status_before_the_request_ends_stops_the_upload(
    channel: grpc.Channel, observed: Observed, sidecar: ThreadedSidecar
) -> None:
    """The server answers after one message of a 64 MiB upload: the client gets the status at
    once, stops sending, and the proxy keeps no stream open."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        channel.stream_unary(_method(name="RejectUpload"))(_big_messages(observed), timeout=10)
    elapsed = time.monotonic() - started

    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "the first message was enough"
    assert elapsed < 2
    assert observed.produced < BIG_MESSAGES // 2
    assert wait_for(lambda: sidecar.stat("http.ingress.downstream_rq_active") == 0)
    assert sidecar.stat("cluster.app.upstream_rq_active") == 0


# --- 5. deadlines and the route timeout ----------------------------------------------------------


def test_client_deadline_is_relayed_and_the_server_sees_the_call_end(
    channel: grpc.Channel, observed: Observed
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(_method(name="Sleep"))(b"5", timeout=0.5)

    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # grpc-timeout crossed the proxy: the server knows the caller's deadline (the header is
    # rounded up to whole units on the wire, hence the slack)...
    assert observed.time_remaining is not None
    assert 0 < observed.time_remaining <= 0.6
    # ...and the end of the call reached it, well before its 5 s sleep would end.
    assert observed.cancelled.wait(2)


def test_route_timeout_is_a_local_deadline_exceeded_with_flag_ut(
    upstream: GrpcServer, observed: Observed
) -> None:
    with (
        running_sidecar(simple_config([upstream.address], timeout="200ms")) as sidecar,
        grpc.insecure_channel(sidecar.address) as channel,
    ):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(_method(name="Sleep"))(b"2", timeout=10)
        elapsed = time.monotonic() - started

        error = caught.value
        assert isinstance(error, grpc.Call)
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert response_flags(error) == "UT"
        assert elapsed < 1.5, f"route timeout took {elapsed:.2f}s"
        # The proxy gave up on the upstream stream too: the server sees a cancellation.
        assert observed.cancelled.wait(2)
        assert sidecar.stat("cluster.app.upstream_rq_timeout") == 1


# --- 6. cancellation -----------------------------------------------------------------------------


def test_client_cancel_reaches_the_server(
    channel: grpc.Channel, observed: Observed, sidecar: ThreadedSidecar
) -> None:
    call = channel.unary_stream(_method(name="Ticks"))(b"", timeout=20)
    first = [next(call) for _ in range(3)]
    assert first == [_numbered(i) for i in range(3)]
    assert not observed.cancelled.is_set()

    call.cancel()

    assert observed.cancelled.wait(2), "the server never saw the cancel"
    assert wait_for(lambda: sidecar.stat("http.ingress.downstream_rq_reset") == 1)
    assert wait_for(lambda: sidecar.stat("cluster.app.upstream_rq_active") == 0)


# h2 alone closes its connection state machine on a received GOAWAY (python-hyper/h2#1181), which
# once made the sidecar fail every in-flight call with UC here; GracefulH2Connection keeps it open.
def test_upstream_graceful_shutdown_lets_the_in_flight_call_finish() -> None:
    service = EchoService()
    server = GrpcServer(SERVICE, service.handlers())
    try:
        with (
            running_sidecar(simple_config([server.address])) as sidecar,
            grpc.insecure_channel(sidecar.address) as channel,
        ):
            in_flight = channel.unary_unary(_method(name="Sleep")).future(b"0.5", timeout=10)
            assert service.observed.started.wait(5)

            stopped = server.server.stop(grace=5)  # GOAWAY now, in-flight calls may finish

            assert in_flight.result(timeout=5) == b"slept"
            assert stopped.wait(5)
            assert sidecar.stat("cluster.app.upstream_cx_protocol_error") == 0
    finally:
        server.stop()


# --- 7. local replies ----------------------------------------------------------------------------


def test_no_route_is_unimplemented_with_flag_nr(upstream: GrpcServer) -> None:
    routes = [{"match": {"prefix": f"/{SERVICE}/Echo"}, "route": {"cluster": "app"}}]
    with (
        running_sidecar(simple_config([upstream.address], routes=routes)) as sidecar,
        grpc.insecure_channel(sidecar.address) as channel,
    ):
        assert channel.unary_unary(_method())(b"routed", timeout=5) == b"echo:routed"
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(_method(name="Sleep"))(b"0", timeout=5)

        error = caught.value
        assert isinstance(error, grpc.Call)
        assert error.code() is grpc.StatusCode.UNIMPLEMENTED
        assert response_flags(error) == "NR"
        assert sidecar.stat("cluster.app.upstream_rq_total") == 1


def test_upstream_down_is_unavailable_with_flag_uf() -> None:
    with closed_port() as dead, running_sidecar(simple_config([dead])) as sidecar:
        with (
            grpc.insecure_channel(sidecar.address) as channel,
            pytest.raises(grpc.RpcError) as caught,
        ):
            channel.unary_unary(_method())(b"", timeout=5)

        error = caught.value
        assert isinstance(error, grpc.Call)
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        assert response_flags(error) == "UF"
        assert sidecar.stat("cluster.app.upstream_cx_connect_fail") >= 1


def test_upstream_that_never_speaks_http2_is_a_connect_failure() -> None:
    """TCP connects (the kernel accepts into the backlog) but no SETTINGS ever come."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        config = simple_config([f"127.0.0.1:{silent.getsockname()[1]}"])
        config["clusters"][0]["connect_timeout"] = "300ms"
        with (
            running_sidecar(config) as sidecar,
            grpc.insecure_channel(sidecar.address) as channel,
        ):
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(_method())(b"", timeout=5)
            elapsed = time.monotonic() - started
            assert sidecar.stat("cluster.app.upstream_cx_connect_timeout") >= 1

    error = caught.value
    assert isinstance(error, grpc.Call)
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert response_flags(error) == "UF"
    assert 0.25 < elapsed < 2


# --- 8. concurrency and connection reuse ---------------------------------------------------------


def test_concurrent_calls_share_few_upstream_connections(
    upstream: GrpcServer, sidecar: ThreadedSidecar
) -> None:
    threads, per_thread = 8, 25
    # A connection per channel (grpcio would share one subchannel between them otherwise), so
    # the proxy multiplexes 8 downstream connections onto its upstream pool.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(sidecar.address, own_connection) for _ in range(threads)]

    def worker(index: int) -> list[tuple[bytes, bytes]]:
        call = channels[index].unary_unary(_method())
        results = []
        for j in range(per_thread):
            payload = f"t{index}-c{j}".encode()
            results.append((payload, call(payload, timeout=10)))
        return results

    try:
        with futures.ThreadPoolExecutor(threads) as pool:
            results = [r for rs in pool.map(worker, range(threads)) for r in rs]
    finally:
        for ch in channels:
            ch.close()

    assert len(results) == threads * per_thread
    assert all(response == b"echo:" + payload for payload, response in results)
    assert sidecar.stat("cluster.app.upstream_rq_2xx") == threads * per_thread
    assert sidecar.stat("http.ingress.downstream_cx_total") == threads
    assert sidecar.stat("cluster.app.upstream_cx_total") <= 2
