"""Resilience policies end to end: real grpcio clients, a real sidecar, upstreams that misbehave.

Every upstream is a ``FlakyUpstream``: a grpcio server whose behaviour a test sets while it runs
(fail the next N calls with a status, hang, sleep, reset the stream, die and come back on the
same port, report NOT_SERVING to health checks). Each test shows one policy working from the
caller's side (status, response flag, latency) and from the sidecar's (its /stats and /clusters),
and counts what really reached the upstreams.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.support import ThreadedSidecar, running_sidecar, simple_config, wait_for

SERVICE = "pilotfish.test.Flaky"
METHOD = f"/{SERVICE}/Call"
FLAGS_HEADER = "x-pilotfish-response-flags"
ATTEMPT_HEADER = "x-pilotfish-attempt-count"
FAULT_HEADER = "x-pilotfish-fault"
# The longest any upstream handler may block, whatever a test asked: nothing outlives a test.
HANDLER_CAP = 5.0
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
OK = grpc.StatusCode.OK
# Retry everything a dead or flapping host can do to a call, gRPC calls included.
RETRY_ALL: dict[str, Any] = {
    "attempts": 2,
    "retry_on": ["connect-failure", "reset", "unavailable"],
    "retry_non_idempotent": True,
    "backoff": {"base": "5ms", "max": "20ms"},
}

pytestmark = pytest.mark.timeout(60)


# --- a misbehaving upstream ---------------------------------------------------------------------


class Act(enum.Enum):
    ANSWER = "answer"
    FAIL = "fail"  # abort with a status (after ``seconds``)
    SLEEP = "sleep"  # answer after a delay (cut short by a cancel or release_all)
    HANG = "hang"  # answer only on release_all (or HANDLER_CAP)
    RESET = "reset"  # the stream dies with its connection, no response


@dataclass(frozen=True)
class Behaviour:
    act: Act = Act.ANSWER
    code: grpc.StatusCode = UNAVAILABLE
    seconds: float = 0.0
    trailers: tuple[tuple[str, str], ...] = ()  # sent with a FAIL


@dataclass(frozen=True)
class Seen:
    """One call as the upstream saw it."""

    attempt: int
    budget: float | None  # what grpc-timeout left, in seconds; None without one
    metadata: dict[str, str]


@dataclass
class Traffic:
    calls: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    retries_in_flight: int = 0
    max_retries_in_flight: int = 0


class FlakyUpstream:
    """A grpcio server (with grpc.health.v1) whose behaviour tests set call by call.

    ``fail_next``/``sleep_next``/``reset_next`` queue one-shot behaviours; ``always`` sets what
    every other call does. ``die`` stops the server; ``restart`` serves again on the same port.
    """

    def __init__(self, name: str, workers: int = 32) -> None:
        self.name = name
        self.workers = workers
        self.port = 0
        self.health = health.HealthServicer()
        self.traffic = Traffic()
        self._lock = threading.Lock()
        self._queued: deque[Behaviour] = deque()
        self._default = Behaviour()
        self._release = threading.Event()
        self._server: grpc.Server | None = None
        self.relay: Relay | None = None
        self.restart()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- what tests control ---------------------------------------------------------------------

    def always(self, behaviour: Behaviour) -> None:
        with self._lock:
            self._default = behaviour

    def fail_next(self, n: int, code: grpc.StatusCode = UNAVAILABLE) -> None:
        self._queue(n, Behaviour(Act.FAIL, code))

    def sleep_next(self, n: int, seconds: float) -> None:
        self._queue(n, Behaviour(Act.SLEEP, seconds=seconds))

    def reset_next(self, n: int) -> None:
        self._queue(n, Behaviour(Act.RESET))

    def _queue(self, n: int, behaviour: Behaviour) -> None:
        with self._lock:
            self._queued.extend([behaviour] * n)

    def release_all(self) -> None:
        """Let every hanging or sleeping call answer now (and every later one at once)."""
        self._release.set()

    def serving(self, ok: bool) -> None:
        statuses = health_pb2.HealthCheckResponse
        self.health.set("", statuses.SERVING if ok else statuses.NOT_SERVING)

    def die(self) -> None:
        if self._server is not None:
            self._server.stop(0).wait(5)
            self._server = None

    def restart(self) -> None:
        """Serve (again) on the same port: the sidecar's endpoint stays valid."""
        server = grpc.server(futures.ThreadPoolExecutor(self.workers))
        handler = grpc.unary_unary_rpc_method_handler(self._handle)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Call": handler}),)
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        assert port, f"port {self.port} could not be bound again"
        self.port = port
        server.start()
        self._server = server

    def stop(self) -> None:
        self.release_all()
        self.die()

    # -- what tests read ------------------------------------------------------------------------

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.traffic.calls)

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self.traffic.calls)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self.traffic.in_flight

    # -- the handler ------------------------------------------------------------------------

    def _handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        attempt = int(metadata.get(ATTEMPT_HEADER, "0"))
        remaining = context.time_remaining()
        budget = remaining if remaining is not None and remaining < 1e6 else None
        with self._lock:
            t = self.traffic
            t.calls.append(Seen(attempt, budget, metadata))
            t.in_flight += 1
            if attempt > 1:
                t.retries_in_flight += 1
                t.max_retries_in_flight = max(t.max_retries_in_flight, t.retries_in_flight)
            behaviour = self._queued.popleft() if self._queued else self._default
        try:
            return self._act(behaviour, context)
        finally:
            with self._lock:
                self.traffic.in_flight -= 1
                if attempt > 1:
                    self.traffic.retries_in_flight -= 1

    def _act(self, behaviour: Behaviour, context: grpc.ServicerContext) -> bytes:
        if behaviour.act is Act.HANG:
            self._wait(context, HANDLER_CAP)
        else:
            self._wait(context, behaviour.seconds)
        if behaviour.act is Act.FAIL:
            if behaviour.trailers:
                context.set_trailing_metadata(behaviour.trailers)
            context.abort(behaviour.code, f"{self.name} told to fail")
        if behaviour.act is Act.RESET:
            # grpcio cannot reset a stream: context.cancel() and server.stop() both answer a
            # status. A relay in front can kill the connection (TCP RST) under the call.
            assert self.relay is not None, "reset needs a relay: use the relay's address"
            threading.Thread(target=self.relay.abort_all, daemon=True).start()
            self._wait(context, HANDLER_CAP)
            return b""
        return self.name.encode()

    def _wait(self, context: grpc.ServicerContext, seconds: float) -> None:
        """Block up to ``seconds``; a cancelled call or ``release_all`` ends it early."""
        until = time.monotonic() + min(seconds, HANDLER_CAP)
        while context.is_active() and time.monotonic() < until:
            if self._release.wait(min(0.02, max(0.0, until - time.monotonic()))):
                return


class Relay:
    """A TCP relay in front of an upstream; ``abort_all`` kills its connections with a RST."""

    def __init__(self, target: str) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: set[socket.socket] = set()
        self._aborted: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            server = socket.create_connection(self.target, timeout=2)
            server.settimeout(None)
            with self._lock:
                self._sockets.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while (data := src.recv(65536)) and src not in self._aborted:
                dst.sendall(data)
            # An aborted connection must not half-close: a FIN would let the upstream answer.
            if src not in self._aborted:
                dst.shutdown(socket.SHUT_WR)

    def abort_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
            self._aborted |= sockets
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)  # wakes the pump blocked in recv
            sock.close()  # linger 0: RST, not FIN

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self.abort_all()


@contextlib.contextmanager
def relayed(upstream: FlakyUpstream) -> Iterator[Relay]:
    relay = upstream.relay = Relay(upstream.address)
    try:
        yield relay
    finally:
        upstream.relay = None
        relay.close()


@contextlib.contextmanager
def upstreams(*names: str, workers: int = 32) -> Iterator[list[FlakyUpstream]]:
    servers: list[FlakyUpstream] = []
    try:
        for name in names:
            servers.append(FlakyUpstream(name, workers))
        yield servers
    finally:
        for server in servers:
            server.stop()


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    """A loopback address where connects are refused (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


# --- sidecar config -------------------------------------------------------------------------


def mesh(
    endpoints: Sequence[str | dict[str, Any]],
    *,
    timeout: str = "15s",
    route: dict[str, Any] | None = None,
    cluster: dict[str, Any] | None = None,
    listener: dict[str, Any] | None = None,
    extra_clusters: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One route to cluster ``app``; ``route`` adds route policy keys (retry, rate_limit, fault,
    fallback), ``cluster`` cluster keys (load_balancing, outlier_detection, ...)."""
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": timeout}}]
    routes[0].update(route or {})
    config = simple_config(
        list(endpoints),  # type: ignore[arg-type]  # simple_config passes endpoints through as-is
        routes=routes,
        extra_listener=listener,
        extra_clusters=extra_clusters,
    )
    config["clusters"][0].update(cluster or {})
    return config


@contextlib.contextmanager
def proxied(config: dict[str, Any]) -> Iterator[tuple[ThreadedSidecar, grpc.Channel]]:
    with running_sidecar(config) as sidecar, grpc.insecure_channel(sidecar.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=5)
        yield sidecar, channel


def health_flags(sidecar: ThreadedSidecar, address: str) -> str:
    _, text = sidecar.admin("/clusters")
    for line in text.splitlines():
        if line.startswith(f"app::{address}::health_flags::"):
            return line.rsplit("::", 1)[1]
    raise AssertionError(f"{address} not in /clusters:\n{text}")


# --- a caller -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    code: grpc.StatusCode
    body: bytes | None
    details: str | None
    flags: str | None
    metadata: dict[str, str]
    elapsed: float


def _settle(call: Any, started: float) -> Reply:
    """A finished future or call (``grpc.Future`` and ``grpc.Call``) as a ``Reply``."""
    body: bytes | None = None
    with contextlib.suppress(grpc.RpcError):
        body = call.result()
    metadata: dict[str, str] = {}
    for pairs in (call.initial_metadata(), call.trailing_metadata()):
        for key, value in pairs or ():
            if isinstance(value, str):
                metadata[key] = value
    return Reply(
        code=call.code(),
        body=body,
        details=call.details(),
        flags=metadata.get(FLAGS_HEADER),
        metadata=metadata,
        elapsed=time.monotonic() - started,
    )


def call(
    channel: grpc.Channel, *, timeout: float = 5.0, metadata: Sequence[tuple[str, str]] = ()
) -> Reply:
    started = time.monotonic()
    future = channel.unary_unary(METHOD).future(b"", timeout=timeout, metadata=tuple(metadata))
    return _settle(future, started)


def start_calls(channel: grpc.Channel, n: int, *, timeout: float = 5.0) -> list[tuple[Any, float]]:
    stub = channel.unary_unary(METHOD)
    return [(stub.future(b"", timeout=timeout), time.monotonic()) for _ in range(n)]


def settle_all(started: list[tuple[Any, float]]) -> list[Reply]:
    return [_settle(future, at) for future, at in started]


def codes(replies: Sequence[Reply]) -> list[grpc.StatusCode]:
    return [r.code for r in replies]


def by_upstream(replies: Sequence[Reply]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in replies:
        key = r.body.decode() if r.body is not None else f"error:{r.code.name}"
        counts[key] = counts.get(key, 0) + 1
    return counts


# --- deadlines ----------------------------------------------------------------------------------

CLOCK_SLACK = 0.005  # seconds: budgets are compared across processes and rounded headers


def test_client_deadline_is_deadline_exceeded_and_its_budget_goes_upstream() -> None:
    with upstreams("a") as (a,), proxied(mesh([a.address])) as (sidecar, channel):
        a.always(Behaviour(Act.SLEEP, seconds=2.0))

        reply = call(channel, timeout=0.3)

        assert reply.code is grpc.StatusCode.DEADLINE_EXCEEDED  # never UNAVAILABLE
        assert reply.elapsed < 2.0  # not the upstream's 2 s (on a busy machine, not 0.3 s either)
        (seen,) = a.seen()
        # The upstream's grpc measures what is left against its own clock reading and rounds
        # the header it received; a millisecond of slack keeps that from failing the test.
        assert seen.budget is not None and 0 < seen.budget <= 0.3 + CLOCK_SLACK
        # Whoever gave up first (the caller's cancel or the sidecar's own timer), the upstream
        # call ends and the sidecar holds nothing for it.
        assert wait_for(lambda: a.in_flight == 0, 2)
        assert wait_for(lambda: sidecar.stat("cluster.app.upstream_rq_active") == 0, 2)


def test_route_timeout_smaller_than_the_client_deadline_wins() -> None:
    with upstreams("a") as (a,), proxied(mesh([a.address], timeout="200ms")) as (sidecar, channel):
        a.always(Behaviour(Act.SLEEP, seconds=2.0))

        reply = call(channel, timeout=5.0)

        assert reply.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.2 <= reply.elapsed < 2.0  # the route's 200 ms, not the upstream's 2 s
        (seen,) = a.seen()
        assert seen.budget is not None and seen.budget <= 0.2 + CLOCK_SLACK
        # The upstream was told the same 200 ms: on a loaded machine its own deadline may fire
        # before the sidecar's timer, and its DEADLINE_EXCEEDED is relayed as is (no flag).
        sidecar_first = reply.flags == "UT"
        assert sidecar_first or (reply.flags is None and reply.details == "Deadline Exceeded")
        assert sidecar.stat("cluster.app.upstream_rq_timeout") == int(sidecar_first)
        assert wait_for(lambda: a.in_flight == 0, 2), "the upstream call was not cancelled"


def test_per_try_timeout_then_a_fast_second_try_succeeds() -> None:
    # `deadline-exceeded` too: the upstream, told its 200 ms, may answer DEADLINE_EXCEEDED
    # itself a moment before the sidecar's per-try timer fires (on a loaded machine).
    retry_on = [*RETRY_ALL["retry_on"], "deadline-exceeded"]
    retry = {
        "retry": {**RETRY_ALL, "attempts": 1, "per_try_timeout": "200ms", "retry_on": retry_on}
    }
    with upstreams("a") as (a,), proxied(mesh([a.address], route=retry)) as (sidecar, channel):
        a.sleep_next(1, 2.0)

        reply = call(channel, timeout=5.0)

        assert reply.code is OK and reply.body == b"a"
        assert reply.elapsed < 2.0  # the second try did not wait for the first one's 2 s
        first, second = a.seen()
        assert (first.attempt, second.attempt) == (1, 2)
        # Each try is told its own budget: the per-try timeout, not the caller's 5 s.
        assert first.budget is not None and first.budget <= 0.2 + CLOCK_SLACK
        assert second.budget is not None and second.budget <= 0.2 + CLOCK_SLACK
        assert sidecar.stat("cluster.app.upstream_rq_per_try_timeout") in (0, 1)
        assert sidecar.stat("cluster.app.upstream_rq_retry") == 1
        assert sidecar.stat("cluster.app.upstream_rq_timeout") == 0


# --- retries ------------------------------------------------------------------------------------


def test_unavailable_once_is_retried_when_the_route_allows_it() -> None:
    route = {"retry": RETRY_ALL}
    with upstreams("a") as (a,), proxied(mesh([a.address], route=route)) as (sidecar, channel):
        a.fail_next(1)

        reply = call(channel)

        assert reply.code is OK and reply.body == b"a"
        assert [s.attempt for s in a.seen()] == [1, 2]
        assert sidecar.stat("cluster.app.upstream_rq_retry") == 1


def test_default_policy_retries_a_grpc_unavailable_once_as_istio_does() -> None:
    with upstreams("a") as (a,), proxied(mesh([a.address])) as (sidecar, channel):
        a.fail_next(1)
        assert call(channel).code is OK
        assert a.calls == 2
        assert sidecar.stat("cluster.app.upstream_rq_retry") == 1

        a.fail_next(2)
        reply = call(channel)

        assert reply.code is UNAVAILABLE
        assert reply.flags is None  # the upstream's own answer, passed through
        assert a.calls == 4
        assert sidecar.stat("cluster.app.upstream_rq_retry") == 2


def test_connection_reset_is_uc_by_default_and_retried_under_a_reset_policy() -> None:
    with upstreams("a") as (a,), relayed(a) as relay:
        with proxied(mesh([relay.address])) as (sidecar, channel):
            a.reset_next(1)

            reply = call(channel)

            # It may have done the work: the default policy does not repeat a gRPC call.
            assert reply.code is UNAVAILABLE and reply.flags == "UC"
            assert a.calls == 1
            assert sidecar.stat("cluster.app.upstream_rq_retry") == 0

        with proxied(mesh([relay.address], route={"retry": RETRY_ALL})) as (sidecar, channel):
            a.reset_next(1)

            reply = call(channel)

            assert reply.code is OK and reply.body == b"a"
            assert [s.attempt for s in a.seen()][-2:] == [1, 2]
            assert sidecar.stat("cluster.app.upstream_rq_retry") == 1


def test_connect_failure_is_retried_on_the_other_host() -> None:
    with (
        upstreams("a") as (a,),
        closed_port() as dead,
        proxied(mesh([dead, a.address])) as (sidecar, channel),
    ):
        replies = [call(channel) for _ in range(6)]

        assert codes(replies) == [OK] * 6
        assert a.calls == 6
        assert sidecar.stat("cluster.app.upstream_cx_connect_fail") >= 1
        assert sidecar.stat("cluster.app.upstream_rq_retry") >= 1


# 20 callers at once against an upstream that fails every call after 300 ms. The default budget
# allows max(min_concurrency 3, 20% of the active requests) retries in flight, and all 20 are
# active when the first tries fail: at most 4 retries at once. Every first try fails within a few
# ms of the others, long before any retry (300 ms) can end and free its permit, so at most 4
# retries happen at all: upstream calls <= 20 + 4 = 20 x 1.2. Each caller is refused a retry
# (overflow) or gets one; with attempts: 1 nobody gets two.
CALLERS = 20
BUDGET_RETRIES = max(3, CALLERS * 20 // 100)


SLOW_FAILURE = Behaviour(Act.FAIL, seconds=0.3)


def test_retry_budget_bounds_retries_under_a_failing_upstream() -> None:
    route = {"retry": {**RETRY_ALL, "attempts": 1}}
    with (
        upstreams("a", workers=64) as (a,),
        proxied(mesh([a.address], route=route)) as (sidecar, channel),
    ):
        a.always(SLOW_FAILURE)
        replies = settle_all(start_calls(channel, CALLERS))

        assert codes(replies) == [UNAVAILABLE] * CALLERS
        retries = sidecar.stat("cluster.app.upstream_rq_retry")
        assert BUDGET_RETRIES - 1 <= retries <= BUDGET_RETRIES
        assert a.calls == CALLERS + retries <= CALLERS * 1.2
        assert a.traffic.max_retries_in_flight <= BUDGET_RETRIES
        assert sidecar.stat("cluster.app.upstream_rq_retry_overflow") >= CALLERS - BUDGET_RETRIES


def test_retry_overflow_is_counted_once_per_refused_retry() -> None:
    route = {"retry": {**RETRY_ALL, "attempts": 1}}
    with (
        upstreams("a", workers=64) as (a,),
        proxied(mesh([a.address], route=route)) as (sidecar, channel),
    ):
        a.always(SLOW_FAILURE)
        replies = settle_all(start_calls(channel, CALLERS))

        assert codes(replies) == [UNAVAILABLE] * CALLERS
        retries = sidecar.stat("cluster.app.upstream_rq_retry")
        # Every caller's first try failed; each either got its one retry or was refused one.
        assert sidecar.stat("cluster.app.upstream_rq_retry_overflow") == CALLERS - retries


# --- circuit breakers ---------------------------------------------------------------------------


def test_max_requests_fails_the_excess_fast_with_uo() -> None:
    cluster = {"circuit_breakers": {"max_requests": 2}}
    with upstreams("a") as (a,), proxied(mesh([a.address], cluster=cluster)) as (sidecar, channel):
        a.always(Behaviour(Act.HANG))
        held = start_calls(channel, 2)
        assert wait_for(lambda: a.in_flight == 2, 3)

        started = time.monotonic()
        excess = settle_all(start_calls(channel, 3))
        elapsed = time.monotonic() - started

        assert codes(excess) == [UNAVAILABLE] * 3
        assert [r.flags for r in excess] == ["UO"] * 3
        # Queued, they would end at their 5 s deadline (DEADLINE_EXCEEDED, not UO); half of
        # it is room enough for a busy machine.
        assert elapsed < 2.5, "the excess was queued, not failed at once"
        assert a.calls == 2
        assert sidecar.stat("cluster.app.upstream_rq_overflow") == 3

        a.release_all()
        assert codes(settle_all(held)) == [OK, OK]


def test_breaker_overflow_leaves_the_active_gauge_balanced() -> None:
    cluster = {"circuit_breakers": {"max_requests": 1}}
    with upstreams("a") as (a,), proxied(mesh([a.address], cluster=cluster)) as (sidecar, channel):
        a.always(Behaviour(Act.HANG))
        held = start_calls(channel, 1)
        assert wait_for(lambda: a.in_flight == 1, 3)
        assert call(channel).flags == "UO"
        a.release_all()
        assert codes(settle_all(held)) == [OK]

        assert wait_for(lambda: sidecar.stat("cluster.app.upstream_rq_active") == 0, 2), (
            sidecar.stat("cluster.app.upstream_rq_active")
        )


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """Accepts TCP (kernel backlog) but never speaks HTTP/2: connects stay pending."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


def test_max_pending_requests_fails_the_excess_fast_with_uo() -> None:
    cluster = {"circuit_breakers": {"max_pending_requests": 1}, "connect_timeout": "1s"}
    with silent_listener() as silent, proxied(mesh([silent], cluster=cluster)) as (sc, channel):
        waiting = start_calls(channel, 1)
        assert wait_for(lambda: sc.stat("cluster.app.upstream_cx_total") >= 1, 2)

        excess = call(channel)

        assert excess.code is UNAVAILABLE and excess.flags == "UO"
        assert excess.elapsed < 1.0  # before the 1 s connect timeout could have ended it
        (first,) = settle_all(waiting)
        assert first.code is UNAVAILABLE and first.flags == "UF"  # its connect timed out


def test_pending_overflow_is_counted_once() -> None:
    cluster = {"circuit_breakers": {"max_pending_requests": 1}, "connect_timeout": "1s"}
    with silent_listener() as silent, proxied(mesh([silent], cluster=cluster)) as (sc, channel):
        waiting = start_calls(channel, 1)
        assert wait_for(lambda: sc.stat("cluster.app.upstream_cx_total") >= 1, 2)

        assert call(channel).flags == "UO"

        assert sc.stat("cluster.app.upstream_rq_pending_overflow") == 1
        settle_all(waiting)


# --- outlier detection --------------------------------------------------------------------------

OUTLIER = {
    "interval": "500ms",
    "consecutive_5xx": 3,
    "base_ejection_time": "1s",
    "max_ejection_percent": 50,
}


def test_outlier_detection_ejects_a_failing_host_and_lets_it_back() -> None:
    cluster = {"outlier_detection": OUTLIER}
    no_retry = {"retry": {"attempts": 0}}  # the failures reach the caller, to be counted
    with (
        upstreams("a", "b", "bad") as (a, b, bad),
        proxied(
            mesh([a.address, b.address, bad.address], cluster=cluster, route=no_retry)
        ) as (sc, channel),
    ):
        bad.always(Behaviour(Act.FAIL))

        # Round robin: every third call reaches the bad host; its third failure ejects it.
        warmup = [call(channel) for _ in range(9)]
        assert codes(warmup).count(UNAVAILABLE) == 3
        assert sc.stat("cluster.app.outlier_detection.ejections_enforced_total") == 1
        assert sc.stat("cluster.app.membership_healthy") == 2
        assert health_flags(sc, bad.address) == "/failed_outlier_check"

        ejected = [call(channel) for _ in range(20)]
        assert codes(ejected) == [OK] * 20
        assert bad.calls == 3

        bad.always(Behaviour())
        assert wait_for(lambda: sc.stat("cluster.app.membership_healthy") == 3, 3)
        assert health_flags(sc, bad.address) == "healthy"
        assert sc.stat("cluster.app.outlier_detection.unejections_total") == 1
        back = [call(channel) for _ in range(9)]
        assert codes(back) == [OK] * 9
        assert bad.calls > 3


# --- active health checks -----------------------------------------------------------------------

GRPC_HEALTH = {
    "type": "grpc",
    "interval": "100ms",
    "timeout": "1s",
    "unhealthy_threshold": 2,  # one slow check on a busy test machine is not an outage
    "healthy_threshold": 1,
}


def test_grpc_health_check_takes_a_not_serving_host_out_and_back() -> None:
    with upstreams("a", "b", "c") as servers:
        b = servers[1]
        for server in servers:
            server.serving(True)
        config = mesh([s.address for s in servers], cluster={"health_check": GRPC_HEALTH})
        with proxied(config) as (sc, channel):
            assert wait_for(lambda: sc.stat("cluster.app.membership_healthy") == 3, 3)

            b.serving(False)
            assert wait_for(lambda: sc.stat("cluster.app.membership_healthy") == 2, 3)
            assert health_flags(sc, b.address) == "/failed_active_hc"
            before = b.calls
            out = [call(channel) for _ in range(12)]
            assert codes(out) == [OK] * 12
            assert b.calls == before
            assert by_upstream(out) == {"a": 6, "c": 6}
            assert sc.stat("cluster.app.health_check.failure") >= 1

            b.serving(True)
            assert wait_for(lambda: sc.stat("cluster.app.membership_healthy") == 3, 3)
            assert health_flags(sc, b.address) == "healthy"
            back = [call(channel) for _ in range(12)]
            assert by_upstream(back) == {"a": 4, "b": 4, "c": 4}
            assert sc.stat("cluster.app.health_check.success") >= 4  # 3 at start, b again


# --- load balancing -----------------------------------------------------------------------------


def test_least_request_keeps_away_from_the_host_with_calls_in_flight() -> None:
    cluster = {"load_balancing": {"policy": "least_request"}}
    with upstreams("busy", "idle") as (busy, idle):
        busy.always(Behaviour(Act.HANG))
        config = mesh([busy.address, idle.address], cluster=cluster)
        with proxied(config) as (_, channel):
            held: list[tuple[Any, float]] = []
            for _ in range(10):
                pending = start_calls(channel, 1)

                # Either it lands on the busy host (and stays in flight) or it finishes.
                def settled(future: Any = pending[0][0], in_flight: int = len(held)) -> bool:
                    return bool(future.done()) or busy.in_flight > in_flight

                assert wait_for(settled, 3)
                if not pending[0][0].done():
                    held.extend(pending)

            # Both idle: a coin toss; once one call hangs on `busy`, every pick avoids it.
            assert busy.calls <= 1
            assert idle.calls == 10 - busy.calls
            busy.release_all()
            assert codes(settle_all(held)) == [OK] * len(held)


def test_ring_hash_on_a_header_keeps_each_key_on_one_host() -> None:
    cluster = {"load_balancing": {"policy": "ring_hash", "hash_on": "header", "hash_key": "x-user"}}
    with (
        upstreams("a", "b", "c") as servers,
        proxied(mesh([s.address for s in servers], cluster=cluster)) as (_, channel),
    ):
        homes: dict[str, set[bytes | None]] = {}
        for user in range(30):
            for _ in range(3):
                reply = call(channel, metadata=[("x-user", f"user-{user}")])
                assert reply.code is OK
                homes.setdefault(f"user-{user}", set()).add(reply.body)

        assert all(len(hosts) == 1 for hosts in homes.values()), homes
        used = set().union(*homes.values())
        assert len(used) >= 2, "30 keys all hashed to one host"


def test_weighted_round_robin_honours_weights() -> None:
    with upstreams("heavy", "light") as (heavy, light):
        endpoints: list[str | dict[str, Any]] = [
            {"address": heavy.address, "weight": 3},
            {"address": light.address},
        ]
        cluster = {"load_balancing": {"policy": "weighted_round_robin"}}
        with proxied(mesh(endpoints, cluster=cluster)) as (_, channel):
            replies = [call(channel) for _ in range(40)]

            assert by_upstream(replies) == {"heavy": 30, "light": 10}


# --- local rate limit ---------------------------------------------------------------------------


def test_rate_limit_per_caller_buckets() -> None:
    limit = {"max_tokens": 5, "fill_interval": "3s", "per_caller": {"header": "x-caller"}}
    with (
        upstreams("a") as (a,),
        proxied(mesh([a.address], route={"rate_limit": limit})) as (sc, channel),
    ):
        # A caller's bucket starts full at its first request and refills 3 s later: ten quick
        # calls see five tokens. 20 calls take well under a second, but several on a loaded
        # machine: the interval leaves room, and the check says whether a refill fell inside.
        started = time.monotonic()
        alice = [call(channel, metadata=[("x-caller", "alice")]) for _ in range(10)]
        bob = [call(channel, metadata=[("x-caller", "bob")]) for _ in range(10)]
        assert time.monotonic() - started < 2.7

        for replies in (alice, bob):
            assert codes(replies) == [OK] * 5 + [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5
            for denied in replies[5:]:
                assert denied.flags == "RL"
                pushback = int(denied.metadata["grpc-retry-pushback-ms"])
                assert 0 < pushback <= 3000
        assert a.calls == 10
        assert sc.stat("http.ingress.downstream_rq_rate_limited") == 10

        # Back when the last refusal said to come back, not before.
        time.sleep(int(alice[-1].metadata["grpc-retry-pushback-ms"]) / 1000)
        assert call(channel, metadata=[("x-caller", "alice")]).code is OK


# --- adaptive throttling (load shedding: test_protection_e2e.py) ----------------------------------


def test_adaptive_throttling_rejects_locally_when_the_upstream_fails_everything() -> None:
    throttling = {"enabled": True, "window": "10s", "buckets": 10, "min_requests": 5}
    cluster = {"adaptive_throttling": throttling}
    no_retry = {"retry": {"attempts": 0}}  # one try per call, for the arithmetic below
    with (
        upstreams("a") as (a,),
        proxied(mesh([a.address], cluster=cluster, route=no_retry)) as (sc, channel),
    ):
        a.always(Behaviour(Act.FAIL))

        replies = [call(channel) for _ in range(40)]

        assert codes(replies) == [UNAVAILABLE] * 40
        throttled = [r for r in replies if r.flags == "AT"]
        # Nothing is thrown before min_requests; then p = n / (n + 1) with no accepts, at most 0.8.
        assert all(r.flags is None for r in replies[:5])
        assert len(throttled) >= 20
        assert a.calls == 40 - len(throttled)
        assert sc.stat("cluster.app.upstream_rq_throttled") == len(throttled)


def test_adaptive_throttling_leaves_a_healthy_upstream_alone() -> None:
    throttling = {"enabled": True, "window": "10s", "buckets": 10, "min_requests": 5}
    cluster = {"adaptive_throttling": throttling}
    with upstreams("a") as (a,), proxied(mesh([a.address], cluster=cluster)) as (sc, channel):
        replies = [call(channel) for _ in range(30)]

        assert codes(replies) == [OK] * 30
        assert sc.stat("cluster.app.upstream_rq_throttled") == 0


# --- fallbacks ----------------------------------------------------------------------------------


def test_static_fallback_answers_when_the_only_host_is_dead() -> None:
    fallback = {"response": {"grpc_status": "failed-precondition", "grpc_message": "degraded mode"}}
    with closed_port() as dead, proxied(mesh([dead], route={"fallback": fallback})) as (sc, ch):
        reply = call(ch)

        assert reply.code is grpc.StatusCode.FAILED_PRECONDITION
        assert reply.details == "degraded mode"
        assert reply.flags == "FB"
        assert sc.stat("http.ingress.downstream_rq_fallback") == 1
        assert sc.stat("cluster.app.upstream_cx_connect_fail") >= 1


def _with_backup(config: dict[str, Any], backup: FlakyUpstream) -> dict[str, Any]:
    config["clusters"].append({"name": "backup", "endpoints": [backup.address]})
    return config


def test_fallback_cluster_serves_when_the_primary_host_is_dead() -> None:
    with upstreams("backup") as (backup,), closed_port() as dead:
        config = _with_backup(mesh([dead], route={"fallback": {"cluster": "backup"}}), backup)
        with proxied(config) as (sc, channel):
            reply = call(channel)

            assert reply.code is OK and reply.body == b"backup"
            assert reply.flags == "FB"
            assert sc.stat("http.ingress.downstream_rq_fallback") == 1
            assert sc.stat("cluster.backup.upstream_rq_total") == 1


def test_fallback_cluster_serves_when_the_primary_breaker_is_open() -> None:
    with upstreams("primary", "backup") as (primary, backup):
        primary.always(Behaviour(Act.HANG))
        config = mesh(
            [primary.address],
            route={"fallback": {"cluster": "backup"}},
            cluster={"circuit_breakers": {"max_requests": 1}},
        )
        with proxied(_with_backup(config, backup)) as (sc, channel):
            held = start_calls(channel, 1)
            assert wait_for(lambda: primary.in_flight == 1, 3)

            reply = call(channel)

            primary.release_all()
            settle_all(held)
            assert reply.code is OK and reply.body == b"backup"
            assert reply.flags == "FB"
            assert sc.stat("http.ingress.downstream_rq_fallback") == 1


def test_fallback_cluster_serves_when_the_primary_has_no_healthy_host() -> None:
    with upstreams("primary", "backup") as (primary, backup):
        primary.serving(False)
        config = mesh(
            [primary.address],
            route={"fallback": {"cluster": "backup"}},
            cluster={
                "health_check": GRPC_HEALTH,
                "load_balancing": {"panic_threshold": 0},
            },
        )
        with proxied(_with_backup(config, backup)) as (sc, channel):
            # Not healthy until a check passes (initially_healthy: false), and none will.
            time.sleep(0.3)
            assert sc.stat("cluster.app.membership_healthy") == 0
            assert health_flags(sc, primary.address) == "/failed_active_hc"

            reply = call(channel)

            assert primary.calls == 0
            assert reply.code is OK and reply.body == b"backup"
            assert reply.flags == "FB"


# --- fault injection ----------------------------------------------------------------------------


def test_fault_abort_hits_only_requests_with_the_fault_header() -> None:
    fault = {
        "header": {"name": FAULT_HEADER, "exact": "on"},
        "abort": {"grpc_status": "unavailable", "percentage": 100},
    }
    with upstreams("a") as (a,), proxied(mesh([a.address], route={"fault": fault})) as (_, ch):
        aimed = [call(ch, metadata=[(FAULT_HEADER, "on")]) for _ in range(5)]
        others = [call(ch) for _ in range(5)] + [call(ch, metadata=[(FAULT_HEADER, "off")])]

        assert codes(aimed) == [UNAVAILABLE] * 5
        assert all(r.flags == "FI" for r in aimed)
        assert codes(others) == [OK] * 6
        assert a.calls == 6


def test_fault_delay_holds_the_request_at_least_its_duration() -> None:
    fault = {"delay": {"duration": "200ms"}}
    with upstreams("a") as (a,), proxied(mesh([a.address], route={"fault": fault})) as (_, ch):
        call(ch)  # warm the upstream connection: what is timed is the delay
        reply = call(ch)

        assert reply.code is OK
        assert reply.elapsed >= 0.2
        assert a.calls == 2


def test_fault_delayed_requests_still_count_as_upstream_responses() -> None:
    fault = {"delay": {"duration": "50ms"}}
    with upstreams("a") as (a,), proxied(mesh([a.address], route={"fault": fault})) as (sc, ch):
        assert codes([call(ch), call(ch)]) == [OK, OK]
        assert a.calls == 2

        assert sc.stat("cluster.app.upstream_rq_2xx") == 2


# --- chaos --------------------------------------------------------------------------------------


@dataclass
class Load:
    """One caller making calls back to back until stopped (bounded by ``limit``)."""

    channel: grpc.Channel
    limit: int = 2000
    replies: list[Reply] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.replies) < self.limit:
            self.replies.append(call(self.channel, timeout=2.0))
            time.sleep(0.002)

    def errors(self) -> list[Reply]:
        return [r for r in list(self.replies) if r.code is not OK]


def test_chaos_a_host_dies_under_load_is_ejected_and_rejoins() -> None:
    cluster = {"outlier_detection": OUTLIER}
    with upstreams("a", "b", "c") as servers:
        a, b, c = servers
        config = mesh([s.address for s in servers], route={"retry": RETRY_ALL}, cluster=cluster)
        with proxied(config) as (sc, channel), Load(channel) as load:
            assert wait_for(lambda: c.calls >= 5, 5)

            c.die()
            assert wait_for(
                lambda: sc.stat("cluster.app.outlier_detection.ejections_enforced_total") >= 1, 5
            )
            assert health_flags(sc, c.address) == "/failed_outlier_check"
            assert sc.stat("cluster.app.membership_healthy") == 2
            during = len(load.replies)
            assert wait_for(lambda: len(load.replies) >= during + 50, 5)

            c.restart()
            back_from = c.calls
            assert wait_for(lambda: c.calls >= back_from + 5, 8), "c never rejoined"
            assert wait_for(lambda: sc.stat("cluster.app.membership_healthy") == 3, 3)
            load.stop()

            # Connect failures and resets of the dead host were retried on the others.
            assert len(load.errors()) <= 2, load.errors()
            assert a.calls > 0 and b.calls > 0
            assert sc.stat("cluster.app.upstream_rq_retry") >= 1
