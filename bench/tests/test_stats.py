from __future__ import annotations

import pytest

from bench.stats import median_or_none, percentile


def test_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_median_skips_missing() -> None:
    assert median_or_none([None, 3.0, 1.0, 2.0]) == 2.0
    assert median_or_none([None]) is None
