"""Errors of the lean codec, subclasses of h2's so a caller written for ``h2`` catches them."""

from __future__ import annotations

import h2.errors
import h2.exceptions

# RFC 9113 section 7.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD


class CodecProtocolError(h2.exceptions.ProtocolError):
    """The peer broke HTTP/2: a connection error. GOAWAY(``error_code``) is already queued."""

    def __init__(self, message: str, error_code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.error_code = h2.errors.ErrorCodes(error_code)


class CodecStreamClosedError(h2.exceptions.StreamClosedError):
    """We tried to act on a stream that is closed (or was never opened)."""


class CodecUsageError(h2.exceptions.ProtocolError):
    """We (not the peer) asked for something HTTP/2 forbids, such as overrunning a window."""


class StreamError(Exception):
    """Internal: the peer broke HTTP/2 on one stream; answered with RST_STREAM(``code``)."""

    def __init__(self, stream_id: int, code: int, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.code = code
