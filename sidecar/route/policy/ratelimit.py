"""Local rate limit: a token bucket per route, or one per caller, refilled in whole intervals.

A bucket holds at most ``max_tokens`` and gains ``tokens_per_fill`` at each tick of
``fill_interval`` (ticks are counted from the bucket's creation, so refill timing does not drift
with request arrival). A request takes one token or is denied with 429 / RESOURCE_EXHAUSTED and a
hint of when the next tick comes: ``retry-after`` (whole seconds, at least 1) and, for gRPC,
``grpc-retry-pushback-ms``, which gRPC clients with a retry policy obey.
Per-caller buckets live in a bounded LRU; a caller pushed out starts again with a full bucket.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from pilotfish.config.route_policy import RateLimitConfig
from sidecar.route.policy import Clock
from sidecar.route.policy.reply import LocalReply

HTTP_STATUS = 429
GRPC_STATUS = 8  # RESOURCE_EXHAUSTED
RESPONSE_FLAG_CODE = "RL"
"""Envoy's flag for a local rate limit (429, RESOURCE_EXHAUSTED), carried by the reply itself."""


@dataclass(frozen=True, slots=True)
class RateLimitDecision:
    allowed: bool
    retry_after: float = 0.0
    """Seconds until the bucket gains tokens again, when denied."""

    def local_reply(self, grpc: bool) -> LocalReply:
        """The 429 / RESOURCE_EXHAUSTED reply of a denied request, with its retry hints."""
        return LocalReply(
            http_status=HTTP_STATUS,
            grpc_status=GRPC_STATUS,
            message="local rate limit",
            flag_code=RESPONSE_FLAG_CODE,
            extra_headers=tuple(self.reply_headers(grpc)),
        )

    def reply_headers(self, grpc: bool) -> list[tuple[bytes, bytes]]:
        """Hint headers for the local reply of a denied request."""
        headers = [(b"retry-after", str(max(1, math.ceil(self.retry_after))).encode())]
        if grpc:
            millis = max(1, math.ceil(self.retry_after * 1000))
            headers.append((b"grpc-retry-pushback-ms", str(millis).encode()))
        return headers


ALLOWED = RateLimitDecision(True)


class TokenBucket:
    __slots__ = ("_interval", "_last_fill", "_max", "_per_fill", "tokens")

    def __init__(self, max_tokens: int, tokens_per_fill: int, fill_interval: float, now: float):
        self._max = max_tokens
        self._per_fill = tokens_per_fill
        self._interval = fill_interval
        self._last_fill = now
        self.tokens = max_tokens

    def _refill(self, now: float) -> None:
        ticks = math.floor((now - self._last_fill) / self._interval)
        if ticks > 0:
            self.tokens = min(self._max, self.tokens + ticks * self._per_fill)
            self._last_fill += ticks * self._interval

    def try_take(self, now: float) -> RateLimitDecision:
        self._refill(now)
        if self.tokens > 0:
            self.tokens -= 1
            return ALLOWED
        return RateLimitDecision(False, self._last_fill + self._interval - now)


class LocalRateLimiter:
    """The rate limit of one route. Build a new one when the route's config changes."""

    __slots__ = ("_callers", "_clock", "_route_bucket", "config")

    def __init__(self, config: RateLimitConfig, clock: Clock) -> None:
        self.config = config
        self._clock = clock
        self._route_bucket = self._new_bucket()
        self._callers: OrderedDict[str, TokenBucket] = OrderedDict()

    def _new_bucket(self) -> TokenBucket:
        c = self.config
        return TokenBucket(c.max_tokens, c.tokens_per_fill, c.fill_interval, self._clock())

    def caller_key(self, headers: Mapping[str, str], source_address: str | None) -> str | None:
        """Who the bucket is for: the configured header's value, the source address, or None
        (the route's shared bucket, also used by requests without the header)."""
        if self.config.per_caller_header is not None:
            return headers.get(self.config.per_caller_header)
        if self.config.per_source:
            return source_address
        return None

    def check(self, caller: str | None = None) -> RateLimitDecision:
        """Take a token for one request from ``caller``'s bucket (None: the route's)."""
        now = self._clock()
        if caller is None:
            return self._route_bucket.try_take(now)
        bucket = self._callers.get(caller)
        if bucket is None:
            bucket = self._callers[caller] = self._new_bucket()
            if len(self._callers) > self.config.max_callers:
                self._callers.popitem(last=False)
        else:
            self._callers.move_to_end(caller)
        return bucket.try_take(now)

    @property
    def tracked_callers(self) -> int:
        return len(self._callers)
