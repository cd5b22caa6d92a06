"""A lean HTTP/2 connection: the part of ``h2.connection.H2Connection`` the sidecar uses.

Sans-IO like ``h2``: ``receive_data`` turns bytes into events, ``send_*`` queue frames,
``data_to_send`` drains them. Frames are parsed with ``struct`` straight from the input
buffer (no per-frame objects), header blocks go through caching HPACK coders, and inbound
headers are validated once per distinct header block.
"""

from sidecar.codec.connection import H2Codec
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

__all__ = [
    "CodecProtocolError",
    "CodecStreamClosedError",
    "ConnectionTerminated",
    "DataReceived",
    "H2Codec",
    "RemoteSettingsChanged",
    "RequestReceived",
    "ResponseReceived",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
]
