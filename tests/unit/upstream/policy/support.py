"""Helpers shared by the cluster policy tests: hosts, a fake clock, request contexts."""

from __future__ import annotations

from collections.abc import Sequence

from sidecar.upstream.policy.lb import LbContext, LbHost


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_hosts(count: int, weights: Sequence[int] | None = None) -> list[LbHost]:
    weights = weights or [1] * count
    return [LbHost(i, f"10.0.0.{i}:8080", weights[i]) for i in range(count)]


def client(n: int) -> LbContext:
    """The n-th distinct client, by source address."""
    return LbContext(source_ip=f"192.168.{n // 250}.{n % 250}", source_port=40000 + n % 20000)


def with_header(name: str, value: str | None) -> LbContext:
    return LbContext(header=lambda h: value if h == name else None)


def with_cookie(name: str, value: str | None) -> LbContext:
    return LbContext(cookie=lambda c: value if c == name else None)
