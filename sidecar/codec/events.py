"""Events of the lean codec, with the attribute names of their ``h2.events`` namesakes.

Slotted classes with positional constructors: cheaper than h2's keyword-only dataclasses.
``stream_ended`` is ``True`` when the frame ended the stream and ``None`` otherwise, so the
``event.stream_ended is not None`` test written for h2 reads the same.
"""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]
"""A header block as it crosses the proxy: lowercase names and values, pseudo-headers first."""


class RequestReceived:
    __slots__ = ("headers", "stream_ended", "stream_id")

    def __init__(self, stream_id: int, headers: Headers, stream_ended: bool | None) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended = stream_ended


class ResponseReceived:
    __slots__ = ("headers", "stream_ended", "stream_id")

    def __init__(self, stream_id: int, headers: Headers, stream_ended: bool | None) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended = stream_ended


class TrailersReceived:
    """Trailers always end the stream."""

    __slots__ = ("headers", "stream_ended", "stream_id")

    def __init__(self, stream_id: int, headers: Headers) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.stream_ended: bool | None = True


class DataReceived:
    __slots__ = ("data", "flow_controlled_length", "stream_ended", "stream_id")

    def __init__(
        self, stream_id: int, data: bytes, flow_controlled_length: int, stream_ended: bool | None
    ) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length
        self.stream_ended = stream_ended


class StreamReset:
    """The peer reset the stream (``remote_reset``), or we did because it broke the protocol."""

    __slots__ = ("error_code", "remote_reset", "stream_id")

    def __init__(self, stream_id: int, error_code: int, remote_reset: bool = True) -> None:
        self.stream_id = stream_id
        self.error_code = error_code
        self.remote_reset = remote_reset


class WindowUpdated:
    """The peer opened a send window: of the connection when ``stream_id`` is 0."""

    __slots__ = ("delta", "stream_id")

    def __init__(self, stream_id: int, delta: int) -> None:
        self.stream_id = stream_id
        self.delta = delta


class RemoteSettingsChanged:
    """A SETTINGS frame from the peer (now acknowledged): setting code to new value."""

    __slots__ = ("changed_settings",)

    def __init__(self, changed_settings: dict[int, int]) -> None:
        self.changed_settings = changed_settings


class ConnectionTerminated:
    """A GOAWAY from the peer."""

    __slots__ = ("additional_data", "error_code", "last_stream_id")

    def __init__(self, error_code: int, last_stream_id: int, additional_data: bytes | None) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id
        self.additional_data = additional_data


Event = (
    RequestReceived
    | ResponseReceived
    | TrailersReceived
    | DataReceived
    | StreamReset
    | WindowUpdated
    | RemoteSettingsChanged
    | ConnectionTerminated
)
