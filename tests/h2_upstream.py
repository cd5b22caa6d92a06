"""A controllable HTTP/2 upstream for tests, built directly on the h2 library.

Behaviour is chosen by path:
  /echo          200 with a JSON description of the request (headers, body size and digest)
  /status/NNN    that status, empty body
  /big/N         N bytes of body
  /slow/MS       200 after MS milliseconds
  /goaway-once   the first time: GOAWAY that leaves this stream unprocessed, no response
  /refuse-once   the first time: RST_STREAM(REFUSED_STREAM); later: 200
  /reset         RST_STREAM(INTERNAL_ERROR) before any response
  /reset-mid     response headers and some body, then RST_STREAM(INTERNAL_ERROR)
  /hang          never answers
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings


class _Conn(asyncio.Protocol):
    def __init__(self, server: H2Upstream) -> None:
        self.server = server
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, dict[str, Any]] = {}
        self.active = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections += 1
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.server.max_concurrent_streams
            },
        )
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> None:
        if self.transport is not None:
            self.transport.write(self.h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.active += 1
                self.server.max_seen_concurrency = max(
                    self.server.max_seen_concurrency, self.active
                )
                self.requests[event.stream_id] = {
                    "headers": dict(event.headers),
                    "body": bytearray(),
                    "trailers": {},
                }
                if event.stream_ended:
                    self.respond(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                req = self.requests.get(event.stream_id)
                if req is not None:
                    req["body"] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_ended and req is not None:
                    self.respond(event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                req = self.requests.get(event.stream_id)
                if req is not None:
                    req["trailers"] = dict(event.headers)
                    self.respond(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.server.resets_seen.append(event.stream_id)
                self.done(event.stream_id)
        self.flush()

    def done(self, stream_id: int) -> None:
        if self.requests.pop(stream_id, None) is not None:
            self.active -= 1

    def respond(self, sid: int) -> None:
        req = self.requests[sid]
        path: str = req["headers"].get(":path", "/")
        self.server.paths_seen.append(path)
        if path == "/echo" or path.startswith("/echo?"):
            body = json.dumps(
                {
                    "headers": req["headers"],
                    "body_len": len(req["body"]),
                    "body_sha256": hashlib.sha256(req["body"]).hexdigest(),
                    "trailers": req["trailers"],
                }
            ).encode()
            self._reply(sid, 200, body, trailers="x-want-trailers" in req["headers"])
        elif path.startswith("/status/"):
            self._reply(sid, int(path.split("/")[2]), b"")
        elif path.startswith("/big/"):
            self._reply(sid, 200, b"x" * int(path.split("/")[2]))
        elif path.startswith("/slow/"):
            loop = asyncio.get_event_loop()
            loop.call_later(int(path.split("/")[2]) / 1000, self._reply_and_flush, sid, 200, b"ok")
        elif path == "/goaway-once" and not self.server.goaway_sent:
            self.server.goaway_sent = True
            self.h2.close_connection(last_stream_id=max(sid - 2, 0))
        elif path == "/refuse-once" and not self.server.refused:
            self.server.refused = True
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            self.done(sid)
        elif path == "/reset":
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.done(sid)
        elif path == "/reset-mid":
            self.h2.send_headers(sid, [(":status", "200")])
            self.h2.send_data(sid, b"partial")
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.done(sid)
        elif path == "/hang":
            pass
        else:
            self._reply(sid, 200, b"ok")

    def _reply_and_flush(self, sid: int, status: int, body: bytes) -> None:
        if sid in self.requests:
            self._reply(sid, status, body)
            self.flush()

    def _reply(self, sid: int, status: int, body: bytes, trailers: bool = False) -> None:
        headers = [(":status", str(status)), ("content-length", str(len(body)))]
        if trailers:
            headers.pop()
        self.h2.send_headers(sid, headers, end_stream=not body and not trailers)
        # Send in chunks that respect the flow-control window; this server is for small tests.
        offset = 0
        while offset < len(body):
            window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if window <= 0:
                break
            chunk = body[offset : offset + window]
            offset += len(chunk)
            end = offset >= len(body) and not trailers
            self.h2.send_data(sid, chunk, end_stream=end)
        if trailers:
            self.h2.send_headers(sid, [("x-trailer", "done")], end_stream=True)
        self.done(sid)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections_closed += 1


class H2Upstream:
    """Runs in its own thread with its own loop; ``address`` is ready after construction."""

    def __init__(self, max_concurrent_streams: int = 100) -> None:
        self.max_concurrent_streams = max_concurrent_streams
        self.connections = 0
        self.connections_closed = 0
        self.max_seen_concurrency = 0
        self.paths_seen: list[str] = []
        self.resets_seen: list[int] = []
        self.goaway_sent = False
        self.refused = False
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            self.loop.create_server(lambda: _Conn(self), "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.server = server
        self._started.set()
        self.loop.run_forever()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
