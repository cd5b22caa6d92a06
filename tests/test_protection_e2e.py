"""Load protection end to end: real grpcio apps behind a real sidecar, under outages and overload.

Each test counts calls and their statuses and flags; none asserts a timing. The upstreams and
the caller come from ``tests.test_resilience_e2e``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench import overload
from tests.support import simple_config, wait_for
from tests.test_resilience_e2e import (
    OK,
    SERVICE,
    UNAVAILABLE,
    Act,
    Behaviour,
    Reply,
    call,
    closed_port,
    codes,
    mesh,
    proxied,
    settle_all,
    start_calls,
    upstreams,
)

pytestmark = pytest.mark.timeout(90)


@dataclass(frozen=True)
class Timed:
    at: float  # seconds since the paced run began
    reply: Reply


def paced(channel: grpc.Channel, seconds: float, rate: float) -> list[Timed]:
    """One call after another, started at ``rate`` a second for ``seconds`` (bounded: at most
    seconds * rate calls of at most a second each; a slow machine just makes fewer)."""
    start = time.monotonic()
    replies: list[Timed] = []
    for i in range(round(seconds * rate)):
        now = time.monotonic() - start
        if now >= seconds:
            break
        if now < i / rate:
            time.sleep(i / rate - now)
        replies.append(Timed(time.monotonic() - start, call(channel, timeout=1.0)))
    return replies


def test_adaptive_throttling_with_defaults_lets_calls_back_soon_after_an_outage() -> None:
    cluster = {"adaptive_throttling": True}
    with upstreams("a") as (a,), proxied(mesh([a.address], cluster=cluster)) as (sc, channel):
        healthy = paced(channel, 2.0, 40)
        a.die()
        outage = paced(channel, 8.0, 40)
        a.restart()
        recovery = paced(channel, 10.0, 40)
        local = sum(t.reply.flags == "AT" for t in outage + recovery)
        assert sc.stat("cluster.app.upstream_rq_throttled") == local

    assert all(t.reply.code is OK for t in healthy)
    # Down: every call fails, flagged; most are thrown locally, a fifth or so still probe.
    assert all(t.reply.code is UNAVAILABLE and t.reply.flags for t in outage)
    throttled = sum(t.reply.flags == "AT" for t in outage)
    assert throttled > 0.4 * len(outage)
    assert throttled < 0.9 * len(outage)  # the 80% cap keeps probing
    # Back: whatever still fails is a local throttle, and 8-10 s after recovery most calls pass.
    assert all(t.reply.code is OK or t.reply.flags == "AT" for t in recovery)
    late = [t.reply for t in recovery if t.at >= 8.0]
    assert len(late) >= 10
    assert sum(r.code is OK for r in late) > 0.5 * len(late)
    assert sum(t.reply.code is OK for t in recovery) > 0.3 * len(recovery)


def test_no_deadline_failure_goes_unflagged_when_the_upstream_races_the_per_try_timeout() -> None:
    # Every try outlasts its 50 ms: the sidecar's per-try timer and the upstream's own
    # DEADLINE_EXCEEDED (it was told 50 ms in grpc-timeout) race, ten calls at a time.
    retry = {"attempts": 1, "per_try_timeout": "50ms", "retry_on": ["reset"]}
    route = {"retry": {**retry, "retry_non_idempotent": True}}
    cluster = {"retry_budget": "off", "circuit_breakers": {"max_retries": 20}}
    with (
        upstreams("a") as (a,),
        proxied(mesh([a.address], route=route, cluster=cluster)) as (sc, ch),
    ):
        a.always(Behaviour(Act.SLEEP, seconds=0.5))
        with futures.ThreadPoolExecutor(10) as pool:
            replies = list(pool.map(lambda _: call(ch, timeout=3.0), range(200)))
        per_try = sc.stat("cluster.app.upstream_rq_per_try_timeout")
        retries = sc.stat("cluster.app.upstream_rq_retry")

    assert codes(replies) == [grpc.StatusCode.DEADLINE_EXCEEDED] * 200
    assert [r.flags for r in replies] == ["UT"] * 200
    # Whichever came first, each try counts as a per-try timeout, and the first one is retried.
    assert retries == 200
    assert per_try == 400
    # A try cut off while still queued in grpcio never reaches its handler (a loaded machine).
    assert 200 <= a.calls <= 400


def test_a_grpc_fallback_answers_ok_with_a_message_the_client_decodes(tmp_path: Path) -> None:
    # The message is written as JSON and encoded through a descriptor set, as a user would
    # with `protoc --include_imports -o health.pb health.proto`.
    files = descriptor_pb2.FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(files.file.add())
    (tmp_path / "health.pb").write_bytes(files.SerializeToString())
    message = {
        "json": {"status": "SERVING"},
        "type": "grpc.health.v1.HealthCheckResponse",
        "descriptor_set": str(tmp_path / "health.pb"),
    }
    fallback = {"response": {"grpc_status": "ok", "grpc_response": message}}
    with closed_port() as dead, proxied(mesh([dead], route={"fallback": fallback})) as (sc, ch):
        check = health_pb2_grpc.HealthStub(ch).Check
        answer, call_ = check.with_call(health_pb2.HealthCheckRequest(), timeout=5)
        served = sc.stat("http.ingress.downstream_rq_fallback")

    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert call_.code() is OK
    assert ("x-pilotfish-response-flags", "FB") in call_.initial_metadata()
    assert served == 1


# --- isolation ----------------------------------------------------------------------------------


def test_a_hanging_route_takes_no_more_than_its_bulkhead_and_the_others_keep_serving() -> None:
    # Two routes to one cluster (max_requests 8): the app's Call hangs; health checks answer.
    routes: list[dict[str, Any]] = [
        {
            "match": {"prefix": f"/{SERVICE}/"},
            "route": {"cluster": "app", "timeout": "15s"},
            "max_concurrent_requests": 4,
        },
        {"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "15s"}},
    ]
    with upstreams("a") as (a,):
        config = simple_config([a.address], routes=routes)
        config["clusters"][0]["circuit_breakers"] = {"max_requests": 8}
        with proxied(config) as (sc, channel):
            a.always(Behaviour(Act.HANG))
            held = start_calls(channel, 12)
            assert wait_for(lambda: a.in_flight == 4, 5)
            health = health_pb2_grpc.HealthStub(channel)
            checks = [health.Check(health_pb2.HealthCheckRequest(), timeout=5) for _ in range(20)]
            overflow = sc.stat("http.ingress.downstream_rq_route_overflow")
            in_flight = a.in_flight
            a.release_all()
            replies = settle_all(held)

    assert in_flight == 4  # the hanging route never held more than its limit
    assert all(c.status == health_pb2.HealthCheckResponse.SERVING for c in checks)
    rejected = [r for r in replies if r.code is not OK]
    assert len(rejected) == 8 and overflow == 8
    assert all(r.code is UNAVAILABLE and r.flags == "RO" for r in rejected)
    assert a.calls == 4


def test_max_requests_per_connection_moves_a_grpc_client_to_new_connections() -> None:
    with (
        upstreams("a") as (a,),
        proxied(mesh([a.address], listener={"max_requests_per_connection": 3})) as (sc, ch),
    ):
        replies = [call(ch) for _ in range(10)]
        drained = sc.stat("http.ingress.downstream_cx_max_requests_reached")
        opened = sc.stat("http.ingress.downstream_cx_total")

    assert codes(replies) == [OK] * 10  # GOAWAY first names the last stream: nothing is lost
    assert drained >= 3
    assert opened >= 4


def test_max_downstream_connections_closes_the_connection_past_the_limit() -> None:
    def http1(sock: socket.socket) -> bytes:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        return sock.recv(4096)

    with upstreams("a") as (a,):
        config = mesh([a.address], listener={"max_downstream_connections": 2})
        with proxied(config) as (sc, _):  # its gRPC channel holds the first connection
            host, port = config["listeners"][0]["address"].rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as second:
                assert http1(second)  # answered: the second connection is within the limit
                with socket.create_connection((host, int(port)), timeout=5) as third:
                    third.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                    with contextlib.suppress(ConnectionResetError):
                        assert third.recv(4096) == b""  # closed without an answer
                assert wait_for(lambda: sc.stat("http.ingress.downstream_cx_overflow") == 1, 5)
            # The second has gone: a new connection fits again.
            assert wait_for(lambda: sc.stat("http.ingress.downstream_cx_active") == 1, 5)
            with socket.create_connection((host, int(port)), timeout=5) as fourth:
                assert http1(fourth)
            overflow = sc.stat("http.ingress.downstream_cx_overflow")

    assert overflow == 1


# --- shedding on the app's saturation -----------------------------------------------------------


# The benchmark's app serves 200 calls/s (4 workers x 20 ms) and is offered 400/s: with the
# caller, the sidecar and the app all in Python, that takes most of two cores, and on a machine
# busy with other work the app then serves fewer calls for want of CPU, not because of what
# the sidecar sheds. The test's app takes 50 ms a call: the same overload (twice the capacity,
# the same shedding decisions at 2.5 times the scale) for 40% of the CPU. How much of its
# capacity the shedding keeps an app serving is asserted without CPU on a fake clock, in
# tests/unit/route/policy/test_shedding.py.
SERVICE_TIME = 0.05


def test_an_app_offered_twice_its_capacity_serves_most_of_it_and_every_shed_is_flagged() -> None:
    # 80 calls/s of capacity (4 workers x 50 ms), 160 offered for 10 s, 1 s deadlines.
    capacity = overload.capacity(SERVICE_TIME)
    result = overload.run(shedding=True, seconds=10.0, service_time=SERVICE_TIME)

    assert result.offered >= 0.9 * 2 * capacity * 10  # the caller kept its pace
    assert result.served >= 0.8 * capacity * 10
    assert result.shed >= 0.25 * result.offered
    # Every call that was not served was shed, with its status and flag: none timed out.
    assert result.failed == 0 and result.unflagged_failures == 0
    assert result.served + result.shed == result.offered


def test_a_callers_sidecar_retries_a_shed_call_on_another_host() -> None:
    # `a` answers as a shedding sidecar does (RESOURCE_EXHAUSTED, trailers-only, flag OM and
    # x-pilotfish-overloaded); `b` serves. gRPC calls are not idempotent, yet a shed one never
    # reached the app, so the default retry policy sends it to `b`.
    shed_metadata = (("x-pilotfish-overloaded", "true"), ("x-pilotfish-response-flags", "OM"))
    with upstreams("a", "b") as (a, b), proxied(mesh([a.address, b.address])) as (sc, channel):
        a.always(Behaviour(Act.FAIL, grpc.StatusCode.RESOURCE_EXHAUSTED, trailers=shed_metadata))

        replies = [call(channel) for _ in range(20)]
        retries = sc.stat("cluster.app.upstream_rq_retry")

    assert codes(replies) == [OK] * 20
    assert {r.body for r in replies} == {b"b"}
    assert a.calls >= 5  # round robin sent it about half of the first tries
    assert retries == a.calls
    assert b.calls == 20
