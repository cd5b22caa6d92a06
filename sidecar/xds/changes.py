"""What a new config changes, in one log line: listeners, routes, clusters and endpoints added,
removed or changed, by name. Pure: two ``Bootstrap`` values in, text out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from pilotfish.config.model import Bootstrap

SHOWN = 5  # names per list; the rest are counted


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _section(kind: str, before: Mapping[str, object], after: Mapping[str, object]) -> str:
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    changed = sorted(k for k in after.keys() & before.keys() if after[k] != before[k])
    parts = [
        f"{label} {_names(names)}"
        for label, names in (("added", added), ("removed", removed), ("changed", changed))
        if names
    ]
    return f"{kind}: {'; '.join(parts)}" if parts else ""


def _endpoints(before: Bootstrap, after: Bootstrap) -> str:
    """Per cluster present in both, the endpoint addresses that came and went."""
    moves = []
    for name in sorted(after.clusters.keys() & before.clusters.keys()):
        old = {e.address: e for e in before.clusters[name].endpoints}
        new = {e.address: e for e in after.clusters[name].endpoints}
        delta = [f"+{a}" for a in sorted(new.keys() - old.keys())]
        delta += [f"-{a}" for a in sorted(old.keys() - new.keys())]
        delta += [f"~{a}" for a in sorted(new.keys() & old.keys()) if new[a] != old[a]]
        if delta:
            more = " ..." if len(delta) > SHOWN else ""
            moves.append(f"{name} {' '.join(delta[:SHOWN])}{more}")
    return f"endpoints: {'; '.join(moves)}" if moves else ""


def describe_changes(before: Bootstrap, after: Bootstrap) -> str:
    """E.g. ``clusters: added quotes; endpoints: web +127.0.0.1:8081``, or ``no change``."""
    sections = [
        _section(
            "listeners",
            {li.name: li for li in before.listeners},
            {li.name: li for li in after.listeners},
        ),
        _section("routes", before.route_configs, after.route_configs),
        # A cluster whose endpoints alone changed is reported under endpoints.
        _section(
            "clusters",
            {n: replace(c, endpoints=()) for n, c in before.clusters.items()},
            {n: replace(c, endpoints=()) for n, c in after.clusters.items()},
        ),
        _endpoints(before, after),
        "telemetry changed" if before.telemetry != after.telemetry else "",
    ]
    return "; ".join(s for s in sections if s) or "no change"
