"""Access logs: one JSON object per line per request, to stdout (default), a file, or nowhere.

Lines finished in one event-loop iteration are written together by one ``write`` scheduled with
``call_soon``, so a burst of requests costs one system call. The write itself is a plain
blocking write: to a file it lands in the page cache; to stdout it is as quick as whatever reads
the pipe (a container runtime drains it continuously). A reader that stops reading would stall
the loop, as it would for any stdout logging; use the file sink where that is a risk.

=============== ======================================================================
field           value
=============== ======================================================================
start_time      request start, RFC 3339 UTC with milliseconds
method          ``:method``
authority       ``:authority`` (or ``host``)
path            ``:path``, query included
protocol        ``HTTP/1.1``, ``HTTP/2``
status          response status; 0 when none was sent
grpc_status     numeric gRPC status, null for plain HTTP
duration_ms     start to end of the response, float milliseconds
bytes_in        request body bytes received
bytes_out       response body bytes sent
upstream_host   ``ip:port`` of the last attempt, null when none
attempts        upstream attempts made
response_flags  response flag code (``UF``, ``UT``…), null when the upstream answered
trace_id        32 hex digits, null when not traced
request_id      ``x-request-id``
listener        listener name
route           route name, null when none matched
cluster         cluster name, null when none
=============== ======================================================================
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from typing import BinaryIO, Literal

Sink = Literal["stdout", "file", "off"]


@dataclass(slots=True)
class AccessEntry:
    """What the router knows about a finished request (see the field table above)."""

    start_time: float  # time.time() at the request's start
    method: str
    authority: str
    path: str
    protocol: str
    status: int
    duration_ms: float
    grpc_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_host: str | None = None
    attempts: int = 0
    response_flags: str | None = None
    trace_id: str | None = None
    request_id: str | None = None
    listener: str | None = None
    route: str | None = None
    cluster: str | None = None


ALL_FIELDS = tuple(f.name for f in fields(AccessEntry))
DEFAULT_FIELDS = ALL_FIELDS[:15]  # all but listener, route and cluster


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    sink: Sink = "stdout"
    path: str = ""  # for the file sink
    fields: tuple[str, ...] = DEFAULT_FIELDS

    def __post_init__(self) -> None:
        if self.sink not in ("stdout", "file", "off"):
            raise ValueError(f"access_log.sink: {self.sink!r} is not stdout, file or off")
        if self.sink == "file" and not self.path:
            raise ValueError("access_log.path: the file sink needs a path")
        for i, name in enumerate(self.fields):
            if name not in ALL_FIELDS:
                known = ", ".join(ALL_FIELDS)
                raise ValueError(f"access_log.fields[{i}]: unknown field {name!r}; known: {known}")


class AccessLog:
    """Build with ``AccessLog(config)``; call ``log(entry)`` at the end of each request and
    ``close()`` at shutdown. Check ``enabled`` first to skip building the entry."""

    def __init__(self, config: AccessLogConfig, stream: BinaryIO | None = None) -> None:
        self.config = config
        self.enabled = config.sink != "off"
        self._fields = config.fields
        self._pending: list[bytes] = []
        self._scheduled = False
        self._owned = False
        self._stream: BinaryIO | None = None
        if stream is not None:
            self._stream = stream
        elif config.sink == "stdout":
            self._stream = sys.stdout.buffer
        elif config.sink == "file":
            self._stream = open(config.path, "ab")  # noqa: SIM115 - kept open until close()
            self._owned = True

    def format(self, entry: AccessEntry) -> bytes:
        record: dict[str, object] = {}
        for name in self._fields:
            value = getattr(entry, name)
            if name == "start_time":
                value = _rfc3339(value)
            elif name == "duration_ms":
                value = round(value, 3)
            record[name] = value
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"

    def log(self, entry: AccessEntry) -> None:
        if not self.enabled:
            return
        self._pending.append(self.format(entry))
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop (tools, tests): write now
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending or self._stream is None:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._stream.write(data)
        self._stream.flush()

    def reopen(self) -> None:
        """Reopen the file (after log rotation moved it away)."""
        if self._owned and self._stream is not None:
            self.flush()
            self._stream.close()
            self._stream = open(self.config.path, "ab")  # noqa: SIM115

    def close(self) -> None:
        self.flush()
        if self._owned and self._stream is not None:
            self._stream.close()
        self._stream = None
        self.enabled = False


_last_second: list[object] = [None, ""]


def _rfc3339(ts: float) -> str:
    """``2025-11-28T08:00:00.250Z`` (as ``datetime`` would round it); the date part is
    formatted once per second."""
    frac, whole = math.modf(ts)
    micros = round(frac * 1_000_000)
    second = int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    if _last_second[0] != second:
        _last_second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_last_second[1]}.{micros // 1000:03d}Z"
