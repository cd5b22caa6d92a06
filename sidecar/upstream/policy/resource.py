"""The resources a cluster's circuit breakers limit, and the names of their gauges and counters.

An enum of its own module, which stays interpreted when ``breaker`` is compiled
(``PILOTFISH_MYPYC``): mypyc cannot compile an enum whose members are built by ``__init__``.
"""

from __future__ import annotations

import enum

from sidecar.upstream.policy.budget import RETRY_OVERFLOW_COUNTER

__all__ = ["Resource"]


class Resource(enum.Enum):
    """Gauge and counter names of each limited resource, as Envoy names them."""

    CONNECTIONS = (0, "cx_open", "remaining_cx", "upstream_cx_overflow")
    PENDING = (1, "rq_pending_open", "remaining_pending", "upstream_rq_pending_overflow")
    # Envoy counts request overflow under the pending counter too.
    REQUESTS = (2, "rq_open", "remaining_rq", "upstream_rq_pending_overflow")
    RETRIES = (3, "rq_retry_open", "remaining_retries", RETRY_OVERFLOW_COUNTER)

    def __init__(
        self, index: int, open_gauge: str, remaining_gauge: str, overflow_counter: str
    ) -> None:
        self.index = index  # counts are kept in a list: hashing an enum costs a Python call
        self.open_gauge = open_gauge
        self.remaining_gauge = remaining_gauge
        self.overflow_counter = overflow_counter
