"""A hostile HTTP/2 client: frames written by hand with ``struct``, sent on a raw socket.

Nothing here checks what it sends: it is for frames no well-behaved library would produce
(floods, resets on streams just opened, windows of zero, malformed header blocks).
What the sidecar sends back is parsed just enough to find GOAWAY and RST_STREAM.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
INITIAL_WINDOW_SIZE = 0x4

NO_ERROR, PROTOCOL_ERROR, CANCEL, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x8, 0x7, 0xB

Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"), (b":path", b"/")]


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return struct.pack(">BHBBL", length >> 16, length & 0xFFFF, ftype, flags, sid) + payload


def settings(values: dict[int, int] | None = None) -> bytes:
    body = b"".join(struct.pack(">HL", k, v) for k, v in (values or {}).items())
    return frame(SETTINGS, 0, 0, body)


def ping(opaque: int = 0) -> bytes:
    return frame(PING, 0, 0, struct.pack(">Q", opaque))


def rst_stream(sid: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, sid, struct.pack(">L", code))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">L", increment))


def priority(sid: int, depends_on: int = 0, weight: int = 15) -> bytes:
    return frame(PRIORITY, 0, sid, struct.pack(">LB", depends_on, weight))


class Client:
    """One raw connection to the sidecar. ``send`` never reads; ``frames`` reads what came."""

    def __init__(
        self, address: str, initial: dict[int, int] | None = None, *, connect: bool = True
    ) -> None:
        """``connect=False`` leaves the connecting to ``connect()``, so that an attack can be
        built with this client's header encoder first: building 100,000 frames on a loaded
        machine takes longer than the sidecar lets a connection sit idle."""
        self.address = address
        self.initial = initial
        self.encoder = hpack.Encoder()
        self._inbox = b""
        self.seen: list[Frame] = []
        self.closed_by_peer = False
        if connect:
            self.connect()

    def connect(self) -> None:
        host, port = self.address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.sendall(PREFACE + settings(self.initial) + frame(SETTINGS, ACK, 0))

    def headers(
        self, sid: int, fields: list[tuple[bytes, bytes]], end_stream: bool = True
    ) -> bytes:
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        return frame(HEADERS, flags, sid, self.encoder.encode(fields))

    def send(self, data: bytes) -> bool:
        """False once the sidecar has closed the connection (the attack is over)."""
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed_by_peer = True
            return False
        return True

    def flood(self, unit: bytes, count: int, seconds: float = 20.0, batch: int = 64 * 1024) -> int:
        """Send ``unit`` up to ``count`` times in batches of about ``batch`` bytes, never
        reading; stops when the sidecar closes or after ``seconds``. Returns units sent."""
        per_batch = max(1, batch // len(unit))
        chunk = unit * per_batch
        sent = 0
        deadline = time.monotonic() + seconds
        while sent < count and time.monotonic() < deadline:
            n = min(per_batch, count - sent)
            if not self.send(chunk if n == per_batch else unit * n):
                break
            sent += n
        return sent

    def frames(
        self, seconds: float = 5.0, until: Callable[[list[Frame]], bool] | None = None
    ) -> list[Frame]:
        """(type, flags, stream, payload) of everything read until EOF, ``seconds``, or
        ``until`` the frames so far satisfy it. Frames once returned are kept in ``seen``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until is not None and until(self._parse()):
                break
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            except OSError:
                self.closed_by_peer = True
                break
            if not data:
                self.closed_by_peer = True
                break
            self._inbox += data
        return self._parse()

    def _parse(self) -> list[Frame]:
        buf, pos = self._inbox, 0
        while len(buf) - pos >= 9:
            hi, lo, ftype, flags, sid = struct.unpack_from(">BHBBL", buf, pos)
            length = hi << 16 | lo
            if len(buf) - pos - 9 < length:
                break
            self.seen.append((ftype, flags, sid & 0x7FFFFFFF, buf[pos + 9 : pos + 9 + length]))
            pos += 9 + length
        self._inbox = buf[pos:]
        return self.seen

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def goaway_codes(frames: list[Frame]) -> list[int]:
    return [struct.unpack(">LL", p[:8])[1] for t, _, _, p in frames if t == GOAWAY]


def resets(frames: list[Frame]) -> dict[int, int]:
    """Stream id -> RST_STREAM error code."""
    return {sid: struct.unpack(">L", p)[0] for t, _, sid, p in frames if t == RST_STREAM}


def statuses(frames: list[Frame]) -> dict[int, bytes]:
    """Stream id -> :status of the responses read (header blocks in one frame each)."""
    decoder = hpack.Decoder()
    out: dict[int, bytes] = {}
    for ftype, _, sid, payload in frames:
        if ftype == HEADERS:
            fields = decoder.decode(payload, raw=True)
            for name, value in fields:
                if name == b":status":
                    out[sid] = value
    return out
