"""HTTP/2 frame layout (RFC 9113 section 4 and 6): type codes, flags, and frame writers.

Writers return bytes ready for the socket; parsing happens in place in ``connection.py``.
"""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Setting codes (RFC 9113 section 6.5.2).
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6

# What goes to the socket: frame bytes, or a view of a payload too large to copy again.
Chunk = bytes | memoryview

DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_SIZE_LIMIT = 2**24 - 1

# Frame header: 24-bit length as a byte and a short, type, flags, stream id.
HEADER = struct.Struct(">BHBBL")
_U32 = struct.Struct(">L")
_U32x2 = struct.Struct(">LL")
_SETTING = struct.Struct(">HL")

unpack_header = HEADER.unpack_from
unpack_u32 = _U32.unpack_from
unpack_u32x2 = _U32x2.unpack_from
unpack_setting = _SETTING.unpack_from


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return HEADER.pack(length >> 16, length & 0xFFFF, ftype, flags, stream_id)


def settings_frame(settings: dict[int, int]) -> bytes:
    body = b"".join(_SETTING.pack(code, value) for code, value in settings.items())
    return frame_header(len(body), SETTINGS, 0, 0) + body


SETTINGS_ACK = frame_header(0, SETTINGS, ACK, 0)


def window_update_frame(stream_id: int, increment: int) -> bytes:
    return frame_header(4, WINDOW_UPDATE, 0, stream_id) + _U32.pack(increment)


def rst_stream_frame(stream_id: int, error_code: int) -> bytes:
    return frame_header(4, RST_STREAM, 0, stream_id) + _U32.pack(error_code)


def goaway_frame(last_stream_id: int, error_code: int, debug: bytes = b"") -> bytes:
    return (
        frame_header(8 + len(debug), GOAWAY, 0, 0) + _U32x2.pack(last_stream_id, error_code) + debug
    )


def ping_ack_frame(opaque: bytes) -> bytes:
    return frame_header(8, PING, ACK, 0) + opaque


def headers_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> list[bytes]:
    """A HEADERS frame, followed by CONTINUATION frames when the block does not fit in one."""
    flags = END_STREAM if end_stream else 0
    size = len(block)
    if size <= max_frame:
        return [frame_header(size, HEADERS, flags | END_HEADERS, stream_id), block]
    out = [frame_header(max_frame, HEADERS, flags, stream_id), block[:max_frame]]
    pos = max_frame
    while pos < size:
        chunk = block[pos : pos + max_frame]
        pos += len(chunk)
        out.append(
            frame_header(len(chunk), CONTINUATION, END_HEADERS if pos >= size else 0, stream_id)
        )
        out.append(chunk)
    return out
