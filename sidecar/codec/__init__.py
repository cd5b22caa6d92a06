"""A lean HTTP/2 connection: the part of ``h2.connection.H2Connection`` the sidecar uses.

Sans-IO like ``h2``: ``receive_data`` turns bytes into events (``get_buffer`` and
``buffer_updated`` do the same for bytes read straight into the codec's receive buffer),
``send_*`` queue frames, ``data_to_send`` (or ``take_output``) drains them. Frames are parsed
with ``struct`` in place (no per-frame objects), header blocks go through caching HPACK
coders, and inbound headers are validated once per distinct header block.
"""

from sidecar.codec.connection import Budget, H2Codec, Stream
from sidecar.codec.errors import CodecProtocolError, CodecStreamClosedError
from sidecar.codec.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from sidecar.codec.frames import Chunk

__all__ = [
    "Budget",
    "Chunk",
    "CodecProtocolError",
    "CodecStreamClosedError",
    "ConnectionTerminated",
    "DataReceived",
    "H2Codec",
    "RemoteSettingsChanged",
    "RequestReceived",
    "ResponseReceived",
    "Stream",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
]
