"""The sans-IO part of OTLP/gRPC export: framing, the judgement of an answer, fed by a real
server-side ``H2Codec`` in memory, and the retry schedule, on a fake clock."""

from __future__ import annotations

import base64
import zlib

import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo

from sidecar.codec import H2Codec, RequestReceived
from sidecar.codec.errors import CANCEL, INTERNAL_ERROR, REFUSED_STREAM
from sidecar.codec.events import Event
from sidecar.flags import GrpcStatus
from sidecar.observability.grpc_call import (
    MAX_ATTEMPTS,
    CallStatus,
    UnaryCall,
    framed,
    request_headers,
    retry_delay,
    retrying,
)
from sidecar.route.policy.deadline import parse_grpc_timeout

MESSAGE = b"spans " * 100


@pytest.mark.parametrize(
    ("compression", "flag", "decompress"),
    [
        ("none", 0, lambda b: b),
        ("gzip", 1, lambda b: zlib.decompress(b, 31)),
        ("deflate", 1, zlib.decompress),  # gRPC's deflate is the zlib format
    ],
)
def test_a_message_is_framed_with_its_flag_and_length(
    compression: str, flag: int, decompress: object
) -> None:
    frame = framed(MESSAGE, compression)
    assert frame[0] == flag
    assert int.from_bytes(frame[1:5], "big") == len(frame) - 5
    assert decompress(frame[5:]) == MESSAGE  # type: ignore[operator]


# -- the answer, from a real HTTP/2 server codec ---------------------------------------------


class Exchange:
    """A client codec making one call and a server codec answering it, bytes passed between."""

    def __init__(self) -> None:
        self.client = H2Codec(client_side=True)
        self.server = H2Codec(client_side=False)
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.call = UnaryCall(self.client.get_next_available_stream_id())
        headers = request_headers(
            authority="collector:4317", secure=False, path="/svc/Export", timeout_s=2.5,
            compression="gzip", extra=((b"x-api-key", b"k"),), user_agent=b"test/1",
        )  # fmt: skip
        self.client.send_headers(self.call.stream_id, headers)
        self.client.send_data(self.call.stream_id, framed(MESSAGE, "gzip"), end_stream=True)
        self.request = next(e for e in self.to_server() if isinstance(e, RequestReceived))

    def to_server(self) -> list[Event]:
        return self.server.receive_data(self.client.data_to_send())

    def to_client(self) -> list[Event]:
        events = self.client.receive_data(self.server.data_to_send())
        self.call.on_events(events)
        return events


def test_the_request_is_a_grpc_post_with_the_deadline_and_metadata() -> None:
    x = Exchange()
    headers = dict(x.request.headers)
    assert headers[b":method"] == b"POST"
    assert headers[b":path"] == b"/svc/Export"
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"te"] == b"trailers"
    assert parse_grpc_timeout(headers[b"grpc-timeout"]) == 2.5
    assert headers[b"grpc-encoding"] == b"gzip"
    assert headers[b"x-api-key"] == b"k"


def test_ok_in_trailers_after_the_response_message() -> None:
    x = Exchange()
    sid = x.call.stream_id
    x.server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    x.server.send_data(sid, b"\x00\x00\x00\x00\x00")
    x.to_client()
    assert not x.call.done and x.call.answered
    x.server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
    x.to_client()
    assert x.call.status == CallStatus(GrpcStatus.OK)


def test_a_trailers_only_error_with_retry_info_and_a_percent_encoded_message() -> None:
    x = Exchange()
    info = RetryInfo(retry_delay=Duration(seconds=2, nanos=500_000_000)).SerializeToString()
    x.server.send_headers(
        x.call.stream_id,
        [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", b"8"),
            (b"grpc-message", b"slow%20down"),
            # Unpadded base64, as gRPC sends binary metadata.
            (b"google.rpc.retryinfo-bin", base64.b64encode(info).rstrip(b"=")),
        ],
        end_stream=True,
    )
    x.to_client()
    status = x.call.status
    assert status == CallStatus(GrpcStatus.RESOURCE_EXHAUSTED, "slow down", 2.5)
    assert status.retryable and str(status) == "RESOURCE_EXHAUSTED: slow down"


@pytest.mark.parametrize(
    ("http_status", "code"),
    [(b"503", GrpcStatus.UNAVAILABLE), (b"404", GrpcStatus.UNIMPLEMENTED),
     (b"401", GrpcStatus.UNAUTHENTICATED), (b"418", GrpcStatus.UNKNOWN)],
)  # fmt: skip
def test_an_http_error_without_grpc_status_maps_as_the_grpc_spec_says(
    http_status: bytes, code: GrpcStatus
) -> None:
    x = Exchange()
    x.server.send_headers(x.call.stream_id, [(b":status", http_status)], end_stream=True)
    x.to_client()
    assert x.call.status is not None and x.call.status.code == code


@pytest.mark.parametrize(
    ("error_code", "code", "unprocessed"),
    [
        (REFUSED_STREAM, GrpcStatus.UNAVAILABLE, True),
        (CANCEL, GrpcStatus.CANCELLED, False),
        (INTERNAL_ERROR, GrpcStatus.INTERNAL, False),
    ],
)
def test_a_reset_stream(error_code: int, code: GrpcStatus, unprocessed: bool) -> None:
    x = Exchange()
    x.server.reset_stream(x.call.stream_id, error_code)
    x.to_client()
    assert x.call.status is not None
    assert (x.call.status.code, x.call.status.unprocessed) == (code, unprocessed)


def test_a_goaway_below_the_call_means_the_collector_never_saw_it() -> None:
    x = Exchange()
    x.server.send_goaway(0)
    x.to_client()
    assert x.call.status is not None and x.call.status.unprocessed
    assert x.call.status.code == GrpcStatus.UNAVAILABLE


def test_a_goaway_above_the_call_lets_it_finish() -> None:
    x = Exchange()
    x.server.send_goaway(x.call.stream_id)
    x.to_client()
    assert not x.call.done
    x.server.send_headers(
        x.call.stream_id, [(b":status", b"200"), (b"grpc-status", b"0")], end_stream=True
    )
    x.to_client()
    assert x.call.status == CallStatus(GrpcStatus.OK)


def test_no_grpc_status_and_a_lost_connection_are_failures() -> None:
    x = Exchange()
    x.server.send_headers(x.call.stream_id, [(b":status", b"200")], end_stream=True)
    x.to_client()
    assert x.call.status is not None and x.call.status.code == GrpcStatus.UNKNOWN
    y = Exchange()
    status = y.call.connection_lost("connection reset")
    assert (status.code, status.unprocessed) == (GrpcStatus.UNAVAILABLE, False)


def test_retry_info_that_does_not_parse_is_ignored() -> None:
    assert retry_delay(None) is None
    assert retry_delay(b"!!!") is None
    assert retry_delay(base64.b64encode(b"\xff\xff")) is None
    assert retry_delay(base64.b64encode(RetryInfo().SerializeToString())) is None


# -- the retry schedule ------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def run(
    statuses: list[CallStatus], timeout: float, jitter: float = 0.5
) -> tuple[CallStatus, int, list[float]]:
    t = FakeTime()
    tries = 0

    def attempt() -> CallStatus:
        nonlocal tries
        tries += 1
        return statuses[min(tries, len(statuses)) - 1]

    tries_of = retrying(t.now + timeout, clock=t.clock, sleep=t.sleep, random=lambda: jitter)
    result = tries_of(attempt)
    return result, tries, t.sleeps


UNAVAILABLE = CallStatus(GrpcStatus.UNAVAILABLE)
OK = CallStatus(GrpcStatus.OK)


def test_transient_failures_are_retried_with_exponential_backoff() -> None:
    assert run([UNAVAILABLE, UNAVAILABLE, OK], timeout=10) == (OK, 3, [1.0, 2.0])


def test_the_backoff_jitters_by_twenty_percent() -> None:
    assert run([UNAVAILABLE, OK], timeout=10, jitter=0.0)[2] == [pytest.approx(0.8)]
    assert run([UNAVAILABLE, OK], timeout=10, jitter=0.999999)[2] == [pytest.approx(1.2)]


def test_no_wait_ends_past_the_export_timeout() -> None:
    # 1 + 2 + 4 = 7 s waited; a fourth wait of 8 s would end past 10 s.
    assert run([UNAVAILABLE], timeout=10) == (UNAVAILABLE, 4, [1.0, 2.0, 4.0])


def test_at_most_six_tries() -> None:
    result, tries, sleeps = run([UNAVAILABLE], timeout=1000)
    assert (result, tries, len(sleeps)) == (UNAVAILABLE, MAX_ATTEMPTS, MAX_ATTEMPTS - 1)


def test_the_collectors_delay_replaces_the_backoff() -> None:
    asked = CallStatus(GrpcStatus.RESOURCE_EXHAUSTED, retry_delay=0.02)
    assert run([asked, asked, OK], timeout=1) == (OK, 3, [0.02, 0.02])


@pytest.mark.parametrize(
    "code",
    [GrpcStatus.INVALID_ARGUMENT, GrpcStatus.UNAUTHENTICATED, GrpcStatus.INTERNAL,
     GrpcStatus.UNIMPLEMENTED, GrpcStatus.UNKNOWN],
)  # fmt: skip
def test_permanent_failures_are_not_retried(code: GrpcStatus) -> None:
    status = CallStatus(code)
    assert run([status, OK], timeout=10) == (status, 1, [])
