"""What an exchange needs of the layers above it, as ``Protocol``s the route stage owns.

The listener (``sidecar/listen/``) and the sidecar (``sidecar/server.py``) satisfy these without
the route stage importing either: calls go up only through what is named here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from pilotfish.config.model import ListenerConfig
    from sidecar.observability.registry import GaugeChild
    from sidecar.observability.tracing import Tracer
    from sidecar.route.policy.runtime import RoutePolicyRuntime
    from sidecar.route.policy.shedding import LoadShedder
    from sidecar.route.table import RouteDecision, RouteTable
    from sidecar.stats import Scope
    from sidecar.timer_wheel import TimerWheel
    from sidecar.upstream.clusters import ClusterManager

__all__ = ["ExchangeHost", "SidecarServices"]

# The finished exchange handed back to its listener. A type parameter rather than the class
# itself: the exchange imports this module, so this module cannot import the exchange.
ExchangeT_contra = TypeVar("ExchangeT_contra", contravariant=True)


class SidecarServices(Protocol):
    """What every exchange shares with the whole sidecar: the tracer, the deadline wheel, and
    the live state of each route's policy."""

    @property
    def tracer(self) -> Tracer: ...

    @property
    def timers(self) -> TimerWheel: ...

    def route_policy(self, decision: RouteDecision) -> RoutePolicyRuntime: ...

    @property
    def awaiting_config(self) -> bool:
        """An xDS-driven sidecar before its first config: a routing miss is NCY, not NR."""
        ...


class ExchangeHost(Protocol[ExchangeT_contra]):
    """What an exchange needs of the listener its request came in on: the route table and the
    clusters it routes to, the listener's admission (draining, load shedding) and stats, and a
    call at the end of the request (metrics and the access log)."""

    @property
    def sidecar(self) -> SidecarServices: ...

    @property
    def config(self) -> ListenerConfig: ...

    @property
    def scope(self) -> Scope: ...

    @property
    def streams_gauge(self) -> GaugeChild: ...

    @property
    def draining(self) -> bool: ...

    @property
    def shedder(self) -> LoadShedder | None: ...

    @property
    def random(self) -> Callable[[], float]: ...

    @property
    def clusters(self) -> ClusterManager: ...

    def route_table(self) -> RouteTable | None: ...

    def exchange_done(self, exchange: ExchangeT_contra) -> None: ...
