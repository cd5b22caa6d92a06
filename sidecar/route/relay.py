"""The response relay: a try's response, judged and passed downstream.

A response that may be a failure (a 5xx, a gRPC error status, a peer sidecar's reply) is judged
before any of it goes downstream, so that a retry can still replace it; one that succeeds goes
straight through with the route's response header edits.
"""

from __future__ import annotations

from sidecar.flags import RESPONSE_FLAGS_HEADER, ResponseFlag
from sidecar.http.streams import CANCEL, Headers
from sidecar.route.attempt import Attempt
from sidecar.route.policy.deadline import TimerKind
from sidecar.route.policy.retry import Outcome, response_outcome
from sidecar.route.retrying import from_idle_peer, header, response_failure
from sidecar.route.state import ExchangeState

__all__ = ["ResponseRelay"]

# Counter names by status class (status // 100, 1 to 9: statuses are three digits), and by
# status for the statuses that occur (one lookup instead of arithmetic per request).
_UPSTREAM_CLASS = tuple(f"upstream_rq_{n}xx" for n in range(10))
_UPSTREAM_BY_STATUS = {n: _UPSTREAM_CLASS[n // 100] for n in range(100, 600)}
_STATUS_CODES = {b"%d" % n: n for n in range(100, 600)}


class ResponseRelay(ExchangeState):
    """A try's response: judged when it may be a failure, then relayed downstream."""

    def response_headers(self, attempt: Attempt, headers: Headers, end_stream: bool) -> None:
        if self.done:
            return
        name, status_text = headers[0] if headers else (b"", b"")
        if name != b":status":
            status_text = header(headers, b":status") or b""
        status = _STATUS_CODES.get(status_text)
        if status is None:
            status = int(status_text) if status_text.isdigit() else 0
        if status < 200:
            return  # 1xx: interim
        attempt.status = attempt.http_status = status
        cluster = self.cluster
        assert cluster is not None
        # Answers that succeed with headers to be followed by a body pay for none of this.
        if (
            (end_stream or status >= 404 or cluster.resilience.throttle is not None)
            and self._judge_response(attempt, headers, end_stream, status)
        ):  # fmt: skip
            return
        counter = _UPSTREAM_BY_STATUS.get(status) or _UPSTREAM_CLASS[min(status // 100, 9)]
        cluster.scope.counters[counter] += 1
        self._forward_headers(headers, end_stream, status)

    def _judge_response(
        self, attempt: Attempt, headers: Headers, end_stream: bool, status: int
    ) -> bool:
        """A response that may be a failure (a 5xx, a gRPC status, a peer sidecar's reply), or
        one the cluster's throttle counts: True when it is not passed on (retried, or one of our
        own deadlines)."""
        assert self.cluster is not None
        grpc_status = header(headers, b"grpc-status") if end_stream else None
        if grpc_status is not None and grpc_status.isdigit():
            attempt.grpc_status = self.grpc_status = int(grpc_status)
            if grpc_status != b"0":
                attempt.status = _grpc_as_http(int(grpc_status))
        outcome = None
        if (
            status >= 500
            or (grpc_status is not None and grpc_status != b"0")
            or (status == 404 and from_idle_peer(headers))
        ):
            # A failure: decide here whether another try may replace it.
            outcome = self._failure_outcome(attempt, headers, status, grpc_status)
            if outcome is None or self._retry_response(attempt, outcome):
                return True
        throttle = self.cluster.resilience.throttle
        if throttle is not None and (not self.grpc or end_stream):
            # A gRPC answer is judged by its trailers; anything else by its status here.
            throttle.record(
                (
                    outcome or response_outcome(status, grpc=self.grpc, grpc_status=grpc_status)
                ).accepted
            )
        return False

    def _failure_outcome(
        self, attempt: Attempt, headers: Headers, status: int, grpc_status: bytes | None
    ) -> Outcome | None:
        """What a failed response amounts to for the retry decision; None: it was one of our
        own deadlines, and that is handled (answered or retried) already."""
        if grpc_status == b"4" and self.grpc:
            kind = self._ours_timed_out(attempt)
            if kind is TimerKind.DEADLINE:
                self._on_deadline()
                return None
            if kind is TimerKind.PER_TRY:
                if attempt.timer is not None:
                    attempt.timer.cancel()
                self._per_try_timeout(attempt, grpc_status=4)
                return None
        return response_failure(
            headers, status, grpc_status, grpc=self.grpc, replayable=self._replayable()
        )

    def _retry_response(self, attempt: Attempt, outcome: Outcome) -> bool:
        """Drop this response for another try when the retry policy says so."""
        if not self._maybe_retry(attempt, outcome):
            return False
        self._cancel_attempt(CANCEL)
        return True

    def _forward_headers(self, headers: Headers, end_stream: bool, status: int) -> None:
        self.response_started = True
        self.status = status
        plan = self.plan
        if plan is not None and plan.response is not None:
            headers = plan.response.apply(headers)
        if self.in_fallback:
            headers.append((RESPONSE_FLAGS_HEADER, b"FB"))
            self.flags += ("FB",)
        self.downstream.send_headers(headers, end_stream)
        if end_stream:
            self._complete()

    def response_data(self, attempt: Attempt, data: bytes, flow_len: int, end: bool) -> None:
        if self.done:
            if attempt.stream is not None:
                attempt.stream.ack(flow_len)
            return
        upstream = attempt.stream
        assert upstream is not None
        self.bytes_out += len(data)
        self.downstream.send_data(data, end, (lambda: upstream.ack(flow_len)) if flow_len else None)
        if end:
            self._complete()

    def response_trailers(self, attempt: Attempt, trailers: Headers) -> None:
        if self.done:
            return
        # gRPC servers put grpc-status first: no scan for it then.
        name, value = trailers[0] if trailers else (b"", b"")
        grpc_status = value if name == b"grpc-status" else header(trailers, b"grpc-status")
        code = _GRPC_CODES.get(grpc_status) if grpc_status is not None else None
        if code is None and grpc_status is not None and grpc_status.isdigit():
            code = int(grpc_status)
        if code is not None:
            attempt.grpc_status = self.grpc_status = code
            if code:
                attempt.status = _GRPC_AS_HTTP.get(code, 200)
                if code == 4 and self._ours_timed_out(attempt) is not None:
                    # Too late to answer ourselves (the headers are out): flag the trailers.
                    self.flags += (ResponseFlag.UPSTREAM_TIMEOUT.code,)
                    trailers = [*trailers, (RESPONSE_FLAGS_HEADER, b"UT")]
            cluster = self.cluster
            if cluster is not None and cluster.resilience.throttle is not None:
                cluster.resilience.throttle.record(Outcome(grpc_status=code).accepted)
        self.downstream.send_trailers(trailers)
        self._complete()


# The grpc-status values of the gRPC codes, as they arrive (one lookup for the usual ones).
_GRPC_CODES = {b"%d" % n: n for n in range(17)}
# How a gRPC error counts for outlier detection: as the HTTP status it maps to (else 200).
_GRPC_AS_HTTP = {14: 503, 4: 504, 8: 429, 12: 501, 13: 500, 2: 500}


def _grpc_as_http(grpc_status: int) -> int:
    return _GRPC_AS_HTTP.get(grpc_status, 200)
