"""Which hosts a cluster's balancer may pick: health checks, outlier ejection, panic mode. Pure.

A host is usable when it passes active health checking (or has none) and is not ejected.
If fewer than ``panic_threshold`` percent of the hosts are usable, the cluster is in panic
and balances over *all* hosts (as Envoy does): a mostly failed health check more likely
means a broken check or an overloaded fleet than a dead one, and concentrating every request
on the few survivors would take them down too. With a threshold of 0 there is no panic and
a cluster without usable hosts has no eligible host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.upstream.policy.lb import LbHost


@dataclass(frozen=True, slots=True)
class HostState:
    """One host of a cluster; its index is its position in the cluster's host list."""

    key: str
    weight: int = 1
    health_check_ok: bool = True
    ejected: bool = False

    @property
    def usable(self) -> bool:
        return self.health_check_ok and not self.ejected


def in_panic(hosts: Sequence[HostState], panic_threshold: float = 50.0) -> bool:
    if not hosts or panic_threshold <= 0:
        return False
    usable = sum(1 for h in hosts if h.usable)
    return 100 * usable < panic_threshold * len(hosts)


def eligible_hosts(hosts: Sequence[HostState], panic_threshold: float = 50.0) -> list[int]:
    """Indices of the hosts to balance over."""
    if in_panic(hosts, panic_threshold):
        return list(range(len(hosts)))
    return [i for i, h in enumerate(hosts) if h.usable]


def balancer_hosts(hosts: Sequence[HostState], panic_threshold: float = 50.0) -> list[LbHost]:
    """``eligible_hosts`` in the form ``LoadBalancer.set_hosts`` takes."""
    return [
        LbHost(i, hosts[i].key, hosts[i].weight) for i in eligible_hosts(hosts, panic_threshold)
    ]
