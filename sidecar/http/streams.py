"""The seam between protocol codecs and the request path.

A codec (HTTP/2 or HTTP/1.1, either side of the proxy) delivers the events of one stream to a
``StreamHandler`` and lets the other side write into it through a ``StreamSink``. Flow control
crosses the proxy through ``send_data``'s ``on_sent`` callback: the side that received the bytes
acknowledges them to its peer only once the other side has taken them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.codec.events import Headers as Headers  # the codecs' type, re-exported

if TYPE_CHECKING:
    from pilotfish.config.model import ListenerConfig
    from pilotfish.identity import SpiffeId
    from sidecar.stats import Scope

OnSent = Callable[[], None] | None


class ResetReason(enum.Enum):
    """Why a stream ended without completing."""

    REMOTE_RESET = "remote_reset"  # the peer sent RST_STREAM
    REFUSED = "refused"  # never processed by the peer: safe to send elsewhere
    CONNECTION_LOST = "connection_lost"
    CONNECTION_FAILURE = "connection_failure"  # could not connect at all
    PROTOCOL_ERROR = "protocol_error"
    LOCAL = "local"


class StreamHandler(Protocol):
    """Receives the events of one stream from a codec."""

    def on_headers(self, headers: Headers, end_stream: bool) -> None: ...

    def on_data(self, data: bytes, flow_len: int, end_stream: bool) -> None: ...

    def on_trailers(self, trailers: Headers) -> None: ...

    def on_reset(self, reason: ResetReason, code: int) -> None: ...


class StreamSink(Protocol):
    """One stream as the other side of the proxy writes into it."""

    def send_headers(self, headers: Headers, end_stream: bool) -> None: ...

    def send_data(self, data: bytes, end_stream: bool, on_sent: OnSent) -> None:
        """Queue ``data``; ``on_sent`` runs once it has left our buffers (or was discarded)."""

    def send_trailers(self, trailers: Headers) -> None: ...

    def reset(self, code: int) -> None: ...

    def reset_when_sent(self, code: int) -> None:
        """Reset once everything already queued on the stream has been sent."""

    def ack(self, flow_len: int) -> None:
        """The bytes this stream delivered have been taken: let the peer send more."""


# HTTP/2 error codes (RFC 9113 section 7) used across the proxy.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8


class ConnectionOwner(Protocol):
    """What a downstream connection needs of the listener that accepted it: its limits, a
    handler for each new request, and a book of open connections (for stats and draining)."""

    @property
    def config(self) -> ListenerConfig: ...

    @property
    def scope(self) -> Scope:
        """The listener's stats, for what connections enforce (timeouts, refused requests)."""

    def new_exchange(
        self, downstream: StreamSink, peer: SpiffeId | None = None
    ) -> StreamHandler: ...

    def connection_opened(self, conn: Any) -> None: ...

    def connection_closed(self, conn: Any) -> None: ...

    def request_started_on(self, requests_so_far: int) -> bool:
        """Whether a connection that has carried this many requests should now drain."""
        ...
