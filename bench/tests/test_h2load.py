"""h2load output parsing, on text captured from nghttp2 1.52's h2load."""

from __future__ import annotations

import pytest

from bench.h2load import (
    H2loadOutputError,
    h2load_argv,
    parse_log_latencies_us,
    parse_summary,
)

TRAFFIC = (
    "traffic: 180.45KB (184776) total, 20.10KB (20584) headers (space savings 93.32%), "
    "125.00KB (128000) data"
)
SUMMARY = (
    f"""\
starting benchmark...
spawning thread #0: 8 total client(s). 2000 total requests
Application protocol: h2c
progress: 100% done

finished in 18.79ms, 106422.60 req/s, 9.38MB/s
requests: 2000 total, 2000 started, 2000 done, 1990 succeeded, 10 failed, 0 errored, 0 timeout
status codes: 1990 2xx, 0 3xx, 0 4xx, 10 5xx
{TRAFFIC}
                     min         max         mean         sd        +/- sd
time for request:      132us      1.96ms      1.05ms       304us    80.10%
"""
)


def test_summary_fields() -> None:
    s = parse_summary(SUMMARY)
    assert s.elapsed_s == pytest.approx(0.01879)
    assert (s.total, s.succeeded, s.failed, s.status_2xx) == (2000, 1990, 10, 1990)
    assert s.data_bytes == 128000
    assert s.requests_per_s == pytest.approx(1990 / 0.01879)


def test_non_2xx_is_a_problem_and_all_2xx_is_not() -> None:
    assert "10 of 2000" in (parse_summary(SUMMARY).problems or "")
    clean = SUMMARY.replace("1990 2xx, 0 3xx, 0 4xx, 10 5xx", "2000 2xx, 0 3xx, 0 4xx, 0 5xx")
    assert parse_summary(clean).problems is None


@pytest.mark.parametrize(("text", "seconds"), [("3.5s", 3.5), ("250us", 0.00025)])
def test_elapsed_units(text: str, seconds: float) -> None:
    assert parse_summary(SUMMARY.replace("18.79ms", text)).elapsed_s == pytest.approx(seconds)


def test_missing_line_names_it() -> None:
    with pytest.raises(H2loadOutputError, match="status codes"):
        parse_summary(SUMMARY.replace("status codes:", "codes:"))


def test_log_keeps_only_2xx_and_sorts() -> None:
    log = "1\t200\t30\n2\t-1\t5\n3\t503\t7\n4\t204\t10\n"
    assert parse_log_latencies_us(log) == [10.0, 30.0]


def test_argv_puts_url_last() -> None:
    argv = h2load_argv(url="http://127.0.0.1:1/x", requests="N", clients=2, streams=3)
    assert argv[-1] == "http://127.0.0.1:1/x"
    assert argv[argv.index("-n") + 1] == "N"


def test_fixed_rate_is_per_connection_and_optional() -> None:
    base = h2load_argv(url="http://127.0.0.1:1/x", requests="N", clients=2, streams=3)
    assert not any(a.startswith("--rps") for a in base)
    paced = h2load_argv(
        url="http://127.0.0.1:1/x", requests="N", clients=2, streams=3, rate_per_client=500
    )
    assert "--rps=500" in paced and paced[-1] == "http://127.0.0.1:1/x"
