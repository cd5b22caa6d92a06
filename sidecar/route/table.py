"""Route matching: a pure function of the request's authority, path, method and headers.

A ``RouteTable`` is compiled once per route config and swapped whole when config changes.
Virtual host selection follows Envoy: an exact domain wins, then the longest ``*.suffix``
wildcard, then the longest ``prefix*`` wildcard, then ``*``. Routes are tried in order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pilotfish.config.model import HeaderMutation, RouteConfig, RouteEntry, VirtualHost
from sidecar.route.plan import RoutePlan

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class RouteDecision:
    virtual_host: VirtualHost
    route: RouteEntry
    cluster: str
    plan: RoutePlan


def _strip_port(authority: str) -> str:
    if authority.startswith("["):  # [v6]:port
        end = authority.find("]")
        return authority[: end + 1] if end != -1 else authority
    host, sep, port = authority.rpartition(":")
    return host if sep and port.isdigit() else authority


# Authorities remembered per table; a client choosing its own authorities could grow the
# cache without bound, so it is emptied when full.
_HOST_CACHE_ENTRIES = 1024


class RouteTable:
    def __init__(self, config: RouteConfig) -> None:
        self.config = config
        self._exact: dict[str, VirtualHost] = {}
        self._suffix: list[tuple[str, VirtualHost]] = []
        self._prefix: list[tuple[str, VirtualHost]] = []
        self._default: VirtualHost | None = None
        for vhost in config.virtual_hosts:
            for domain in vhost.domains:
                if domain == "*":
                    self._default = self._default or vhost
                elif domain.startswith("*"):
                    self._suffix.append((domain[1:], vhost))
                elif domain.endswith("*"):
                    self._prefix.append((domain[:-1], vhost))
                else:
                    self._exact.setdefault(domain, vhost)
        self._suffix.sort(key=lambda item: -len(item[0]))
        self._prefix.sort(key=lambda item: -len(item[0]))
        # Per virtual host, its routes with their plans, and the decision made in advance where
        # it never varies (one cluster): most requests then allocate nothing to be routed.
        self._routes: dict[int, list[tuple[RouteEntry, RoutePlan, RouteDecision | None]]] = {
            id(vhost): [_planned(vhost, route) for route in vhost.routes]
            for vhost in config.virtual_hosts
        }
        self._hosts: dict[str, VirtualHost | None] = {}
        # Whether any route matches on headers: if none does, ``match`` never reads them.
        self.matches_headers = any(
            route.match.headers for vhost in config.virtual_hosts for route in vhost.routes
        )
        # Whether any route has its own JWT or authorization: an inbound listener with those
        # matches the route before its security filter only then.
        self.secured = any(
            route.security is not None for vhost in config.virtual_hosts for route in vhost.routes
        )

    def virtual_host(self, authority: str) -> VirtualHost | None:
        try:
            return self._hosts[authority]
        except KeyError:
            pass
        if len(self._hosts) >= _HOST_CACHE_ENTRIES:
            self._hosts.clear()
        found = self._hosts[authority] = self._find_virtual_host(authority.lower())
        return found

    def _find_virtual_host(self, authority: str) -> VirtualHost | None:
        for candidate in (authority, _strip_port(authority)):
            vhost = self._exact.get(candidate)
            if vhost is not None:
                return vhost
            for suffix, vhost in self._suffix:
                if candidate.endswith(suffix) and len(candidate) > len(suffix):
                    return vhost
            for prefix, vhost in self._prefix:
                if candidate.startswith(prefix) and len(candidate) > len(prefix):
                    return vhost
        return self._default

    def match(
        self,
        authority: str,
        path: str,
        method: str,
        headers: Mapping[str, str],
        rng: Callable[[], float] = random.random,
    ) -> RouteDecision | None:
        """Pick the virtual host, the first matching route and, for splits, the cluster."""
        vhost = self.virtual_host(authority)
        if vhost is None:
            return None
        bare_path = path.partition("?")[0] if "?" in path else path
        for route, plan, fixed in self._routes[id(vhost)]:
            m = route.match
            if not m.path.matches(bare_path):
                continue
            if m.methods and method not in m.methods:
                continue
            if m.headers and not all(h.matches(headers.get(h.name)) for h in m.headers):
                continue
            return fixed or RouteDecision(vhost, route, pick_weighted_cluster(route, rng), plan)
        return None


def _planned(
    vhost: VirtualHost, route: RouteEntry
) -> tuple[RouteEntry, RoutePlan, RouteDecision | None]:
    plan = RoutePlan(vhost, route)
    clusters = route.action.clusters
    fixed = RouteDecision(vhost, route, clusters[0].name, plan) if len(clusters) == 1 else None
    return route, plan, fixed


def pick_weighted_cluster(route: RouteEntry, rng: Callable[[], float]) -> str:
    clusters = route.action.clusters
    if len(clusters) == 1:
        return clusters[0].name
    point = rng() * route.action.total_weight
    for wc in clusters:
        point -= wc.weight
        if point < 0:
            return wc.name
    return clusters[-1].name


def apply_mutation(headers: Headers, mutation: HeaderMutation) -> Headers:
    """Return ``headers`` with the mutation's removals and additions applied."""
    if mutation.empty:
        return headers
    replaced = {name.encode() for name, _, append in mutation.add if not append}
    drop = {name.encode() for name in mutation.remove} | replaced
    out = [(k, v) for k, v in headers if k not in drop] if drop else list(headers)
    out.extend((name.encode(), value.encode()) for name, value, _ in mutation.add)
    return out


class LazyHeaderMap(Mapping[str, str]):
    """A str view of a header list, decoded only for the names a matcher asks for."""

    __slots__ = ("_headers",)

    def __init__(self, headers: Headers) -> None:
        self._headers = headers

    def __getitem__(self, name: str) -> str:
        key = name.encode()
        values = [v.decode("latin-1") for k, v in self._headers if k == key]
        if not values:
            raise KeyError(name)
        return ",".join(values)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(dict.fromkeys(k.decode("latin-1") for k, _ in self._headers))

    def __len__(self) -> int:
        return len({k for k, _ in self._headers})
