"""The callgrind summary line that bench.instructions reads."""

from __future__ import annotations

from bench.instructions import _TOTALS


def test_totals_line_is_found_in_a_dump() -> None:
    dump = (
        "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\n\n"
        "fn=(1) main\n3 12\n\ntotals: 1234567\n"
    )
    match = _TOTALS.search(dump)
    assert match is not None and match.group(1) == "1234567"


def test_summary_line_counts_too() -> None:
    match = _TOTALS.search("events: Ir\nsummary: 42\n")
    assert match is not None and match.group(1) == "42"
