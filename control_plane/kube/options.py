"""Options of the control plane's Kubernetes side; light to import (no client library)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_CLUSTER_DOMAIN = "cluster.local"


@dataclass(frozen=True, slots=True)
class KubernetesOptions:
    """``--kubernetes``: discover Services and pods. ``namespaces`` empty: all of them."""

    kubeconfig: str | None = None
    namespaces: tuple[str, ...] = ()
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    watch_timeout: int = 240
