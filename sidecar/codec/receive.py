"""The receive loop: split the input into frames and check each frame's shape.

Input lands in a receive buffer that every codec of a thread shares: a socket read goes
straight into it (``get_buffer`` then ``buffer_updated``, as asyncio's ``BufferedProtocol``
has it), and ``receive_data`` copies bytes in hand there. Frames are read in place with
``struct``; a payload that outlives the read (DATA, header blocks, GOAWAY data) is copied out
once, as bytes, and control frames are read where they lie. Nothing refers to the shared buffer
once ``buffer_updated`` has returned, so it is free for the next read of any connection. A frame
cut off at the end of a read is kept as bytes and put back in front of the next read.

Each DATA payload is its own bytes object, of its frame's size. Joining a stream's frames of one
read into one chunk saves Python calls per frame but costs more than it saves: allocations of
64 KiB and more, freed soon after, make glibc give the top of its heap back to the kernel and
fault it in again (measured: 3 minor faults per 64 KiB response with frame-sized payloads,
13 with joined ones, and more CPU per response).

The checks here are the ones that need no stream state (RFC 9113 sections 4 and 6: sizes,
stream 0 or not, padding, header block continuity); ``H2Codec`` supplies the ``_on_*``
handlers that apply a frame.
"""

from __future__ import annotations

import abc
import threading
from typing import Protocol

from sidecar.codec import frames as f
from sidecar.codec.errors import (
    ENHANCE_YOUR_CALM,
    FRAME_SIZE_ERROR,
    PROTOCOL_ERROR,
    CodecProtocolError,
    StreamError,
)
from sidecar.codec.events import Event

MAX_CONTINUATIONS = 64
STREAM_MASK = 0x7FFFFFFF
# Large enough for one read of a busy loopback connection and, always, a whole frame of the
# largest size we announce behind the partial frame a read may start with.
RECEIVE_BUFFER_SIZE = 256 * 1024
MAX_ANNOUNCED_FRAME = 64 * 1024
# Frames handled per ``buffer_updated``: one read of small frames holds up to 29,000 of them,
# and handling them all at once would keep every other connection of the loop waiting. The
# rest stays pending (``backlogged``) for the owner to feed in on a later turn of the loop.
MAX_FRAMES_PER_TURN = 1000


class ReceiveBuffer:
    """Where reads land; lent to one codec from its ``get_buffer`` to its ``buffer_updated``.

    uvloop (libuv) allocates, reads and delivers one read before it asks for the next buffer,
    and the codec copies out all it keeps before ``buffer_updated`` returns, so one buffer per
    thread serves every connection of that thread's event loop.
    """

    __slots__ = ("data", "view")

    def __init__(self, size: int = RECEIVE_BUFFER_SIZE) -> None:
        self.data = bytearray(size)
        self.view = memoryview(self.data)


class _ThreadBuffer(threading.local):
    buffer: ReceiveBuffer | None = None


_thread_buffer = _ThreadBuffer()


def thread_receive_buffer() -> ReceiveBuffer:
    """This thread's receive buffer, made on first use."""
    buffer = _thread_buffer.buffer
    if buffer is None:
        buffer = _thread_buffer.buffer = ReceiveBuffer()
    return buffer


class BufferedReader(Protocol):
    """A codec read the way the event loop reads into it: a buffer lent, bytes announced."""

    @property
    def backlogged(self) -> bool: ...

    def get_buffer(self, sizehint: int = -1) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> list[Event]: ...


def feed(reader: BufferedReader, data: bytes | memoryview) -> list[Event]:
    """Events for ``data``, bytes in hand, pushed through ``reader``'s own receive buffer (and
    its per-turn frame cap: a backlog is drained before the next bytes go in)."""
    events: list[Event] = []
    view = memoryview(data)
    total = len(view)
    pos = 0
    while pos < total:
        room = reader.get_buffer()
        size = min(len(room), total - pos)
        room[:size] = view[pos : pos + size]
        pos += size
        events += reader.buffer_updated(size)
        while reader.backlogged:
            reader.get_buffer()
            events += reader.buffer_updated(0)
    return events


class ReadsBehindPending:
    """A codec's reads land in the thread's receive buffer, behind the input it has not parsed
    yet, so a frame cut by one read is whole in the next (both codecs share this)."""

    _rbuf: ReceiveBuffer
    _pending: bytes  # input not parsed yet: the start of a frame (or of the preface)
    _filled: int  # where the read that ``get_buffer`` lent space for starts in the buffer

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Room for the next read, behind what is left of the previous one."""
        pending = self._pending
        view = self._rbuf.view
        if not pending:
            self._filled = 0
            return view
        size = len(pending)
        view[:size] = pending
        self._filled = size
        return view[size:]


class FrameReceiver(ReadsBehindPending, abc.ABC):
    _dead: bool  # a connection error happened: input is ignored from then on
    _out: list[f.Chunk]
    _max_inbound_frame: int
    _preface_pending: bool
    _settings_seen: bool
    _block_sid: int
    _block_parts: list[bytes]
    _block_size: int
    _block_end_stream: bool
    _block_bad_priority: bool
    _max_block: int
    backlogged: bool  # whole frames are left in ``_pending``: call ``buffer_updated(0)`` again
    max_frames_per_turn: int

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """Events for the ``nbytes`` just read into the space ``get_buffer`` lent.

        A connection error queues GOAWAY and raises ``CodecProtocolError``; the connection
        ignores its input from then on. After ``max_frames_per_turn`` frames the rest waits
        (``backlogged``): the owner calls ``get_buffer`` and ``buffer_updated(0)`` for it.
        """
        events: list[Event] = []
        self.backlogged = False
        if self._dead:
            return events
        rbuf = self._rbuf
        buf = rbuf.data
        view = rbuf.view
        end = self._filled + nbytes
        pos = 0
        try:
            if self._preface_pending:
                head = bytes(view[: min(end, 24)])
                if head != f.PREFACE[: len(head)]:
                    raise CodecProtocolError("invalid connection preface")
                if end < 24:
                    self._pending = head
                    return events
                pos = 24
                self._preface_pending = False
            unpack = f.unpack_header
            max_frame = self._max_inbound_frame
            # Unpadded DATA payloads by stream, until a frame of another type or the end of
            # this read: see ``_data_runs``.
            runs: dict[int, list[memoryview]] = {}
            quota = self.max_frames_per_turn
            while end - pos >= 9:
                quota -= 1
                if quota < 0:
                    self.backlogged = True
                    break
                hi, lo, ftype, flags, sid = unpack(buf, pos)
                length = hi << 16 | lo
                if length > max_frame:
                    raise CodecProtocolError("frame larger than MAX_FRAME_SIZE", FRAME_SIZE_ERROR)
                start = pos + 9
                stop = start + length
                if stop > end:
                    break
                pos = stop
                sid &= STREAM_MASK
                if ftype == f.DATA and self._settings_seen and not self._block_sid:
                    if not length and not flags & f.END_STREAM:
                        self._control_frame()  # empty DATA does nothing but cost us a frame
                    if not flags & f.PADDED:
                        payloads = runs.get(sid)
                        if payloads is None:
                            if not flags & f.END_STREAM:
                                runs[sid] = [view[start:stop]]
                                continue
                        else:
                            payloads.append(view[start:stop])
                            if flags & f.END_STREAM:
                                self._data_run(sid, f.END_STREAM, runs.pop(sid), events)
                            continue
                    elif runs:
                        self._data_runs(runs, events)
                    try:
                        self._on_data(sid, flags, view[start:stop].tobytes(), events)
                    except StreamError as exc:
                        self._stream_error(exc, events)
                    continue
                if runs:
                    self._data_runs(runs, events)
                try:
                    self._frame(ftype, flags, sid, buf, view, start, length, events)
                except StreamError as exc:
                    self._stream_error(exc, events)
            if runs:
                self._data_runs(runs, events)
        except CodecProtocolError as exc:
            self._failed(exc)
            raise
        self._pending = view[pos:end].tobytes() if pos < end else b""
        return events

    def _data_runs(self, runs: dict[int, list[memoryview]], events: list[Event]) -> None:
        """Each stream's DATA payloads gathered since the last frame of another type, as one
        DATA frame per stream: the same bytes and flow-controlled length, in the same order
        within the stream. A read often holds several frames of each of several streams, as
        servers interleave their responses' frames (nghttpd, in 16 KiB frames): relaying a
        stream's share in one step costs a fraction of relaying each frame. Frame boundaries
        carry no meaning in HTTP/2 and windows count bytes, so no peer can tell; other frames
        (trailers, resets, settings) are never moved across DATA."""
        for sid, payloads in runs.items():
            self._data_run(sid, 0, payloads, events)
        runs.clear()

    def _data_run(
        self, sid: int, flags: int, payloads: list[memoryview], events: list[Event]
    ) -> None:
        payload = payloads[0].tobytes() if len(payloads) == 1 else b"".join(payloads)
        payloads.clear()  # views pin the receive buffer
        try:
            self._on_data(sid, flags, payload, events)
        except StreamError as exc:
            self._stream_error(exc, events)

    def receive_data(self, data: bytes) -> list[Event]:
        """Events for ``data``, bytes in hand (reads use ``get_buffer``/``buffer_updated``)."""
        return feed(self, data)

    def _frame(
        self,
        ftype: int,
        flags: int,
        sid: int,
        buf: bytearray,
        view: memoryview,
        start: int,
        length: int,
        events: list[Event],
    ) -> None:
        """One frame other than DATA in the common case; its payload is at ``start`` in ``buf``
        (``view`` is the same memory: slices of it copy the bytes once)."""
        if self._block_sid:
            if ftype != f.CONTINUATION or sid != self._block_sid:
                raise CodecProtocolError("header block interrupted")
            self._continuation(flags, view[start : start + length].tobytes(), events)
            return
        if not self._settings_seen:
            if ftype != f.SETTINGS or flags & f.ACK:
                raise CodecProtocolError("the peer's first frame is not SETTINGS")
            self._settings_seen = True
        if ftype == f.HEADERS:
            self._headers(sid, flags, view[start : start + length].tobytes(), events)
        elif ftype == f.WINDOW_UPDATE:
            self._control_frame()
            if length != 4:
                raise CodecProtocolError("WINDOW_UPDATE of wrong size", FRAME_SIZE_ERROR)
            self._on_window_update(sid, f.unpack_u32(buf, start)[0] & STREAM_MASK, events)
        elif ftype == f.SETTINGS:
            if sid:
                raise CodecProtocolError("SETTINGS on a stream")
            if flags & f.ACK:
                if length:
                    raise CodecProtocolError("SETTINGS ACK with a payload", FRAME_SIZE_ERROR)
                self._on_settings_ack()
                return
            self._control_frame()
            if length % 6:
                raise CodecProtocolError("SETTINGS of wrong size", FRAME_SIZE_ERROR)
            unpack = f.unpack_setting
            self._on_settings([unpack(buf, i) for i in range(start, start + length, 6)], events)
        elif ftype == f.RST_STREAM:
            if not sid:
                raise CodecProtocolError("RST_STREAM on stream 0")
            if length != 4:
                raise CodecProtocolError("RST_STREAM of wrong size", FRAME_SIZE_ERROR)
            self._on_rst_stream(sid, f.unpack_u32(buf, start)[0], events)
        elif ftype == f.PING:
            if sid:
                raise CodecProtocolError("PING on a stream")
            if length != 8:
                raise CodecProtocolError("PING of wrong size", FRAME_SIZE_ERROR)
            if not flags & f.ACK:
                self._control_frame()
                self._out.append(f.ping_ack_frame(view[start : start + 8].tobytes()))
        elif ftype == f.GOAWAY:
            if sid:
                raise CodecProtocolError("GOAWAY on a stream")
            if length < 8:
                raise CodecProtocolError("GOAWAY too short", FRAME_SIZE_ERROR)
            last, code = f.unpack_u32x2(buf, start)
            debug = view[start + 8 : start + length].tobytes()
            self._on_goaway(last & STREAM_MASK, code, debug, events)
        elif ftype == f.PRIORITY:
            if not sid:
                raise CodecProtocolError("PRIORITY on stream 0")
            self._control_frame()
            if length != 5:
                raise CodecProtocolError("PRIORITY of wrong size", FRAME_SIZE_ERROR)
            if f.unpack_u32(buf, start)[0] & STREAM_MASK == sid:
                raise StreamError(sid, PROTOCOL_ERROR, "stream depends on itself")
        elif ftype == f.DATA:
            self._on_data(sid, flags, view[start : start + length].tobytes(), events)
        elif ftype == f.PUSH_PROMISE:
            raise CodecProtocolError("PUSH_PROMISE, but push is disabled")
        elif ftype == f.CONTINUATION:
            raise CodecProtocolError("CONTINUATION without a header block")
        else:
            self._control_frame()  # unknown types are ignored (RFC 9113 section 4.1), not free

    def _headers(self, sid: int, flags: int, payload: bytes, events: list[Event]) -> None:
        if not sid:
            raise CodecProtocolError("HEADERS on stream 0")
        pos = 0
        end = len(payload)
        if flags & f.PADDED:
            if not end:
                raise CodecProtocolError("HEADERS too short for its padding", FRAME_SIZE_ERROR)
            end -= payload[0]
            pos = 1
        bad_priority = False
        if flags & f.PRIORITY_FLAG:
            if end - pos < 5:
                raise CodecProtocolError("HEADERS too short for its priority", FRAME_SIZE_ERROR)
            bad_priority = f.unpack_u32(payload, pos)[0] & STREAM_MASK == sid
            pos += 5
        if end < pos:
            raise CodecProtocolError("HEADERS padding too long")
        fragment = payload[pos:end] if pos or end != len(payload) else payload
        end_stream = bool(flags & f.END_STREAM)
        if flags & f.END_HEADERS:
            self._check_block_size(len(fragment))
            self._headers_complete(sid, end_stream, fragment, bad_priority, events)
            return
        self._block_sid = sid
        self._block_parts = [fragment]
        self._block_size = len(fragment)
        self._check_block_size(self._block_size)
        self._block_end_stream = end_stream
        self._block_bad_priority = bad_priority

    def _continuation(self, flags: int, payload: bytes, events: list[Event]) -> None:
        parts = self._block_parts
        parts.append(payload)
        self._block_size += len(payload)
        self._check_block_size(self._block_size)
        if len(parts) > MAX_CONTINUATIONS:
            raise CodecProtocolError("too many CONTINUATION frames", ENHANCE_YOUR_CALM)
        if flags & f.END_HEADERS:
            sid = self._block_sid
            self._block_sid = 0
            self._block_parts = []
            block = b"".join(parts)
            self._headers_complete(
                sid, self._block_end_stream, block, self._block_bad_priority, events
            )

    def _check_block_size(self, size: int) -> None:
        if size > self._max_block:
            raise CodecProtocolError("header block too large", ENHANCE_YOUR_CALM)

    # -- supplied by the connection ----------------------------------------------------------

    @abc.abstractmethod
    def _control_frame(self) -> None:
        """Charge a frame that carries no request to the peer's budget; raise when spent."""

    @abc.abstractmethod
    def _failed(self, exc: CodecProtocolError) -> None:
        """A connection error: queue GOAWAY and stop."""

    @abc.abstractmethod
    def _on_data(self, sid: int, flags: int, payload: bytes, events: list[Event]) -> None:
        """Supplied by the subclass."""

    @abc.abstractmethod
    def _headers_complete(
        self, sid: int, end_stream: bool, block: bytes, bad_priority: bool, events: list[Event]
    ) -> None:
        """Supplied by the subclass."""

    @abc.abstractmethod
    def _on_window_update(self, sid: int, increment: int, events: list[Event]) -> None:
        """Supplied by the subclass."""

    @abc.abstractmethod
    def _on_settings(self, settings: list[tuple[int, int]], events: list[Event]) -> None:
        """Supplied by the subclass."""

    @abc.abstractmethod
    def _on_settings_ack(self) -> None:
        """Supplied by the subclass."""

    @abc.abstractmethod
    def _on_rst_stream(self, sid: int, code: int, events: list[Event]) -> None:
        """Supplied by the subclass."""

    @abc.abstractmethod
    def _on_goaway(self, last_stream_id: int, code: int, debug: bytes, events: list[Event]) -> None:
        """Supplied by the subclass."""

    @abc.abstractmethod
    def _stream_error(self, exc: StreamError, events: list[Event]) -> None:
        """Supplied by the subclass."""
