"""Retry budget: how many retries a cluster may have in flight, scaled by its traffic.

A fixed ``max_retries`` is either too low for a busy cluster or a retry storm for a quiet one;
a budget allows ``percent`` of the active requests (pending included, as Envoy counts them) and
never less than ``min_concurrency``. ``CircuitBreakers`` does the counting and uses this limit
in place of ``max_retries`` when a budget is configured (on by default).
"""

from __future__ import annotations

from pilotfish.config.route_policy import RetryBudgetConfig

RETRY_OVERFLOW_COUNTER = "upstream_rq_retry_overflow"


class RetryBudget:
    __slots__ = ("config",)

    def __init__(self, config: RetryBudgetConfig) -> None:
        self.config = config

    def max_active_retries(self, active_requests: int) -> int:
        # Integer arithmetic: 20% of 14 requests is 2 retries, not 2.8 rounded by float error.
        percent_millis = round(self.config.percent * 1000)
        scaled = active_requests * percent_millis // 100_000
        return max(self.config.min_concurrency, scaled)

    def allows(self, active_requests: int, active_retries: int) -> bool:
        """Whether one more retry fits next to ``active_retries`` already in flight."""
        return active_retries < self.max_active_retries(active_requests)
