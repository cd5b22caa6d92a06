"""HTTP/2 connections on both sides of the proxy, around a sans-IO codec.

The codec is ours (``sidecar.codec``) or, as a fallback, the ``h2`` library configured for a
proxy: headers already validated on the way in are not validated or normalised again on the way
out, and no per-frame logging is paid for.

Reads land in the codec's receive buffer (a ``BufferedProtocol``: no bytes object per read).
Writes are batched: the frames queued for a connection while a read is handled leave together
in one ``write`` (large DATA payloads by ``writelines``, without being copied again), after the
read or, for other connections, from a loop callback. One exception, for latency: a stream
that finishes while the last request or response event of a read is handled is written at once,
so the bookkeeping that follows (stream and request ends, stats, tracing) runs while the peer
already has the message; on another connection, that write cancels the loop callback its
earlier frames asked for (a proxied unary call leaves none behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from sidecar import codec
from sidecar.http.streams import (
    CANCEL,
    REFUSED_STREAM,
    Headers,
    OnSent,
    ResetReason,
    StreamHandler,
)

log = logging.getLogger(__name__)

_TRAILERS = object()  # marks queued trailers in a stream's send queue
_RESET = object()  # marks a reset to send once everything queued before it has gone
MAX_STREAM_ID = 2**31 - 1
LINGER_SECONDS = 2.0
# Peers may send us DATA frames this large (RFC 9113's default is 16 KiB): fewer frames to
# handle for a large body. What we send follows each peer's own setting.
MAX_FRAME_SIZE = 64 * 1024
# What the h2 library fallback reads into (the lean codec has its own receive buffer).
H2_LIBRARY_READ_SIZE = 64 * 1024


def _choose_codec(name: str | None) -> str:
    """Which HTTP/2 implementation drives the connections: ``ngh2`` (libnghttp2, compiled; the
    default when the ``fast`` extra is installed), ``python`` (``sidecar.codec``, ours, the
    tested fallback; ``lean`` is its older name) or ``h2`` (the library, slowest)."""
    if name is None:
        return "ngh2" if importlib.util.find_spec("ngh2") is not None else "python"
    if name == "lean":
        return "python"
    if name not in ("ngh2", "python", "h2"):
        raise ValueError(f"PILOTFISH_H2_CODEC must be ngh2, python or h2, not {name!r}")
    if name == "ngh2" and importlib.util.find_spec("ngh2") is None:
        raise ValueError(
            "PILOTFISH_H2_CODEC=ngh2, but ngh2 is not installed (pip install 'pilotfish[fast]')"
        )
    return name


H2_CODEC = _choose_codec(os.environ.get("PILOTFISH_H2_CODEC"))
if H2_CODEC == "ngh2":  # only then need ngh2 be installed (mypy checks the import anyway)
    from sidecar.codec.ngh2_codec import Ngh2Codec


class GracefulH2Connection(h2.connection.H2Connection):
    """h2's connection, with GOAWAY as RFC 9113 section 6.8 means it.

    h2 treats GOAWAY, sent or received, as the end of the connection: its state machine
    closes and frames for streams still in flight are refused. A proxy must let those streams
    finish. So a received GOAWAY only becomes an event, and ``send_goaway`` queues the frame
    without closing; the owner stops opening (or accepting) new streams itself.
    """

    def _receive_goaway_frame(
        self, frame: hyperframe.frame.GoAwayFrame
    ) -> tuple[list[hyperframe.frame.Frame], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors._error_code_from_int(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    def send_goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        frame = hyperframe.frame.GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = error_code
        self._prepare_for_sending([frame])


# Events that carry a request or a response: the read's last one decides the early write.
_MESSAGE_EVENTS = frozenset(
    {codec.RequestReceived, codec.ResponseReceived, codec.DataReceived, codec.TrailersReceived}
)


_DATA_EVENT = codec.DataReceived
_RESPONSE_EVENT = codec.ResponseReceived
_REQUEST_EVENT = codec.RequestReceived


class _ReadTail:
    """Is the last message event of a read being handled right now?

    Only a hint for when to write: an event loop in another thread that sees another's value
    writes a little earlier or later, never wrongly. (A ``threading.local`` costs more than
    the rest of the check.)
    """

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False


_read_tail = _ReadTail()


class H2Stream:
    """One HTTP/2 stream: a ``StreamSink`` for the other side, feeding a ``StreamHandler``."""

    __slots__ = ("closed", "conn", "handler", "queue", "stream_id")

    def __init__(self, conn: H2Connection, stream_id: int, handler: StreamHandler | None) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.handler = handler
        self.queue: deque[list[Any]] = deque()  # [data, end_stream, on_sent] or [_TRAILERS, hdrs]
        self.closed = False

    def send_headers(self, headers: Headers, end_stream: bool) -> None:
        if self.closed:
            return
        conn = self.conn
        try:
            conn.h2.send_headers(self.stream_id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            log.debug("send_headers on stream %d failed: %s", self.stream_id, exc)
            conn.reset_stream(self, CANCEL)
            return
        if not conn._flush_scheduled:
            conn.mark_dirty()
        if end_stream:
            conn.stream_send_ended(self)

    def send_data(self, data: bytes, end_stream: bool, on_sent: OnSent) -> None:
        if self.closed:
            if on_sent is not None:
                on_sent()
            return
        conn = self.conn
        if not self.queue and not conn.write_paused and conn.send_now(self, data, end_stream):
            if on_sent is not None:
                on_sent()
            return
        self.queue.append([data, end_stream, on_sent])
        conn.flush_stream(self)

    def send_trailers(self, trailers: Headers) -> None:
        if self.closed:
            return
        conn = self.conn
        if self.queue or conn.write_paused:
            # They follow what is queued (or wait for the socket, as queued DATA does).
            self.queue.append([_TRAILERS, trailers, None])
            conn.flush_stream(self)
            return
        # Nothing ahead of them and trailers take no window (a gRPC answer's usual end): they
        # go straight to the codec, without a trip through the queue.
        try:
            conn.h2.send_headers(self.stream_id, trailers, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            log.debug("send_trailers on stream %d failed: %s", self.stream_id, exc)
            return
        if not conn._flush_scheduled:
            conn.mark_dirty()
        conn.stream_send_ended(self)

    def reset(self, code: int) -> None:
        self.conn.reset_stream(self, code)

    def reset_when_sent(self, code: int) -> None:
        """Reset once what is queued has been sent (a reset discards the queue)."""
        if self.closed:
            return
        if not self.queue:
            self.conn.reset_stream(self, code)
            return
        self.queue.append([_RESET, code, None])
        self.conn.flush_stream(self)

    def ack(self, flow_len: int) -> None:
        conn = self.conn
        if flow_len and not conn.closed:
            conn.h2.acknowledge_received_data(flow_len, self.stream_id)
            if not conn._flush_scheduled:
                conn.mark_dirty()

    def release_queue(self) -> None:
        """Hand back flow-control credit for bytes that will now never be sent."""
        queue = self.queue
        if not queue:
            return
        self.queue = deque()
        for item in queue:
            if item[2] is not None:
                item[2]()


class H2Connection(asyncio.BufferedProtocol):
    """What both sides share: the HTTP/2 state machine, flow-controlled writes, batching."""

    # Reading and writing go straight to the codec's methods where it has them.
    _lend_buffer: Callable[[int], memoryview]
    _read_events: Callable[[int], list[Any]]
    _take_output: Callable[[], list[codec.Chunk]]
    # A codec that calls this connection's ``on_*_received`` methods itself (ngh2): a read
    # makes no event objects and no second dispatch.
    _deliver: Callable[[int], None] | None = None
    # Whether requests reset within the read that opened them are dropped (``screen_resets``).
    screens_resets = False

    def __init__(
        self,
        *,
        client_side: bool,
        stream_window: int,
        connection_window: int,
        max_concurrent_streams: int,
        max_header_list_size: int = 64 * 1024,
        budget: codec.Budget | None = None,
    ) -> None:
        self.h2: GracefulH2Connection | codec.H2Codec | Ngh2Codec
        if H2_CODEC != "h2":
            lean = (Ngh2Codec if H2_CODEC == "ngh2" else codec.H2Codec)(
                client_side=client_side,
                initial_window_size=stream_window,
                max_concurrent_streams=max_concurrent_streams,
                max_header_list_size=max_header_list_size,
                max_frame_size=MAX_FRAME_SIZE,
                budget=budget,
            )
            self.h2 = lean
            self._lean = True
            self._lend_buffer = lean.get_buffer
            self._read_events = lean.buffer_updated
            self._take_output = lean.take_output
            if H2_CODEC == "ngh2":
                ngh2_codec = cast(Ngh2Codec, lean)
                ngh2_codec.sink = self
                ngh2_codec.screen_resets = self.screens_resets
                self._deliver = ngh2_codec.read
        else:
            config = h2.config.H2Configuration(
                client_side=client_side,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=True,
                normalize_inbound_headers=False,
            )
            self.h2 = GracefulH2Connection(config=config)
            self.h2.local_settings = h2.settings.Settings(
                client=client_side,
                initial_values={
                    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
                    h2.settings.SettingCodes.ENABLE_PUSH: 0,
                },
            )
            self.h2.decoder.max_header_list_size = max_header_list_size
            self._lean = False
            self._read_view = memoryview(bytearray(H2_LIBRARY_READ_SIZE))
            self._lend_buffer = self._h2_library_buffer
            self._read_events = self._h2_library_events
            self._take_output = self._h2_library_output
        self._connection_window = connection_window
        self.streams: dict[int, H2Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.write_paused = False
        self.goaway_sent = False
        self.goaway_received = False
        self.discarding = False
        # Reading stops while the codec holds unparsed frames for a later turn (``backlog``)
        # or, on connections that ask for it, while the peer is not reading what we write.
        self.read_held_for_backlog = False
        self.read_held_for_writes = False
        self.hold_reading_while_write_paused = False
        self._resets_seen = 0  # the codec's ``streams_reset`` when events were last screened
        self._flush_scheduled = False
        # The loop callback ``mark_dirty`` scheduled, while it has yet to run.
        self._flush_handle: asyncio.Handle | None = None
        self._blocked: set[H2Stream] = set()  # streams with queued data waiting for window
        self._loop = asyncio.get_event_loop()
        # Event objects (our codec's, the h2 library's), each to its ``on_*_received``.
        self._dispatch: dict[type, Callable[[Any], None]] = {
            h2.events.RequestReceived: self._request_event,
            h2.events.ResponseReceived: self._response_event,
            h2.events.DataReceived: self._data_event,
            h2.events.TrailersReceived: self._trailers_event,
            h2.events.StreamReset: self._reset_event,
            h2.events.WindowUpdated: self._window_event,
            h2.events.RemoteSettingsChanged: self._settings_event,
            h2.events.ConnectionTerminated: self._goaway_event,
            codec.RequestReceived: self._request_event,
            codec.ResponseReceived: self._response_event,
            codec.DataReceived: self._data_event,
            codec.TrailersReceived: self._trailers_event,
            codec.StreamReset: self._reset_event,
            codec.WindowUpdated: self._window_event,
            codec.RemoteSettingsChanged: self._settings_event,
            codec.ConnectionTerminated: self._goaway_event,
        }

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.h2.initiate_connection()
        extra = self._connection_window - 65535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        self.flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._lend_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.discarding:
            return
        deliver = self._deliver
        if deliver is not None:
            # What the codec's calls queue on this connection leaves in the one flush below.
            self._flush_scheduled = True
            try:
                deliver(nbytes)
            except h2.exceptions.ProtocolError as exc:
                _read_tail.active = False
                self.protocol_error(exc)
                return
            finally:
                _read_tail.active = False
                self.flush()
            if cast(Ngh2Codec, self.h2).backlogged:
                self._hold_for_backlog()
            return
        try:
            events = self._read_events(nbytes)
        except h2.exceptions.ProtocolError as exc:
            self.protocol_error(exc)
            return
        if self._lean:
            lean = cast(codec.H2Codec, self.h2)
            if lean.backlogged:
                self._hold_for_backlog()
            if lean.streams_reset != self._resets_seen:
                self._resets_seen = lean.streams_reset
                events = self.screen_resets(events)
        elif events:
            events = self.screen_resets(events)
        dispatch = self._dispatch
        # Whatever the events queue on this connection leaves in the one flush below; marking
        # it scheduled keeps mark_dirty from adding a loop callback for each of them.
        self._flush_scheduled = True
        tail = len(events) - 1
        while tail >= 0 and type(events[tail]) not in _MESSAGE_EVENTS:
            tail -= 1
        try:
            for index, event in enumerate(events):
                if index == tail:
                    _read_tail.active = True
                kind = type(event)
                # Our codec's message events are taken apart here, the rest through the table.
                if kind is _DATA_EVENT:
                    ended = event.stream_ended is not None
                    flow = event.flow_controlled_length
                    self.on_data_received(event.stream_id, event.data, flow, ended)
                elif kind is _RESPONSE_EVENT:
                    ended = event.stream_ended is not None
                    self.on_response_received(event.stream_id, event.headers, ended)
                elif kind is _REQUEST_EVENT:
                    ended = event.stream_ended is not None
                    self.on_request_received(event.stream_id, event.headers, ended)
                else:
                    handler = dispatch.get(kind)
                    if handler is not None:
                        handler(event)
        finally:
            _read_tail.active = False
            self.flush()

    def screen_resets(self, events: list[Any]) -> list[Any]:
        """The events of a read in which streams were reset (hook for the server side)."""
        return events

    def _hold_for_backlog(self) -> None:
        """Parse the rest of the read on a later turn of the loop, letting others run first."""
        if self.read_held_for_backlog:
            return
        self.read_held_for_backlog = True
        self._update_reading()
        self._loop.call_soon(self._read_backlog)

    def _read_backlog(self) -> None:
        self.read_held_for_backlog = False
        if self.closed or self.discarding:
            return
        self._lend_buffer(0)  # puts the pending bytes back in front
        self.buffer_updated(0)  # holds again if there is still more
        if not self.read_held_for_backlog:
            self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        if self.read_held_for_backlog or self.read_held_for_writes:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        """Bytes read before this protocol took the connection over (protocol detection)."""
        view = memoryview(data)
        pos = 0
        while pos < len(view) and not self.discarding:
            room = self.get_buffer(len(view) - pos)
            size = min(len(room), len(view) - pos)
            room[:size] = view[pos : pos + size]
            pos += size
            self.buffer_updated(size)

    def _h2_library_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def _h2_library_events(self, nbytes: int) -> list[Any]:
        events: list[Any] = self.h2.receive_data(self._read_view[:nbytes].tobytes())
        return events

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            self._close_stream(stream, ResetReason.CONNECTION_LOST, 0)
        self.on_closed()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.hold_reading_while_write_paused:
            # A peer that does not read must not make us queue answers to what it sends
            # (PING and SETTINGS acknowledgements, resets) without end: stop reading it.
            self.read_held_for_writes = True
            self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.read_held_for_writes:
            self.read_held_for_writes = False
            self._update_reading()
        self._flush_blocked()
        self.flush()

    # -- writing ---------------------------------------------------------------------------

    def mark_dirty(self) -> None:
        if not self._flush_scheduled and not self.closed:
            self._flush_scheduled = True
            self._flush_handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        self._flush_handle = None
        chunks = self._take_output()
        # ``discarding``: our side is shut (write_eof) after a protocol error.
        if chunks and self.transport is not None and not self.closed and not self.discarding:
            if len(chunks) == 1:
                self.transport.write(chunks[0])
            else:
                self.transport.writelines(chunks)

    def _write_out(self) -> None:
        """Write what is queued now. A flush this connection's own read will make stays in
        place; one left to a loop callback is cancelled, as this write does its work (frames
        queued after it schedule another)."""
        handle = self._flush_handle
        if handle is not None:
            handle.cancel()
            self.flush()
            return
        scheduled = self._flush_scheduled
        self.flush()
        self._flush_scheduled = scheduled

    def _h2_library_output(self) -> list[codec.Chunk]:
        data = self.h2.data_to_send()
        return [data] if data else []

    def _window(self, sid: int) -> int:
        """How much DATA the stream may send now (our codec splits it into frames itself)."""
        h2conn = self.h2
        window = h2conn.local_flow_control_window(sid)
        if self._lean:
            return window
        return min(window, h2conn.max_outbound_frame_size)

    def send_now(self, stream: H2Stream, data: bytes, end_stream: bool) -> bool:
        """Send ``data`` at once if the window has room for all of it; False leaves it to the
        stream's queue (a stream that cannot be sent on any more drops it: True)."""
        sid = stream.stream_id
        h2conn = self.h2
        try:
            window = h2conn.local_flow_control_window(sid) if self._lean else self._window(sid)
            if len(data) > window:
                return False
            h2conn.send_data(sid, data, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            log.debug("send on stream %d failed: %s", sid, exc)
            stream.release_queue()
            return True
        if not self._flush_scheduled:
            self.mark_dirty()
        if end_stream:  # after mark_dirty: an early write here leaves no flush to schedule
            self.stream_send_ended(stream)
        return True

    def flush_stream(self, stream: H2Stream) -> None:
        """Move as much of the stream's queue into h2 as flow control and the socket allow."""
        if self.write_paused:
            self._blocked.add(stream)
            return
        # Before the frames: a stream end among them may write them at once (the read's
        # last message), and a flush scheduled after that would find nothing to write.
        self.mark_dirty()
        h2conn = self.h2
        queue = stream.queue
        sid = stream.stream_id
        try:
            while queue:
                item = queue[0]
                data = item[0]
                if data is _TRAILERS:
                    queue.popleft()
                    h2conn.send_headers(sid, item[1], end_stream=True)
                    self.stream_send_ended(stream)
                    continue
                if data is _RESET:
                    queue.popleft()
                    self.reset_stream(stream, item[1])
                    break
                size = len(data)
                window = self._window(sid)
                if size > window:
                    if window <= 0:
                        self._blocked.add(stream)
                        break
                    if self._lean:
                        view = memoryview(data)
                        h2conn.send_data(sid, view[:window])
                        item[0] = view[window:]
                    else:
                        h2conn.send_data(sid, data[:window])
                        item[0] = data[window:]
                    continue
                queue.popleft()
                h2conn.send_data(sid, data, end_stream=item[1])
                if item[2] is not None:
                    item[2]()
                if item[1]:
                    self.stream_send_ended(stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError) as exc:
            log.debug("send on stream %d failed: %s", sid, exc)
            stream.release_queue()

    def _flush_blocked(self) -> None:
        blocked, self._blocked = self._blocked, set()
        for stream in blocked:
            if not stream.closed and stream.queue:
                self.flush_stream(stream)

    def reset_stream(self, stream: H2Stream, code: int) -> None:
        if stream.closed:
            return
        if not self.closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream.stream_id, code)
            self.mark_dirty()
        self._close_stream(stream, None, code)

    def stream_send_ended(self, stream: H2Stream) -> None:
        """Our half of the stream is closed; if the peer's is too, forget the stream.

        When this ends the last message of a read, the frames go out now, before the
        bookkeeping of the stream's end: nothing else from that read will join them.
        """
        if _read_tail.active:
            self._write_out()
        self._maybe_forget(stream)

    def _maybe_forget(self, stream: H2Stream) -> None:
        if self._lean:
            # Our codecs keep a stream in ``streams`` exactly as long as it is open.
            if stream.stream_id not in self.h2.streams:
                self._close_stream(stream, None, 0)
            return
        try:
            h2stream = self.h2.streams.get(stream.stream_id)
        except h2.exceptions.StreamClosedError:
            h2stream = None
        if h2stream is None or h2stream.closed:
            self._close_stream(stream, None, 0)

    def _close_stream(self, stream: H2Stream, reason: ResetReason | None, code: int) -> None:
        """Forget ``stream``; tell its handler when it ended abnormally (``reason``)."""
        if stream.closed:
            return
        stream.closed = True
        self.streams.pop(stream.stream_id, None)
        if self._blocked:
            self._blocked.discard(stream)
        if stream.queue:
            stream.release_queue()
        if reason is not None and stream.handler is not None:
            stream.handler.on_reset(reason, code)
        self.on_stream_closed(stream)
        # Nothing reaches a closed stream's handler any more; letting go of it breaks the
        # stream <-> exchange (or attempt) cycle, so the request is freed without the collector.
        stream.handler = None

    # -- events: the codec's ``EventSink`` ------------------------------------------------

    def on_request_received(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        """Only servers receive requests (both codecs refuse them on client connections)."""

    def on_request_withdrawn(self, stream_id: int) -> None:
        pass

    def on_last_message(self) -> None:
        _read_tail.active = True

    def on_response_received(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.handler is not None:
            stream.handler.on_headers(headers, end_stream)
            if end_stream:
                self._maybe_forget(stream)

    def on_data_received(
        self, stream_id: int, data: bytes, flow_controlled_length: int, end_stream: bool
    ) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.handler is None:
            self.h2.acknowledge_received_data(flow_controlled_length, stream_id)
            return
        stream.handler.on_data(data, flow_controlled_length, end_stream)
        if end_stream:
            self._maybe_forget(stream)

    def on_trailers_received(self, stream_id: int, headers: Headers) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and stream.handler is not None:
            stream.handler.on_trailers(headers)
            self._maybe_forget(stream)

    def on_stream_reset(self, stream_id: int, error_code: int, remote_reset: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        reason = ResetReason.REFUSED if error_code == REFUSED_STREAM else ResetReason.REMOTE_RESET
        self._close_stream(stream, reason, int(error_code))

    def on_window_updated(self, stream_id: int, delta: int) -> None:
        # A stream with queued data is always among the blocked, so most updates (gRPC
        # clients return both windows after every response) have nothing to do.
        if not self._blocked:
            return
        if stream_id == 0:
            self._flush_blocked()
        else:
            stream = self.streams.get(stream_id)
            if stream is not None and stream.queue:
                self._blocked.discard(stream)
                self.flush_stream(stream)

    def on_settings_received(self, changed_settings: dict[int, int]) -> None:
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in changed_settings:
            self._flush_blocked()
        self.on_settings_changed()

    def on_goaway_received(
        self, error_code: int, last_stream_id: int, additional_data: bytes | None
    ) -> None:
        self.goaway_received = True
        self.on_goaway(last_stream_id, int(error_code or 0))

    # The same, from event objects.

    def _request_event(self, event: Any) -> None:
        self.on_request_received(event.stream_id, event.headers, event.stream_ended is not None)

    def _response_event(self, event: Any) -> None:
        self.on_response_received(event.stream_id, event.headers, event.stream_ended is not None)

    def _data_event(self, event: Any) -> None:
        ended = event.stream_ended is not None
        self.on_data_received(event.stream_id, event.data, event.flow_controlled_length, ended)

    def _trailers_event(self, event: Any) -> None:
        self.on_trailers_received(event.stream_id, event.headers)

    def _reset_event(self, event: Any) -> None:
        self.on_stream_reset(event.stream_id, event.error_code, event.remote_reset)

    def _window_event(self, event: Any) -> None:
        self.on_window_updated(event.stream_id, event.delta)

    def _settings_event(self, event: Any) -> None:
        self.on_settings_received(event.changed_settings)

    def _goaway_event(self, event: Any) -> None:
        self.on_goaway_received(event.error_code, event.last_stream_id, event.additional_data)

    # -- hooks for the two sides -----------------------------------------------------------

    def protocol_error(self, exc: Exception) -> None:
        """The peer broke the protocol: h2 queued a GOAWAY; send it and close.

        Input still in flight is read and dropped for a moment before the close, so that a
        close with unread bytes (an RST) does not destroy the GOAWAY on its way.
        """
        log.info("HTTP/2 protocol error from peer, closing connection: %s", exc)
        self.flush()
        transport = self.transport
        if transport is None or self.closed:
            return
        self.discarding = True
        for stream in list(self.streams.values()):
            self._close_stream(stream, ResetReason.PROTOCOL_ERROR, 0x1)
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(LINGER_SECONDS, self.abort)

    def on_stream_closed(self, stream: H2Stream) -> None:
        pass

    def on_settings_changed(self) -> None:
        pass

    def on_goaway(self, last_stream_id: int | None, error_code: int) -> None:
        pass

    def on_closed(self) -> None:
        pass

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()
