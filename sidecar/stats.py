"""Counters and gauges kept by the sidecar, named as Envoy names them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable


class Scope:
    """A named group of counters and gauges, e.g. ``cluster.quotes``."""

    __slots__ = ("counters", "gauges", "prefix", "sources")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.counters: Counter[str] = Counter()
        self.gauges: Counter[str] = Counter()
        # Gauges computed when read (e.g. a breaker's remaining capacity), by owner.
        self.sources: dict[str, Callable[[], dict[str, int]]] = {}

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def gauge_add(self, name: str, delta: int) -> None:
        self.gauges[name] += delta


class StatsStore:
    def __init__(self) -> None:
        self.scopes: dict[str, Scope] = {}

    def scope(self, prefix: str) -> Scope:
        scope = self.scopes.get(prefix)
        if scope is None:
            scope = self.scopes[prefix] = Scope(prefix)
        return scope

    def snapshot(self) -> list[tuple[str, str, int]]:
        """``(kind, full name, value)`` for every stat, sorted by name."""
        rows: list[tuple[str, str, int]] = []
        for prefix, scope in self.scopes.items():
            rows.extend(("counter", f"{prefix}.{k}", v) for k, v in scope.counters.items())
            rows.extend(("gauge", f"{prefix}.{k}", v) for k, v in scope.gauges.items())
            for source in scope.sources.values():
                rows.extend(("gauge", f"{prefix}.{k}", v) for k, v in source().items())
        rows.sort(key=lambda r: r[1])
        return rows
