"""The Kubernetes side of a running control plane: the API client, the state and its watch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from control_plane.kube.options import KubernetesOptions
from control_plane.kube.state import ClusterState
from control_plane.kube.watch import KubeWatcher, api_client

log = logging.getLogger(__name__)


class KubeDiscovery:
    def __init__(self, watcher: KubeWatcher, state: ClusterState, close: Callable[[], object]):
        self.watcher = watcher
        self.state = state
        self._close = close
        self._task: asyncio.Task[None] | None = None
        self._on_change: Callable[[], None] = lambda: None

    @classmethod
    async def connect(cls, options: KubernetesOptions) -> KubeDiscovery:
        api = await api_client(options.kubeconfig)
        state = ClusterState()
        discovery: KubeDiscovery

        def changed() -> None:
            discovery._on_change()

        watcher = KubeWatcher(
            api,
            state,
            changed,
            namespaces=options.namespaces,
            backoff_initial=options.backoff_initial,
            backoff_max=options.backoff_max,
            watch_timeout=options.watch_timeout,
        )
        discovery = cls(watcher, state, api.close)
        return discovery

    def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._task = asyncio.create_task(self.watcher.run(), name="kubernetes-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        result = self._close()
        if asyncio.iscoroutine(result):
            await result
