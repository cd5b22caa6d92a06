"""A route's plan: what every request of the route does, decided once per route config.

In: a route and its virtual host, when a route table is compiled. Out: the ``RoutePlan`` the
exchange reads per request, so the common request does no per-route work of its own: the
header mutations of the virtual host and the route merged into one set of names to drop and
one list to append (already bytes), the timeouts and the header that tells the upstream its
budget when the whole timeout is left, and which policy stages the route needs at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import compress
from operator import itemgetter, not_

from pilotfish.config.model import HeaderMutation, RouteEntry, VirtualHost
from sidecar.observability.propagation import TRACE_HEADERS
from sidecar.route.policy.deadline import upstream_budget_header

Header = tuple[bytes, bytes]
_NAME = itemgetter(0)

# Never passed upstream as the caller sent them: the exchange writes its own.
STRIPPED_UPSTREAM = frozenset({b"grpc-timeout", b"x-pilotfish-attempt-count"})


class HeaderEdit:
    """Header mutations applied in order, merged into one pass: drop names, then append."""

    __slots__ = ("add", "drop", "empty")

    def __init__(self, *mutations: HeaderMutation, drop: frozenset[bytes] = frozenset()) -> None:
        dropped = set(drop)
        add: list[Header] = []
        for mutation in mutations:
            names = {n.encode() for n in mutation.remove}
            names |= {name.encode() for name, _, append in mutation.add if not append}
            # A later mutation's removals apply to what an earlier one added.
            add = [h for h in add if h[0] not in names]
            dropped |= names
            add.extend((name.encode(), value.encode()) for name, value, _ in mutation.add)
        self.drop = frozenset(dropped)
        self.add = tuple(add)
        self.empty = not self.drop and not self.add

    def apply(self, headers: list[Header], names: Iterable[bytes] | None = None) -> list[Header]:
        """A new list: ``headers`` without the dropped names, then the additions. ``names``:
        the names in ``headers`` (a dict of them), when the caller has it: most requests
        carry none of the names to drop, and then need no pass over their headers here."""
        drop = self.drop
        if drop and (names is None or not drop.isdisjoint(names)):
            # [h for h in headers if h[0] not in drop], without a Python step per header.
            out = list(compress(headers, map(not_, map(drop.__contains__, map(_NAME, headers)))))
        else:
            out = list(headers)
        if self.add:
            out.extend(self.add)
        return out


class RoutePlan:
    """Baked per route. ``policies``: the route has a rate limit, fault, fallback or bulkhead,
    so the exchange asks the sidecar for the route's live policy state; without, it never does.
    ``rewrite``: the path or authority is rewritten (the slow way, per request)."""

    __slots__ = (
        "budget_grpc", "budget_http", "name", "per_try_timeout", "policies", "request",
        "request_traced", "response", "retry", "rewrite", "timeout",
    )  # fmt: skip

    def __init__(self, vhost: VirtualHost, route: RouteEntry) -> None:
        self.name = route.name
        action = route.action
        policy = route.policy
        self.timeout = action.timeout or None
        self.retry = policy.retry
        self.per_try_timeout = policy.retry.per_try_timeout or None
        self.policies = (
            policy.rate_limit is not None
            or policy.fault is not None
            or policy.fallback is not None
            or policy.max_concurrent_requests is not None
        )
        self.rewrite = action.prefix_rewrite is not None or action.host_rewrite is not None
        mutations = (vhost.request_headers, route.request_headers)
        self.request = HeaderEdit(*mutations, drop=STRIPPED_UPSTREAM)
        # When the tracer writes its own trace context, the caller's goes (as Envoy does).
        self.request_traced = HeaderEdit(*mutations, drop=STRIPPED_UPSTREAM | TRACE_HEADERS)
        # Route first, then virtual host, as Envoy applies response mutations.
        response = HeaderEdit(route.response_headers, vhost.response_headers)
        self.response: HeaderEdit | None = None if response.empty else response
        # The budget header of a try that starts with the whole timeout left (the first try of
        # a request that ended with its headers: nearly all of them).
        timeout, per_try = self.timeout, self.per_try_timeout
        self.budget_http = upstream_budget_header(timeout, 0.0, per_try, grpc=False)
        self.budget_grpc = upstream_budget_header(timeout, 0.0, per_try, grpc=True)
