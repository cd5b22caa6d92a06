"""Order statistics used by every workload, kept free of I/O so they are easy to check."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (``q`` in 0..100).

    Nearest-rank reports a latency that some request really had, which is what a reader of a
    p99 expects; interpolating between two samples would invent one.
    """
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def median_or_none(values: Iterable[float | None]) -> float | None:
    """Median of the values that exist; ``None`` when none do."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
