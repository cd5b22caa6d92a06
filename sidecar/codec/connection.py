"""``H2Codec``: one HTTP/2 connection, the subset of ``h2.connection.H2Connection`` we use.

What it keeps per stream is what the wire needs: both send windows, the receive window and
the bytes the application has taken but not yet returned to the peer, and which halves are
open. A stream leaves ``streams`` as soon as both halves are closed or it is reset, so
``streams.get(id)`` is None exactly when h2 would call the stream closed.

GOAWAY follows RFC 9113 section 6.8 as ``GracefulH2Connection`` does: receiving one is an
event, sending one closes nothing; the owner decides which streams to open or accept.

Errors: a connection error queues GOAWAY(code) and raises ``CodecProtocolError`` from
``receive_data``; after it the codec ignores input. A stream error (malformed headers,
trailers without END_STREAM, frames on a half-closed stream, refused streams) queues
RST_STREAM and, if the application knew the stream, yields a ``StreamReset``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol

from sidecar.codec import frames as f
from sidecar.codec.errors import (
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
    CodecProtocolError,
    CodecStreamClosedError,
    CodecUsageError,
    StreamError,
)
from sidecar.codec.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    Headers,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from sidecar.codec.headers import (
    REQUEST,
    RESPONSE,
    TRAILERS,
    CachingDecoder,
    CachingEncoder,
    validated,
)
from sidecar.codec.receive import (
    MAX_ANNOUNCED_FRAME,
    MAX_FRAMES_PER_TURN,
    FrameReceiver,
    thread_receive_buffer,
)

RESET_MEMORY = 4096  # how many streams we reset are remembered, to ignore their late frames
# DATA payloads from this size on go to the socket as they are (``writelines``), not copied
# into one joined block with the frames around them.
WRITEV_MIN = 4096


class Budget(Protocol):
    """The peer's allowance of work that carries no request (``sidecar.http.budget``)."""

    @property
    def clock(self) -> Callable[[], float]: ...

    def stream_reset(self, streams_completed: int, opened: float | None = None) -> bool: ...

    def control_frame(self, data_frames_sent: int, frames: int = 1) -> bool: ...


class Stream:
    __slots__ = (
        "closed",
        "headers_received",
        "inbound",
        "local_open",
        "opened",
        "processed",
        "recv_window",
        "remaining",
        "remote_open",
        "send_window",
        "stream_id",
    )

    def __init__(self, stream_id: int, send_window: int, recv_window: int, inbound: bool) -> None:
        self.stream_id = stream_id
        self.send_window = send_window
        self.recv_window = recv_window
        self.processed = 0  # bytes the application acknowledged that the peer has not got back
        self.inbound = inbound
        self.local_open = True
        self.remote_open = True
        self.headers_received = inbound
        self.closed = False
        self.remaining = -1  # body bytes the request's content-length still promises
        self.opened = 0.0  # when the peer opened it, by the budget's clock (if there is one)


class RemoteSettings:
    __slots__ = (
        "header_table_size",
        "initial_window_size",
        "max_concurrent_streams",
        "max_frame_size",
        "max_header_list_size",
    )

    def __init__(self) -> None:
        self.header_table_size = 4096
        self.initial_window_size = f.DEFAULT_WINDOW
        self.max_concurrent_streams = 2**31 - 1
        self.max_frame_size = f.DEFAULT_MAX_FRAME
        self.max_header_list_size = 2**31 - 1


class H2Codec(FrameReceiver):
    def __init__(
        self,
        *,
        client_side: bool,
        initial_window_size: int = f.DEFAULT_WINDOW,
        max_concurrent_streams: int = 100,
        max_header_list_size: int = 64 * 1024,
        max_frame_size: int = f.DEFAULT_MAX_FRAME,
        budget: Budget | None = None,
        max_frames_per_turn: int = MAX_FRAMES_PER_TURN,
    ) -> None:
        if not f.DEFAULT_MAX_FRAME <= max_frame_size <= MAX_ANNOUNCED_FRAME:
            raise CodecUsageError(f"max_frame_size {max_frame_size} out of range")
        self.client_side = client_side
        self.streams: dict[int, Stream] = {}
        self.remote_settings = RemoteSettings()
        self.highest_inbound_stream_id = 0
        self._next_outbound_id = 1 if client_side else 2
        self._inbound_open = 0
        self._outbound_open = 0
        self._local_max_streams = max_concurrent_streams
        self._local_settings = {
            f.ENABLE_PUSH: 0,
            f.INITIAL_WINDOW_SIZE: initial_window_size,
            f.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            f.MAX_HEADER_LIST_SIZE: max_header_list_size,
        }
        if max_frame_size != f.DEFAULT_MAX_FRAME:
            self._local_settings[f.MAX_FRAME_SIZE] = max_frame_size
        # Larger frames are accepted at once: a peer may use them as soon as it has our SETTINGS.
        self._max_inbound_frame = max_frame_size
        # Until the peer acknowledges our SETTINGS it may still use the default window.
        self._stream_recv_window = max(initial_window_size, f.DEFAULT_WINDOW)
        self._stream_recv_target = initial_window_size
        self._send_window = f.DEFAULT_WINDOW
        self._recv_window = f.DEFAULT_WINDOW
        self._recv_max = f.DEFAULT_WINDOW
        self._recv_processed = 0
        self._out: list[f.Chunk] = []
        self._out_large = False  # _out holds a payload worth writing without a copy
        self._rbuf = thread_receive_buffer()
        self._pending = b""
        self._filled = 0
        self._preface_pending = not client_side
        self._settings_seen = False
        self._block_sid = 0  # stream whose header block continues in CONTINUATION frames
        self._block_parts: list[bytes] = []
        self._block_size = 0
        self._block_end_stream = False
        self._block_bad_priority = False
        self._reset_by_us: dict[int, None] = {}
        self._dead = False
        self.budget = budget
        self.max_frames_per_turn = max_frames_per_turn
        self.backlogged = False
        self._data_sends = 0  # DATA sends so far: each earns the peer control frames
        self._streams_completed = 0  # streams that ended without a reset: each earns a reset
        # Streams the application knew that ended in a reset (the peer's or ours), counted so
        # that the owner looks for them among a read's events only when there are some.
        self.streams_reset = 0
        self.decoder = CachingDecoder(max_header_list_size)
        self.encoder = CachingEncoder()
        self._max_block = max_header_list_size + 4096

    # -- sending ---------------------------------------------------------------------------

    def initiate_connection(self) -> None:
        if self.client_side:
            self._out.append(f.PREFACE)
        self._out.append(f.settings_frame(self._local_settings))

    def increment_flow_control_window(self, increment: int, stream_id: int | None = None) -> None:
        if stream_id:
            raise CodecUsageError("only the connection window is managed this way")
        self._recv_window += increment
        self._recv_max += increment
        self._out.append(f.window_update_frame(0, increment))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = b"".join(out)
        out.clear()
        self._out_large = False
        return data

    def take_output(self) -> list[f.Chunk]:
        """What ``data_to_send`` would return, as chunks for ``writelines``: runs of small
        frames joined, large DATA payloads as they are (not copied once more)."""
        out = self._out
        if not out:
            return []
        if not self._out_large:
            data = b"".join(out)
            out.clear()
            return [data]
        self._out = []
        self._out_large = False
        chunks: list[f.Chunk] = []
        run: list[f.Chunk] = []
        for chunk in out:
            if len(chunk) < WRITEV_MIN:
                run.append(chunk)
                continue
            if run:
                chunks.append(b"".join(run) if len(run) > 1 else run[0])
                run = []
            chunks.append(chunk)
        if run:
            chunks.append(b"".join(run) if len(run) > 1 else run[0])
        return chunks

    @property
    def max_outbound_frame_size(self) -> int:
        return self.remote_settings.max_frame_size

    def get_next_available_stream_id(self) -> int:
        if self._next_outbound_id > f.MAX_WINDOW:
            raise CodecUsageError("stream ids exhausted")
        return self._next_outbound_id

    def local_flow_control_window(self, stream_id: int) -> int:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise CodecStreamClosedError(stream_id)
        window = stream.send_window
        return window if window < self._send_window else self._send_window

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        if self._dead:
            raise CodecUsageError("connection failed")
        stream = self.streams.get(stream_id)
        if stream is None:
            if not self.client_side or stream_id != self._next_outbound_id:
                raise CodecStreamClosedError(stream_id)
            if self._outbound_open >= self.remote_settings.max_concurrent_streams:
                raise CodecUsageError("peer's MAX_CONCURRENT_STREAMS reached")
            stream = Stream(
                stream_id,
                self.remote_settings.initial_window_size,
                self._stream_recv_window,
                inbound=False,
            )
            self.streams[stream_id] = stream
            self._next_outbound_id = stream_id + 2
            self._outbound_open += 1
        elif not stream.local_open:
            raise CodecStreamClosedError(stream_id)
        block = self.encoder.encode(headers)
        self._out.extend(
            f.headers_frames(stream_id, block, end_stream, self.remote_settings.max_frame_size)
        )
        if end_stream:
            self._local_ended(stream)

    def send_data(self, stream_id: int, data: f.Chunk, end_stream: bool = False) -> None:
        """DATA frames for ``data``, as many as the peer's MAX_FRAME_SIZE asks for."""
        stream = self.streams.get(stream_id)
        if stream is None or not stream.local_open or self._dead:
            raise CodecStreamClosedError(stream_id)
        size = len(data)
        if size > stream.send_window or size > self._send_window:
            raise CodecUsageError("DATA beyond the peer's flow-control window")
        stream.send_window -= size
        self._send_window -= size
        self._data_sends += 1
        out = self._out
        header = f.frame_header
        max_frame = self.remote_settings.max_frame_size
        if size > max_frame:
            view = memoryview(data)
            cut = (size - 1) // max_frame * max_frame  # full frames before the last one
            for pos in range(0, cut, max_frame):
                out.append(header(max_frame, f.DATA, 0, stream_id))
                out.append(view[pos : pos + max_frame])
            self._out_large = True
            data = view[cut:]
            size = len(data)
        out.append(header(size, f.DATA, f.END_STREAM if end_stream else 0, stream_id))
        if size:
            out.append(data)
            if size >= WRITEV_MIN:
                self._out_large = True
        if end_stream:
            self._local_ended(stream)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise CodecStreamClosedError(stream_id)
        if self._dead:
            return
        self._out.append(f.rst_stream_frame(stream_id, error_code))
        self._forget(stream)
        self._remember_reset(stream_id)

    def send_goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        self._out.append(f.goaway_frame(last_stream_id, error_code))

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        """The application took these bytes: return them when half a window is due."""
        if acknowledged_size < 0:
            raise ValueError("cannot acknowledge a negative size")
        if self._dead:
            return
        if not acknowledged_size:
            return
        processed = self._recv_processed + acknowledged_size
        if processed >= self._recv_max >> 1:
            self._recv_processed = 0
            self._recv_window += processed
            self._out.append(f.window_update_frame(0, processed))
        else:
            self._recv_processed = processed
        stream = self.streams.get(stream_id)
        if stream is not None and stream.remote_open:
            processed = stream.processed + acknowledged_size
            if processed >= self._stream_recv_target >> 1:
                stream.processed = 0
                stream.recv_window += processed
                self._out.append(f.window_update_frame(stream_id, processed))
            else:
                stream.processed = processed

    def progress_mark(self, stream_id: int) -> Hashable:
        """A value that changes when the stream moves (bytes either way, a window given), or
        None for a stream that is closed: what a stalled-stream sweep compares."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return None
        return (stream.send_window, stream.recv_window, stream.processed)

    # -- receiving -------------------------------------------------------------------------

    @property
    def header_block_open(self) -> bool:
        """A header block waits for its CONTINUATION frames."""
        return bool(self._block_sid)

    def _control_frame(self) -> None:
        budget = self.budget
        if budget is not None and not budget.control_frame(self._data_sends):
            raise CodecProtocolError("too many control frames", ENHANCE_YOUR_CALM)

    def _reset_charged(self, opened: float | None = None) -> None:
        budget = self.budget
        if budget is not None and not budget.stream_reset(self._streams_completed, opened):
            raise CodecProtocolError("too many stream resets", ENHANCE_YOUR_CALM)

    def _failed(self, exc: CodecProtocolError) -> None:
        self._dead = True
        self._out.append(f.goaway_frame(self.highest_inbound_stream_id, exc.error_code))

    def _headers_complete(
        self, sid: int, end_stream: bool, block: bytes, bad_priority: bool, events: list[Event]
    ) -> None:
        decoded = self.decoder.decode(block)  # always, to keep HPACK state in step
        stream = self.streams.get(sid)
        if bad_priority:
            raise StreamError(sid, PROTOCOL_ERROR, "stream depends on itself")
        if stream is None:
            if not self.client_side and sid & 1 and sid > self.highest_inbound_stream_id:
                trouble = validated(decoded, REQUEST)
                length = decoded.content_length
                if trouble is None and end_stream and length > 0:
                    trouble = "request without the body its content-length promises"
                self._new_request(sid, end_stream, decoded.headers, trouble, events)
                if length >= 0 and not end_stream:
                    self.streams[sid].remaining = length
                return
            if self._is_idle(sid):
                raise CodecProtocolError(f"HEADERS on idle stream {sid}")
            if sid in self._reset_by_us:
                return
            if self.client_side:
                raise CodecProtocolError(f"HEADERS on closed stream {sid}", STREAM_CLOSED)
            # A lower id than the last request's: closed, or skipped (RFC 9113 section 5.1.1).
            raise CodecProtocolError(f"HEADERS on stream {sid}, not a new stream id")
        if not stream.remote_open:
            raise StreamError(sid, STREAM_CLOSED, "HEADERS after END_STREAM")
        if stream.headers_received:
            if not end_stream:
                raise StreamError(sid, PROTOCOL_ERROR, "trailers without END_STREAM")
            trouble = validated(decoded, TRAILERS)
            if trouble is not None:
                raise StreamError(sid, PROTOCOL_ERROR, trouble)
            if stream.remaining > 0:
                raise StreamError(sid, PROTOCOL_ERROR, "body shorter than its content-length")
            self._remote_ended(stream)
            events.append(TrailersReceived(sid, list(decoded.headers)))
            return
        trouble = validated(decoded, RESPONSE)
        if trouble is not None:
            raise StreamError(sid, PROTOCOL_ERROR, trouble)
        if decoded.headers[0][1][:1] == b"1":  # informational: the final response follows
            if end_stream:
                raise StreamError(sid, PROTOCOL_ERROR, "informational response ends the stream")
            return
        stream.headers_received = True
        if end_stream:
            self._remote_ended(stream)
        events.append(ResponseReceived(sid, list(decoded.headers), True if end_stream else None))

    def _new_request(
        self,
        sid: int,
        end_stream: bool,
        headers: tuple[tuple[bytes, bytes], ...],
        trouble: str | None,
        events: list[Event],
    ) -> None:
        self.highest_inbound_stream_id = sid
        if self._inbound_open >= self._local_max_streams:
            raise StreamError(sid, REFUSED_STREAM, "MAX_CONCURRENT_STREAMS reached")
        if trouble is not None:
            raise StreamError(sid, PROTOCOL_ERROR, trouble)
        stream = Stream(
            sid, self.remote_settings.initial_window_size, self._stream_recv_window, inbound=True
        )
        self.streams[sid] = stream
        self._inbound_open += 1
        budget = self.budget
        if budget is not None:
            stream.opened = budget.clock()
        if end_stream:
            stream.remote_open = False
        events.append(RequestReceived(sid, list(headers), True if end_stream else None))

    def _stream_error(self, exc: StreamError, events: list[Event]) -> None:
        # Resetting a stream for the peer's mistake costs as much as the peer resetting it.
        self._reset_charged()
        sid = exc.stream_id
        self._out.append(f.rst_stream_frame(sid, exc.code))
        self._remember_reset(sid)
        stream = self.streams.get(sid)
        if stream is not None:
            self._forget(stream)
            self.streams_reset += 1
            events.append(StreamReset(sid, exc.code, remote_reset=False))

    def _on_data(self, sid: int, flags: int, payload: bytes, events: list[Event]) -> None:
        if sid == 0:
            raise CodecProtocolError("DATA on stream 0")
        length = len(payload)
        self._recv_window -= length
        if self._recv_window < 0:
            raise CodecProtocolError("DATA beyond the connection window", FLOW_CONTROL_ERROR)
        data = payload
        if flags & f.PADDED:
            if not length or payload[0] >= length:
                raise CodecProtocolError("DATA padding too long")
            data = payload[1 : length - payload[0]]
        stream = self.streams.get(sid)
        if stream is None or not stream.remote_open:
            self.acknowledge_received_data(length, 0)  # nobody else will give them back
            if stream is None:
                if self._is_idle(sid):
                    raise CodecProtocolError(f"DATA on idle stream {sid}")
                if sid in self._reset_by_us:
                    return
            raise StreamError(sid, STREAM_CLOSED, "DATA on a closed stream")
        stream.recv_window -= length
        if stream.recv_window < 0:
            raise CodecProtocolError("DATA beyond the stream window", FLOW_CONTROL_ERROR)
        ended = flags & f.END_STREAM
        if stream.remaining >= 0:
            # RFC 9113 section 8.1.1: a body that disagrees with its content-length, either
            # way, makes the request malformed; it must not reach an upstream as it is.
            remaining = stream.remaining = stream.remaining - len(data)
            if remaining < 0 or (ended and remaining):
                self.acknowledge_received_data(length, 0)  # the stream will not return them
                raise StreamError(sid, PROTOCOL_ERROR, "body disagrees with its content-length")
        if ended:
            self._remote_ended(stream)
            events.append(DataReceived(sid, data, length, True))
        else:
            events.append(DataReceived(sid, data, length, None))

    def _on_rst_stream(self, sid: int, code: int, events: list[Event]) -> None:
        stream = self.streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                raise CodecProtocolError(f"RST_STREAM on idle stream {sid}")
            self._control_frame()
            return
        self.streams_reset += 1
        self._forget(stream)
        events.append(StreamReset(sid, code))
        self._reset_charged(stream.opened if stream.inbound else None)

    def _on_window_update(self, sid: int, increment: int, events: list[Event]) -> None:
        if sid == 0:
            if increment == 0:
                raise CodecProtocolError("WINDOW_UPDATE of 0 on the connection")
            self._send_window += increment
            if self._send_window > f.MAX_WINDOW:
                raise CodecProtocolError("connection window overflow", FLOW_CONTROL_ERROR)
            events.append(WindowUpdated(0, increment))
            return
        stream = self.streams.get(sid)
        if stream is None:
            if self._is_idle(sid):
                raise CodecProtocolError(f"WINDOW_UPDATE on idle stream {sid}")
            return
        if increment == 0:
            raise StreamError(sid, PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            raise StreamError(sid, FLOW_CONTROL_ERROR, "stream window overflow")
        events.append(WindowUpdated(sid, increment))

    def _on_settings(self, settings: list[tuple[int, int]], events: list[Event]) -> None:
        remote = self.remote_settings
        changed: dict[int, int] = {}
        for code, value in settings:
            if code == f.HEADER_TABLE_SIZE:
                remote.header_table_size = value
                self.encoder.set_table_size(value)
            elif code == f.ENABLE_PUSH:
                if value > 1 or (value == 1 and self.client_side):
                    raise CodecProtocolError("invalid ENABLE_PUSH")
            elif code == f.MAX_CONCURRENT_STREAMS:
                remote.max_concurrent_streams = value
            elif code == f.INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise CodecProtocolError("INITIAL_WINDOW_SIZE too large", FLOW_CONTROL_ERROR)
                delta = value - remote.initial_window_size
                remote.initial_window_size = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > f.MAX_WINDOW:
                        raise CodecProtocolError("stream window overflow", FLOW_CONTROL_ERROR)
            elif code == f.MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME <= value <= f.MAX_FRAME_SIZE_LIMIT:
                    raise CodecProtocolError("invalid MAX_FRAME_SIZE")
                remote.max_frame_size = value
            elif code == f.MAX_HEADER_LIST_SIZE:
                remote.max_header_list_size = value
            changed[code] = value
        self._out.append(f.SETTINGS_ACK)
        events.append(RemoteSettingsChanged(changed))

    def _on_settings_ack(self) -> None:
        """Our SETTINGS are in force: streams now get exactly the window we announced."""
        delta = self._stream_recv_target - self._stream_recv_window
        self._stream_recv_window = self._stream_recv_target
        if delta:
            for stream in self.streams.values():
                stream.recv_window += delta

    def _on_goaway(self, last_stream_id: int, code: int, debug: bytes, events: list[Event]) -> None:
        events.append(ConnectionTerminated(code, last_stream_id, debug or None))

    # -- stream bookkeeping ----------------------------------------------------------------

    def _is_idle(self, sid: int) -> bool:
        if (sid & 1) == self.client_side:  # one of ours: odd ids for a client
            return sid >= self._next_outbound_id
        return sid > self.highest_inbound_stream_id

    def _local_ended(self, stream: Stream) -> None:
        stream.local_open = False
        if not stream.remote_open:
            self._streams_completed += 1
            self._forget(stream)

    def _remote_ended(self, stream: Stream) -> None:
        stream.remote_open = False
        if not stream.local_open:
            self._streams_completed += 1
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        stream.closed = True
        del self.streams[stream.stream_id]
        if stream.inbound:
            self._inbound_open -= 1
        else:
            self._outbound_open -= 1

    def _remember_reset(self, sid: int) -> None:
        memory = self._reset_by_us
        memory[sid] = None
        if len(memory) > RESET_MEMORY:
            del memory[next(iter(memory))]
