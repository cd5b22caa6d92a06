"""A listener of a real (unstarted) sidecar, for driving the request path in process."""

from __future__ import annotations

from typing import Any

from pilotfish.config.bootstrap import parse_bootstrap
from sidecar.listen.listener import ListenerRuntime
from sidecar.server import Sidecar


def listener_for(config: dict[str, Any]) -> ListenerRuntime:
    """The first listener of ``config``, with clusters and routes in force; no sockets."""
    bootstrap = parse_bootstrap(config)
    sidecar = Sidecar(bootstrap)
    sidecar.apply(bootstrap)
    return ListenerRuntime(sidecar, bootstrap.listeners[0])
