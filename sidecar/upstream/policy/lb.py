"""The interface every load balancer has, and the host bookkeeping they share. Pure.

The cluster gives a balancer its *eligible* hosts (health checks, outlier ejection and panic
mode already applied, see ``eligibility``) with ``set_hosts`` whenever that set changes, and
asks ``choose`` per attempt. ``choose`` returns a host's ``index`` (its position in the
cluster's host list), skipping the indices in ``exclude`` (the hosts a retry already tried)
unless no other host is left, and ``None`` only when there is no eligible host at all.

Per-host state (active requests, latency) is kept by host ``key`` (its address), so it
survives ``set_hosts`` while the host stays.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol


def _no_value(name: str) -> str | None:
    return None


@dataclass(frozen=True, slots=True)
class LbContext:
    """What a hashing balancer may hash; lookups take a lower-case header or a cookie name."""

    source_ip: str = ""
    source_port: int = 0
    header: Callable[[str], str | None] = _no_value
    cookie: Callable[[str], str | None] = _no_value


NO_CONTEXT = LbContext()


@dataclass(frozen=True, slots=True)
class LbHost:
    index: int
    key: str
    weight: int = 1


class LoadBalancer(Protocol):
    def set_hosts(self, hosts: Sequence[LbHost]) -> None: ...

    def choose(self, ctx: LbContext, exclude: Collection[int] = ()) -> int | None: ...

    def on_request_start(self, index: int) -> None: ...

    def on_request_end(self, index: int, latency_s: float, ok: bool) -> None: ...


class BalancerBase:
    """Host bookkeeping shared by all balancers; the request hooks do nothing by default."""

    tracks_requests = False
    """Whether ``on_request_start``/``on_request_end`` do anything (a subclass that overrides
    them says True), so callers can skip them per request."""

    def __init__(self) -> None:
        self.hosts: list[LbHost] = []
        self._key_of: dict[int, str] = {}

    def set_hosts(self, hosts: Sequence[LbHost]) -> None:
        self.hosts = list(hosts)
        # Ends of requests started before a change must still find their host.
        self._key_of.update((h.index, h.key) for h in self.hosts)
        self._hosts_changed()

    def _hosts_changed(self) -> None:
        pass

    def _candidates(self, exclude: Collection[int]) -> list[LbHost]:
        if exclude:
            left = [h for h in self.hosts if h.index not in exclude]
            if left:
                return left
        return self.hosts

    def on_request_start(self, index: int) -> None:
        pass

    def on_request_end(self, index: int, latency_s: float, ok: bool) -> None:
        pass
