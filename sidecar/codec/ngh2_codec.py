"""``Ngh2Codec``: ``H2Codec``'s interface over ngh2 (libnghttp2, compiled, sans-IO).

libnghttp2 parses frames, runs HPACK, validates messages (RFC 9113 section 8) and keeps both
flow-control windows; this module translates calls, and delivers libnghttp2's events to its
``sink`` (``EventSink``: the connection adapter, ``sidecar.http.h2conn``), one call per event,
without event objects of ours; until a sink is attached they are collected as objects, which
``buffer_updated`` and ``receive_data`` return as ``H2Codec``'s do.

What it keeps itself, and why:

- Which halves of each stream are open. ``h2conn`` asks ``streams.get(id)`` right after it
  sends or receives END_STREAM whether the stream is now closed; libnghttp2 only closes a stream
  when it has serialized the frame, and says so in an event of a later call.
- Output is serialized at once (``data_to_send`` after every call that queues a frame, but
  for a response's HEADERS without END_STREAM, which leave with what follows): that makes a
  new stream exist in libnghttp2 (it creates it when its HEADERS are serialized), keeps the
  windows ``local_flow_control_window`` reports exact, and hands ``h2conn`` DATA only ever
  within the window it was told of, so backpressure across the proxy works as with our codec:
  automatic WINDOW_UPDATEs are off and the receive windows reopen only through
  ``acknowledge_received_data``, when the other side has taken the bytes. Batching a turn's
  small DATA into one ``data_to_send`` was measured and not kept: an empty call costs about
  2,200 instructions, a batched send asks libnghttp2 for what it holds unserialized on every
  window check, and in callgrind counts of real traffic it saved nothing visible (grpc-16
  580,114 and 584,337 instructions per call batched, 547,088 and 569,557 not). Batching
  large DATA costs more: ngh2 grows one call's output in a bytearray, and reallocs past an
  eighth of growth copied each 64 KiB body 0.8 times more (h2-64k: 260,100 instructions of
  memcpy per request, 209,016 serialized frame by frame).
- What DATA costs here that it does not cost our codec: copies. libnghttp2's binding copies a
  received payload into a bytes object (as ours does), then on the way out copies each payload
  into its output bytearray and that into the bytes ``data_to_send`` returns; ours writes a
  payload by ``writelines`` beside its frame header, uncopied. That is two more copies of every
  body byte relayed, which no call of the binding avoids (its output is one bytes object).
  Callgrind counts a ``rep movsb`` once per byte, so on h2-64k they are the whole instruction
  gap between the codecs (``bench/profiles.md``); a CPU moves those bytes 32 or 64 a cycle.
- A read's last request or response event is announced (``on_last_message``: ``h2conn``
  writes a stream that ends there at once, for latency), but not in a read that filled the
  receive buffer: another follows at once, and libnghttp2 reports each DATA frame (ours
  merges a stream's frames of one read), so the last event of a full read often ended a
  stream and split a burst's writes to that client in two (h2-64k: 0.670 write calls per
  request, against 0.520 on our codec; 0.516 since).
- GOAWAY is an event; sending one closes nothing, as in ``H2Codec``. libnghttp2 itself closes
  the streams a received GOAWAY leaves unprocessed (REFUSED_STREAM): the adapter has already
  closed them as refused on the GOAWAY event (the replay), so those closes are dropped here.

The hostile-client defences are the same as our codec's, shared where they are code:

- Frames per turn: a client's read is walked frame header by frame header (9 bytes each,
  payloads skipped; ``sidecar.codec.walk``) before libnghttp2 sees it; after
  ``max_frames_per_turn`` frames the rest waits in ``_pending`` (``backlogged``), as in
  ``sidecar.codec.receive``. Reads under
  ``9 * max_frames_per_turn`` bytes cannot hold more frames than that and are not counted.
  An upstream's reads (``client_side``) go to libnghttp2 whole, unwalked: upstreams are the
  mesh's own services, and the Python work a read makes is per event (messages and their
  DATA), which the walk would not make cheaper, while it costs every read.
- The ``Budget``: frames that carry no request (SETTINGS, PING, PRIORITY, WINDOW_UPDATE, empty
  DATA, unknown types) are counted during that walk and charged once per read, so a flood ends
  with GOAWAY
  ENHANCE_YOUR_CALM before libnghttp2 parses it; RST_STREAM is charged on its event, once it
  is known whether the stream was open (a reset) or closed (a control frame). libnghttp2's own
  limits (its reset rate limit, "glitch" limit and queued-ACK cap) stay on as a backstop above
  the budget's defaults, so the budget (configurable per listener, and counted in stats)
  decides first.
- Header blocks are checked by ``sidecar.codec.validate.problem``, as our codec checks them
  (libnghttp2 accepts some that RFC 9110 forbids: a lower case method, raw bytes in
  ``:path``); a bad request is reset with PROTOCOL_ERROR before the application sees it.
  Content-length against the body, both ways, is libnghttp2's own HTTP messaging check: the
  stream is reset with PROTOCOL_ERROR and the excess DATA never delivered.
- ``header_block_open`` comes from the walk: the last frame header read was HEADERS or
  CONTINUATION without END_HEADERS.
- Requests reset within the read that opened them (the rapid reset attack) are withheld from
  a sink that asks (``screen_resets``): never routed. Most reads that carry requests also
  carry the closes of streams answered before, so a read is searched for resets only when the
  peer reset a stream in it or libnghttp2 answered it with an RST_STREAM of its own.

Differences from our codec, none of which the proxy relies on: a client that opens a stream
past a MAX_CONCURRENT_STREAMS it has acknowledged gets GOAWAY PROTOCOL_ERROR (as nghttpx
answers it), where ours refuses that stream alone; a header block libnghttp2
rejects resets its stream without an event (ours does the same for streams the application
never saw); streams opened past our final GOAWAY are ignored rather than refused (RFC 9113
section 6.8 allows either); WINDOW_UPDATE is sent when half a window was acknowledged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Hashable
from typing import Any

import ngh2

from sidecar.codec import validate
from sidecar.codec.connection import Budget, RemoteSettings
from sidecar.codec.errors import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    NO_ERROR,
    PROTOCOL_ERROR,
    CodecProtocolError,
    CodecStreamClosedError,
    CodecUsageError,
)
from sidecar.codec.events import Event, EventList, EventSink, Headers
from sidecar.codec.frames import DEFAULT_WINDOW, Chunk, goaway_frame
from sidecar.codec.receive import (
    MAX_CONTINUATIONS,
    MAX_FRAMES_PER_TURN,
    ReadsBehindPending,
    feed,
    thread_receive_buffer,
)
from sidecar.codec.walk import (
    CHARGE,
    CONTINUATION,
    END_HEADERS,
    HEADERS,
    NO_CHARGE,
    resets_in,
    walk,
)

VERSION = ngh2.__version__
MAX_STREAM_ID = 2**31 - 1

_REQUEST = ngh2.RequestReceived
_RESPONSE = ngh2.ResponseReceived
_DATA = ngh2.DataReceived
_TRAILERS = ngh2.TrailersReceived
_RESET = ngh2.StreamReset
_CLOSED = ngh2.StreamClosed
_WINDOW = ngh2.WindowUpdated
_SETTINGS = ngh2.SettingsReceived
_GOAWAY = ngh2.GoAwayReceived
_CONNECTION_CLOSED = ngh2.ConnectionClosed
# Events that carry a request or a response: a read's last one is announced (``on_last_message``).
_MESSAGES = frozenset({_REQUEST, _RESPONSE, _DATA, _TRAILERS})
_NONE: frozenset[int] = frozenset()

# libnghttp2's limits when the budget is ours: ten times its defaults, a backstop only.
_BACKSTOP_RESETS = (10_000, 330)
_BACKSTOP_GLITCHES = (100_000, 3_300)
PREFACE_SIZE = 24

# Verdicts on header blocks seen lately, by the block: a client or upstream sends the same
# block again and again, and ``validate.problem`` is the costliest part of handling one.
_VERDICT_CACHE_SIZE = 512
_verdicts: dict[tuple[int, tuple[Any, ...]], str | None] = {}
_UNSEEN = ""  # not a verdict: a block not judged yet
_REQUEST_BLOCK = validate.REQUEST
_RESPONSE_BLOCK = validate.RESPONSE
_TRAILERS_BLOCK = validate.TRAILERS


def _problem(kind: int, headers: tuple[Any, ...]) -> str | None:
    key = (kind, headers)
    try:
        return _verdicts[key]
    except KeyError:
        pass
    found = validate.problem(kind, headers)
    if len(_verdicts) >= _VERDICT_CACHE_SIZE:
        _verdicts.clear()
    _verdicts[key] = found
    return found


class _Stream:
    """Which halves are open: a stream leaves ``Ngh2Codec.streams`` when both are closed
    (so one found there is never ``closed``, the attribute ``h2conn`` asks).

    Made for every request, so made without an ``__init__``: a new stream has the class's
    values until one changes."""

    closed = False
    local_open = True
    remote_open = True
    headers_sent = False
    acked = 0  # bytes the application took: progress, even without a WINDOW_UPDATE
    opened = 0.0  # when the peer opened it, by the budget's clock (with a budget only)


class Ngh2Codec(ReadsBehindPending):
    def __init__(
        self,
        *,
        client_side: bool,
        initial_window_size: int = DEFAULT_WINDOW,
        max_concurrent_streams: int = 100,
        max_header_list_size: int = 64 * 1024,
        max_frame_size: int = 16384,
        budget: Budget | None = None,
        max_frames_per_turn: int = MAX_FRAMES_PER_TURN,
    ) -> None:
        if budget is None:
            config = ngh2.Configuration(
                auto_window_update=False,
                max_inbound_header_list_size=max_header_list_size,
                max_continuations=MAX_CONTINUATIONS,
            )
        else:
            config = ngh2.Configuration(
                auto_window_update=False,
                max_inbound_header_list_size=max_header_list_size,
                max_continuations=MAX_CONTINUATIONS,
                stream_reset_rate_limit=_BACKSTOP_RESETS,
                glitch_rate_limit=_BACKSTOP_GLITCHES,
                # A turn acknowledges at most this many SETTINGS and PINGs, all sent with it.
                max_outbound_ack=max(max_frames_per_turn, 1000),
            )
        self.client_side = client_side
        self._conn = ngh2.Connection(
            ngh2.Role.CLIENT if client_side else ngh2.Role.SERVER, config
        )
        self._settings = {
            ngh2.Setting.ENABLE_PUSH: 0,
            ngh2.Setting.INITIAL_WINDOW_SIZE: initial_window_size,
            ngh2.Setting.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            ngh2.Setting.MAX_HEADER_LIST_SIZE: max_header_list_size,
        }
        if max_frame_size != 16384:  # the default need not be said
            self._settings[ngh2.Setting.MAX_FRAME_SIZE] = max_frame_size
        self.streams: dict[int, _Stream] = {}
        self.remote_settings = RemoteSettings()
        self.highest_inbound_stream_id = 0
        self._out: list[Chunk] = []
        # libnghttp2 consumes all input before ``receive_data`` returns (DATA payloads are
        # copied into their events), so reads share the thread's buffer as with our codec.
        self._rbuf = thread_receive_buffer()
        self._pending = b""  # whole frames left for a later turn, or a frame header's start
        self._filled = 0
        self._read_full = False  # the last read filled the receive buffer
        # Bytes before the next frame header: the client's preface, or the rest of a payload.
        self._skip = 0 if client_side else PREFACE_SIZE
        self._walk_free = 9 * max_frames_per_turn  # reads this small need no frame count
        self.budget = budget
        self.max_frames_per_turn = max_frames_per_turn
        self.backlogged = False
        self.header_block_open = False  # a header block waits for its CONTINUATION frames
        self._data_sends = 0  # DATA sends so far: each earns the peer control frames
        self._streams_completed = 0  # streams that ended without a reset: each earns a reset
        # Streams the application knew that ended in a reset, as ``H2Codec.streams_reset``.
        self.streams_reset = 0
        # Streams reset already counted (by us, or by the peer while open), until libnghttp2's
        # close event for them: any other reset it reports was its own, for the peer's fault.
        self._settled: set[int] = set()
        self._goaway_received = False
        self._goaway_sent = False
        self._dead = False
        # Events go straight to ``sink``, one call each; until an owner attaches itself there,
        # they are collected as objects for ``buffer_updated`` to return.
        self._collected = EventList()
        self.sink: EventSink = self._collected
        # Requests reset within the read that opened them are withheld (``on_request_withdrawn``).
        self.screen_resets = False

    # -- sending ---------------------------------------------------------------------------

    def _serialize(self) -> bytes:
        try:
            data = self._conn.data_to_send()
        except ngh2.ConnectionStateError:  # failed: what it had to say is already out
            return b""
        if data:
            self._out.append(data)
        return data

    def initiate_connection(self) -> None:
        self._conn.initiate_connection(self._settings)
        self._serialize()

    def increment_flow_control_window(self, increment: int, stream_id: int | None = None) -> None:
        if stream_id:
            raise CodecUsageError("only the connection window is managed this way")
        conn = self._conn
        conn.set_local_window_size(conn.local_window_size + increment)
        self._serialize()

    def data_to_send(self) -> bytes:
        self._serialize()
        out = self._out
        if not out:
            return b""
        data = b"".join(out) if len(out) > 1 else bytes(out[0])
        out.clear()
        return data

    def take_output(self) -> list[Chunk]:
        self._serialize()
        out = self._out
        if not out:
            return out
        self._out = []
        return out

    @property
    def max_outbound_frame_size(self) -> int:
        return self.remote_settings.max_frame_size

    def get_next_available_stream_id(self) -> int:
        return self._conn.next_stream_id

    def local_flow_control_window(self, stream_id: int) -> int:
        conn = self._conn
        try:
            window = conn.stream_remote_window_size(stream_id)
        except ngh2.NGH2Error:
            raise CodecStreamClosedError(stream_id) from None
        connection = conn.remote_window_size
        return window if window < connection else connection

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> None:
        if self._dead:
            raise CodecUsageError("connection failed")
        conn = self._conn
        stream = self.streams.get(stream_id)
        try:
            if stream is None:
                if not self.client_side or stream_id != conn.next_stream_id:
                    raise CodecStreamClosedError(stream_id)
                if len(self.streams) >= self.remote_settings.max_concurrent_streams:
                    raise CodecUsageError("peer's MAX_CONCURRENT_STREAMS reached")
                conn.send_request(headers, end_stream=end_stream)
                stream = self.streams[stream_id] = _Stream()
                stream.headers_sent = True
            elif not stream.local_open:
                raise CodecStreamClosedError(stream_id)
            elif stream.headers_sent:
                conn.send_trailers(stream_id, headers)
                end_stream = True
            elif headers[0][1][:1] == b"1":  # informational: the final response follows
                conn.send_informational_response(stream_id, headers)
            else:
                conn.send_response(stream_id, headers, end_stream=end_stream)
                stream.headers_sent = True
                if not end_stream:
                    # The stream exists and no window moved: the frame can wait for the
                    # body's, or for ``take_output``.
                    return
        except ngh2.NGH2Error as exc:
            raise CodecStreamClosedError(stream_id) from exc
        data = conn.data_to_send()
        if data:
            self._out.append(data)
        if end_stream:
            stream.local_open = False
            if not stream.remote_open:
                del self.streams[stream_id]
                self._streams_completed += 1

    def send_data(self, stream_id: int, data: Chunk, end_stream: bool = False) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or not stream.local_open or self._dead:
            raise CodecStreamClosedError(stream_id)
        conn = self._conn
        try:
            conn.send_data(stream_id, data, end_stream=end_stream)
        except ngh2.NGH2Error as exc:
            raise CodecStreamClosedError(stream_id) from exc
        self._data_sends += 1
        out = conn.data_to_send()
        if out:
            self._out.append(out)
        if end_stream:
            stream.local_open = False
            if not stream.remote_open:
                del self.streams[stream_id]
                self._streams_completed += 1

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        if self.streams.pop(stream_id, None) is None:
            raise CodecStreamClosedError(stream_id)
        if self._dead:
            return
        self._settled.add(stream_id)
        try:  # RST_STREAM is serialized with what is taken next (``take_output``)
            self._conn.reset_stream(stream_id, error_code)
        except ngh2.NGH2Error as exc:  # already closed inside libnghttp2: nothing to send
            raise CodecStreamClosedError(stream_id) from exc

    def send_goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        if self._dead:
            return
        if last_stream_id >= MAX_STREAM_ID and not error_code:
            # The first of a graceful shutdown's two GOAWAYs: libnghttp2's own name for it,
            # which (unlike a plain GOAWAY) leaves the second one possible.
            self._conn.send_shutdown_notice()
        else:
            try:
                self._conn.send_goaway(error_code, last_stream_id=last_stream_id)
            except ngh2.ConnectionStateError:  # already closing: that GOAWAY stands
                return
        self._goaway_sent = True
        self._serialize()

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        """The application took these bytes. libnghttp2 returns them to the connection window
        even when the stream has closed since, so no credit is lost to a reset."""
        if acknowledged_size < 0:
            raise ValueError("cannot acknowledge a negative size")
        if self._dead or not acknowledged_size:
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.acked += acknowledged_size
        try:  # a WINDOW_UPDATE, when due, leaves with what is taken next (``take_output``)
            self._conn.acknowledge_received_data(acknowledged_size, stream_id)
        except ngh2.ConnectionStateError:  # closing (a GOAWAY went both ways): nothing to reopen
            return

    def _remote_ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.remote_open = False
            if not stream.local_open:
                del self.streams[stream_id]
                self._streams_completed += 1

    def progress_mark(self, stream_id: int) -> Hashable:
        """A value that changes when the stream moves: bytes either way, a window given."""
        stream = self.streams.get(stream_id)
        if stream is None:
            return None
        conn = self._conn
        try:
            sent = conn.stream_remote_window_size(stream_id)
            received = conn.stream_local_window_size(stream_id)
        except ngh2.NGH2Error:
            return None
        return (sent, received, stream.acked)

    # -- the budget ------------------------------------------------------------------------

    def _control_frames(self, frames: int) -> None:
        budget = self.budget
        if budget is not None and not budget.control_frame(self._data_sends, frames):
            self._give_up(CodecProtocolError("too many control frames", ENHANCE_YOUR_CALM))

    def _reset_charged(self, opened: float | None = None) -> None:
        budget = self.budget
        if budget is not None and not budget.stream_reset(self._streams_completed, opened):
            self._give_up(CodecProtocolError("too many stream resets", ENHANCE_YOUR_CALM))

    def _give_up(self, exc: CodecProtocolError) -> None:
        """A connection error of ours: GOAWAY with its code after what is queued, then stop."""
        self._dead = True
        self._serialize()
        self._out.append(goaway_frame(self.highest_inbound_stream_id, exc.error_code))
        raise exc

    def _refuse(self, stream_id: int) -> None:
        """A malformed message: RST_STREAM PROTOCOL_ERROR, as ``H2Codec`` answers one; a
        stream the application knew is reported reset."""
        with contextlib.suppress(ngh2.NGH2Error):  # already closed there: nothing to send
            self._conn.reset_stream(stream_id, PROTOCOL_ERROR)
        self._settled.add(stream_id)
        if self.streams.pop(stream_id, None) is not None:
            self.streams_reset += 1
            self.sink.on_stream_reset(stream_id, PROTOCOL_ERROR, False)
        self._reset_charged()

    # -- receiving -------------------------------------------------------------------------

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """Events for the ``nbytes`` just read into the space ``get_buffer`` lent, as objects
        (none when an owner has attached itself as ``sink``: they went to it)."""
        try:
            self.read(nbytes)
        except CodecProtocolError:
            self._collected.take()  # a failed read has no events
            raise
        return self._collected.take()

    def read(self, nbytes: int) -> None:
        """Deliver the events of the ``nbytes`` just read into the space ``get_buffer`` lent to
        ``sink``; at most ``max_frames_per_turn`` frames are handled, the rest waits
        (``backlogged``)."""
        self.backlogged = False
        if self._dead:
            return
        end = self._filled + nbytes
        # A read that filled the buffer is followed at once by another (the event loop reads
        # on while reads come back full): its last message is not the burst's, so it is not
        # announced, and what it sends leaves with the turn's writes instead of splitting them.
        self._read_full = end == len(self._rbuf.data)
        if self.client_side:  # an upstream of ours: its reads go to libnghttp2 whole
            self._receive(self._rbuf.view[:nbytes])
            return
        pos = self._skip
        cut = end
        if pos >= end:
            self._skip = pos - end
        else:
            quota = self.max_frames_per_turn if end - pos > self._walk_free else 0
            charge = CHARGE if self.budget is not None else NO_CHARGE
            pos, charged, ftype, flags = walk(self._rbuf.data, pos, end, quota, charge)
            if quota and pos + 9 <= end:
                self.backlogged = True
            if charged:
                # Charged for the whole read at once, before libnghttp2 parses any of it: a
                # flood still ends here, and a read of ten WINDOW_UPDATEs costs one charge.
                self._control_frames(charged)
            if ftype >= 0:
                self.header_block_open = ftype in (HEADERS, CONTINUATION) and not (
                    flags & END_HEADERS
                )
            if pos <= end:  # at a frame boundary: the rest is whole frames or a header's start
                cut = pos
                self._skip = 0
            else:
                self._skip = pos - end
        view = self._rbuf.view
        self._pending = view[cut:end].tobytes() if cut < end else b""
        self._receive(view[:cut])

    def receive_data(self, data: bytes | memoryview) -> list[Event]:
        """Events for ``data``, bytes in hand (reads use ``get_buffer``/``buffer_updated``)."""
        return feed(self, data)

    def _receive(self, data: memoryview) -> None:
        if self._dead:
            return
        conn = self._conn
        try:
            conn.receive_data(data)
        except ngh2.NGH2Error as exc:
            # libnghttp2 gave up on the connection (a resource limit, such as the header list
            # size): it may not have queued a GOAWAY, so one says why.
            self._dead = True
            code = ENHANCE_YOUR_CALM if isinstance(exc, ngh2.DenialOfServiceError) else (
                PROTOCOL_ERROR
            )
            self._serialize()
            self._out.append(goaway_frame(self.highest_inbound_stream_id, code))
            raise CodecProtocolError(str(exc), code) from exc
        # Acknowledgements (SETTINGS, PING), libnghttp2's own GOAWAY and RST_STREAMs.
        answer = self._serialize()
        # The loop tests exact types (``is``), which mypy does not narrow by: events are Any.
        incoming: list[Any] = conn.events()
        if not incoming:
            if not (self._goaway_received or self._goaway_sent or conn.want_read):
                # libnghttp2 queued GOAWAY for a connection error without an event for it yet.
                self._dead = True
                self._serialize()
                raise CodecProtocolError("HTTP/2 connection error", PROTOCOL_ERROR)
            return
        sink = self.sink
        streams = self.streams
        # When this read's requests were opened, once per read: a reset of one open for a
        # second is not a rapid reset (``FrameBudget.stream_reset``).
        budget = self.budget
        now = budget.clock() if budget is not None else 0.0
        doomed: Collection[int] = _NONE
        withheld: set[int] = set()
        if self.screen_resets:
            # Streams close in most reads that carry requests, their responses sent: a read
            # is searched for resets only if the peer reset a stream or libnghttp2 did (an
            # RST_STREAM of its own in the answer).
            kinds = set(map(type, incoming))
            if _REQUEST in kinds and (
                _RESET in kinds or (answer and _CLOSED in kinds and resets_in(answer))
            ):
                doomed = self._reset_in(incoming)
        last: object = None
        if not self._read_full:
            # Searched as objects: mypyc (PILOTFISH_MYPYC) cannot compile reversed(list[Any]).
            searched: list[object] = incoming
            for candidate in reversed(searched):
                if type(candidate) in _MESSAGES:
                    last = candidate
                    break
        settled = self._settled
        # Branches in the order of how often they are taken; a stream that ends here leaves
        # ``streams`` before its owner hears of it.
        for event in incoming:
            kind = type(event)
            if kind is _CLOSED:
                sid = event.stream_id
                if event.error_code or settled or sid in streams:  # not a stream that completed
                    self._closed(sid, event.error_code, withheld)
            elif kind is _DATA:
                if event is last:
                    sink.on_last_message()
                payload = event.data
                sid = event.stream_id
                stream = streams.get(sid)
                if stream is None:  # refused here, in this read: nobody takes the bytes
                    conn.acknowledge_received_data(len(payload), sid)
                elif sid in withheld:  # as good as refused
                    self.acknowledge_received_data(len(payload), sid)
                    if event.end_stream:
                        self._remote_ended(sid)
                elif event.end_stream:
                    stream.remote_open = False
                    if not stream.local_open:
                        del streams[sid]
                        self._streams_completed += 1
                    sink.on_data_received(sid, payload, len(payload), True)
                else:
                    sink.on_data_received(sid, payload, len(payload), False)
            elif kind is _REQUEST:
                if event is last:
                    sink.on_last_message()
                sid = event.stream_id
                headers = event.headers
                if sid > self.highest_inbound_stream_id:
                    self.highest_inbound_stream_id = sid
                if _verdicts.get((_REQUEST_BLOCK, headers), _UNSEEN) is not None and (
                    _problem(_REQUEST_BLOCK, headers) is not None
                ):
                    self._refuse(sid)
                    continue
                stream = streams[sid] = _Stream()
                stream.opened = now
                end_stream = event.end_stream
                if end_stream:
                    stream.remote_open = False
                if sid in doomed:
                    withheld.add(sid)
                    sink.on_request_withdrawn(sid)
                else:
                    sink.on_request_received(sid, list(headers), end_stream)
            elif kind is _RESPONSE:
                if event is last:
                    sink.on_last_message()
                sid = event.stream_id
                headers = event.headers
                if _verdicts.get((_RESPONSE_BLOCK, headers), _UNSEEN) is not None and (
                    _problem(_RESPONSE_BLOCK, headers) is not None
                ):
                    self._refuse(sid)
                elif event.end_stream:
                    self._remote_ended(sid)
                    sink.on_response_received(sid, list(headers), True)
                else:
                    sink.on_response_received(sid, list(headers), False)
            elif kind is _TRAILERS:
                if event is last:
                    sink.on_last_message()
                sid = event.stream_id
                headers = event.headers
                if _verdicts.get((_TRAILERS_BLOCK, headers), _UNSEEN) is not None and (
                    _problem(_TRAILERS_BLOCK, headers) is not None
                ):
                    self._refuse(sid)
                else:
                    self._remote_ended(sid)
                    if sid not in withheld:
                        sink.on_trailers_received(sid, list(headers))
            elif kind is _WINDOW:
                sink.on_window_updated(event.stream_id, event.increment)
            elif kind is _RESET:
                sid = event.stream_id
                reset = streams.pop(sid, None)
                if reset is not None:
                    self.streams_reset += 1
                    settled.add(sid)
                    if sid not in withheld:
                        sink.on_stream_reset(sid, event.error_code, True)
                    self._reset_charged(None if self.client_side else reset.opened)
                else:
                    self._control_frames(1)  # a reset of a closed stream does nothing
            elif kind is _SETTINGS:
                changed = dict(event.settings)
                self._remote_settings_changed(changed)
                sink.on_settings_received(changed)
            elif kind is _GOAWAY:
                self._goaway_received = True
                debug = event.debug_data or None
                sink.on_goaway_received(event.error_code, event.last_stream_id, debug)
            elif kind is _CONNECTION_CLOSED and event.error_code and not self._goaway_received:
                self._dead = True
                raise CodecProtocolError(
                    f"HTTP/2 connection error: {event.debug_data.decode(errors='replace')}",
                    event.error_code or PROTOCOL_ERROR,
                )

    def _closed(self, sid: int, error_code: int, withheld: Collection[int]) -> None:
        """libnghttp2 closed a stream that did not simply complete."""
        if self.streams.pop(sid, None) is not None:
            # Closed by libnghttp2 while we thought it open: it reset the stream (a malformed
            # message, a GOAWAY that left it unprocessed, a failed send).
            self.streams_reset += 1
            if sid not in withheld:
                self.sink.on_stream_reset(sid, error_code or CANCEL, False)
            if error_code != NO_ERROR:
                self._reset_charged()  # as we charge a reset we make for the peer
        elif sid in self._settled:
            self._settled.discard(sid)
        elif error_code != NO_ERROR:
            # libnghttp2 reset a stream before the application saw it (a request it found
            # malformed, a stream past the limit): charged as our own refusals.
            self._reset_charged()

    def _reset_in(self, incoming: list[Any]) -> set[int]:
        """The streams a read resets: by the peer, or by libnghttp2 for a malformed message."""
        return {
            event.stream_id
            for event in incoming
            if type(event) is _RESET or (type(event) is _CLOSED and event.error_code)
        }

    def _remote_settings_changed(self, changed: dict[int, int]) -> None:
        settings = self.remote_settings
        for code, value in changed.items():
            if code == 1:
                settings.header_table_size = value
            elif code == 3:
                settings.max_concurrent_streams = value
            elif code == 4:
                settings.initial_window_size = value
            elif code == 5:
                settings.max_frame_size = value
            elif code == 6:
                settings.max_header_list_size = value
