"""Extension points on the ADS server, as go-control-plane has them: for metrics, audit, auth.

Subclass ``Callbacks`` and override what you need; every method is a no-op here. They run on
the server's event loop, so they must be quick and must not block.
"""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from control_plane.xds.stream_state import NackReceived


class Callbacks:
    def on_stream_open(self, stream_id: int, kind: str) -> None:
        """A client opened an ADS stream; ``kind`` is ``"sotw"`` or ``"delta"``."""

    def on_stream_close(self, stream_id: int, node_id: str) -> None:
        """The stream ended, for whatever reason."""

    def on_request(
        self,
        stream_id: int,
        request: discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest,
    ) -> None:
        """A request arrived, before it is handled."""

    def on_nack(self, stream_id: int, node_id: str, nack: NackReceived) -> None:
        """The client rejected a response."""

    def on_response(self, stream_id: int, type_url: str, mesh_changed_at: float | None) -> None:
        """A response is on its way; ``mesh_changed_at`` (``time.monotonic()``) when it
        carries a mesh change, None when it answers a request."""
