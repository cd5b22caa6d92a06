"""Access log lines: JSON per request, configurable fields, batched writes, sinks."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from sidecar.observability.access_log import (
    ALL_FIELDS,
    DEFAULT_FIELDS,
    AccessEntry,
    AccessLog,
    AccessLogConfig,
)


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)


def entry(**overrides: object) -> AccessEntry:
    values: dict[str, object] = {
        "start_time": 1764316800.25,  # 2025-11-28T08:00:00.250Z
        "method": "POST",
        "authority": "quotes:8080",
        "path": "/quotes.v1.Quotes/Get",
        "protocol": "HTTP/2",
        "status": 200,
        "duration_ms": 12.34567,
        "grpc_status": 0,
        "bytes_in": 17,
        "bytes_out": 230,
        "upstream_host": "10.0.0.7:9000",
        "attempts": 2,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "request_id": "b3c1d2e4-0000-4000-8000-000000000001",
        "route": "quotes",
    }
    values.update(overrides)
    return AccessEntry(**values)  # type: ignore[arg-type]


def lines(stream: io.BytesIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_default_fields_one_json_line() -> None:
    out = CountingStream()
    log = AccessLog(AccessLogConfig(), stream=out)
    log.log(entry())
    log.log(entry(status=503, grpc_status=None, response_flags="UF", upstream_host=None))
    first, second = lines(out)
    assert list(first) == list(DEFAULT_FIELDS)
    assert first["start_time"] == "2025-11-28T08:00:00.250Z"
    assert first["duration_ms"] == 12.346
    assert first["grpc_status"] == 0 and first["attempts"] == 2
    assert first["response_flags"] is None
    assert second["response_flags"] == "UF" and second["upstream_host"] is None
    assert "route" not in first


def test_custom_fields_and_escaping() -> None:
    out = io.BytesIO()
    log = AccessLog(AccessLogConfig(fields=("path", "route", "status")), stream=out)
    log.log(entry(path='/a"b\n\u00e9'))
    assert lines(out) == [{"path": '/a"b\n\u00e9', "route": "quotes", "status": 200}]
    assert out.getvalue().count(b"\n") == 1


def test_lines_of_one_loop_iteration_share_one_write() -> None:
    out = CountingStream()
    log = AccessLog(AccessLogConfig(), stream=out)

    async def burst() -> int:
        for i in range(50):
            log.log(entry(status=200 + i))
        written_before_yield = out.writes
        await asyncio.sleep(0)
        return written_before_yield

    assert asyncio.run(burst()) == 0
    assert out.writes == 1
    assert [line["status"] for line in lines(out)] == list(range(200, 250))


def test_file_sink_off_sink_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(AccessLogConfig(sink="file", path=str(path)))
    log.log(entry())
    (tmp_path / "access.log").rename(tmp_path / "access.log.1")
    log.reopen()
    log.log(entry(status=404))
    log.close()
    assert json.loads(path.read_text())["status"] == 404
    assert json.loads((tmp_path / "access.log.1").read_text())["status"] == 200
    off = AccessLog(AccessLogConfig(sink="off"))
    assert not off.enabled
    off.log(entry())


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"access_log\.fields\[1\]: unknown field 'nope'"):
        AccessLogConfig(fields=("status", "nope"))
    with pytest.raises(ValueError, match=r"access_log\.sink"):
        AccessLogConfig(sink="syslog")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"access_log\.path"):
        AccessLogConfig(sink="file")
    assert set(DEFAULT_FIELDS) < set(ALL_FIELDS)


def test_start_time_matches_datetime_formatting() -> None:
    import random
    from datetime import UTC, datetime

    from sidecar.observability.access_log import _rfc3339

    rng = random.Random(7)
    for ts in [0.0, 1764316800.9999999, *(rng.uniform(0, 2e9) for _ in range(2000))]:
        expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
        assert _rfc3339(ts) == expected.replace("+00:00", "Z")
