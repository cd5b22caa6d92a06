"""Events of the lean codec, with the attribute names of their ``h2.events`` namesakes.

Slotted classes with positional constructors: cheaper than h2's keyword-only dataclasses.
``stream_ended`` is ``True`` when the frame ended the stream and ``None`` otherwise, so the
``event.stream_ended is not None`` test written for h2 reads the same.
"""

from __future__ import annotations

from typing import Protocol

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


class EventSink(Protocol):
    """Where ``Ngh2Codec`` delivers a read's events: one call each, in the order they happened,
    with the codec's own stream state already updated (a stream that ends here is already gone
    from ``streams``). The connection adapter (``sidecar.http.h2conn``) is one; ``EventList``
    turns the calls back into the event objects above, for callers that want a list."""

    def on_request_received(self, stream_id: int, headers: Headers, end_stream: bool) -> None: ...

    def on_response_received(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        ...

    def on_data_received(
        self, stream_id: int, data: bytes, flow_controlled_length: int, end_stream: bool
    ) -> None: ...

    def on_trailers_received(self, stream_id: int, headers: Headers) -> None: ...

    def on_stream_reset(self, stream_id: int, error_code: int, remote_reset: bool) -> None: ...

    def on_window_updated(self, stream_id: int, delta: int) -> None: ...

    def on_settings_received(self, changed_settings: dict[int, int]) -> None: ...

    def on_goaway_received(
        self, error_code: int, last_stream_id: int, additional_data: bytes | None
    ) -> None: ...

    def on_request_withdrawn(self, stream_id: int) -> None:
        """A request reset in the same read that opened it, not delivered (only when the
        codec was asked to screen such requests): a rapid-reset client's stream."""

    def on_last_message(self) -> None:
        """The next call delivers the read's last request or response event (headers, DATA
        or trailers): what it makes the application send may leave at once."""


class EventList:
    """An ``EventSink`` that collects the events of a read as event objects."""

    __slots__ = ("events",)

    def __init__(self) -> None:
        self.events: list[Event] = []

    def take(self) -> list[Event]:
        events = self.events
        if events:
            self.events = []
        return events

    def on_request_received(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.events.append(RequestReceived(stream_id, headers, True if end_stream else None))

    def on_response_received(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        self.events.append(ResponseReceived(stream_id, headers, True if end_stream else None))

    def on_data_received(
        self, stream_id: int, data: bytes, flow_controlled_length: int, end_stream: bool
    ) -> None:
        ended = True if end_stream else None
        self.events.append(DataReceived(stream_id, data, flow_controlled_length, ended))

    def on_trailers_received(self, stream_id: int, headers: Headers) -> None:
        self.events.append(TrailersReceived(stream_id, headers))

    def on_stream_reset(self, stream_id: int, error_code: int, remote_reset: bool) -> None:
        self.events.append(StreamReset(stream_id, error_code, remote_reset))

    def on_window_updated(self, stream_id: int, delta: int) -> None:
        self.events.append(WindowUpdated(stream_id, delta))

    def on_settings_received(self, changed_settings: dict[int, int]) -> None:
        self.events.append(RemoteSettingsChanged(changed_settings))

    def on_goaway_received(
        self, error_code: int, last_stream_id: int, additional_data: bytes | None
    ) -> None:
        self.events.append(ConnectionTerminated(error_code, last_stream_id, additional_data))

    def on_request_withdrawn(self, stream_id: int) -> None:
        pass

    def on_last_message(self) -> None:
        pass
