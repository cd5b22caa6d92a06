"""The hostile-client report: one row per probe and proxy, in probe order."""

from __future__ import annotations

from bench.hostile import PROBES, Row, table


def test_table_lists_rows_in_probe_order_then_by_proxy() -> None:
    names = list(PROBES)
    first, last = names[0], names[-1]
    rows = [
        Row("pilotfish", last, "900 of 1000 streams refused", 6.25, 215, 0, 18.4),
        Row("pilotfish", first, "GOAWAY ENHANCE_YOUR_CALM", 0.1, 26, 0, 47.1),
        Row("nghttpx", first, "GOAWAY INTERNAL_ERROR", 0.0, 28, 1, 49.9),
    ]
    lines = table(rows).splitlines()
    assert lines[2].startswith(f"| {first} | nghttpx | GOAWAY INTERNAL_ERROR | 0.0 MiB | 28 / 1 |")
    assert lines[3].startswith(f"| {first} | pilotfish |")
    assert (
        lines[4]
        == f"| {last} | pilotfish | 900 of 1000 streams refused | 6.2 MiB | 215 / 0 | 18.4 ms |"
    )
