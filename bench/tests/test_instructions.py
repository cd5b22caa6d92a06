"""The callgrind summary line that bench.instructions reads."""

from __future__ import annotations

from bench.instructions import _TOTALS, copying


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


def test_copying_counts_the_copy_functions_own_cost_only() -> None:
    # memcpy's own lines count (10 + 5, the second time under its compressed name); the cost
    # of a call (main calling memcpy: 15) is inclusive and does not count again, nor does main.
    dump = (
        "events: Ir\n"
        "fn=(1) main\n3 100\ncfn=(2) __memcpy_avx_unaligned_erms\ncalls=1 0\n3 15\n"
        "fn=(2)\n0 10\n+1 5\n"
        "fn=(3) __memmove_avx_unaligned_erms\n0 7\n"
        "fn=(1)\n4 1\n"
    )
    assert copying(dump) == 22
