"""How ``pilotfish top`` shows its rows: a plain table, or JSON. Pure."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from pilotfish.top.core import ALL_ROUTES, Row

HEADER = ("DIRECTION", "SERVICE", "ROUTE", "SUCCESS", "RPS", "P50", "P99", "REQUESTS")


@dataclass(frozen=True, slots=True)
class Frame:
    """One refresh: the rows and what they came from."""

    rows: Sequence[Row]
    sidecars: Sequence[str]  # the sidecars scraped (node ids or admin addresses)
    unreachable: Sequence[tuple[str, str]]  # (sidecar, why)
    window: float  # seconds between the two scrapes
    clock: str  # wall-clock time of the later scrape, HH:MM:SS


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms"
    return f"{seconds:.2f}s"


def _success(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.2f}%"


def format_table(frame: Frame) -> str:
    head = (
        f"pilotfish top  {frame.clock}  {len(frame.sidecars)} "
        f"sidecar{'' if len(frame.sidecars) == 1 else 's'}, "
        f"last {frame.window:.1f} s"
    )
    lines = [head]
    for sidecar, why in frame.unreachable:
        lines.append(f"  unreachable: {sidecar}: {why}")
    lines.append("")
    cells: list[tuple[str, ...]] = [HEADER]
    for row in frame.rows:
        cells.append((
            row.direction,
            row.service,
            row.route if row.route == ALL_ROUTES else f"  {row.route or '-'}",
            _success(row.success_rate),
            f"{row.rps:.1f}",
            _latency(row.p50),
            _latency(row.p99),
            f"{row.requests:.0f}",
        ))
    if len(cells) == 1:
        lines.append("no requests in this window")
        return "\n".join(lines) + "\n"
    widths = [max(len(r[c]) for r in cells) for c in range(len(HEADER))]
    # Names left, numbers right, as a reader scans them.
    left = {0, 1, 2}
    for r in cells:
        lines.append(
            "  ".join(
                cell.ljust(w) if c in left else cell.rjust(w)
                for c, (cell, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
    return "\n".join(lines) + "\n"


def format_json(frame: Frame) -> str:
    """One JSON object on one line: a refresh per line when top keeps running."""
    return json.dumps(
        {
            "time": frame.clock,
            "window_s": round(frame.window, 3),
            "sidecars": list(frame.sidecars),
            "unreachable": [{"sidecar": s, "error": why} for s, why in frame.unreachable],
            "rows": [row.as_json() for row in frame.rows],
        },
        separators=(",", ":"),
    ) + "\n"
