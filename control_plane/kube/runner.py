"""The Kubernetes side of a running control plane: the API client, the state and its watch."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from kubernetes_asyncio import client

from control_plane.kube.options import KubernetesOptions
from control_plane.kube.state import ClusterState
from control_plane.kube.watch import KubeWatcher, api_client


class KubeDiscovery:
    """Owns the API client and the watch task; ``state`` is what the watch has seen."""

    def __init__(self, api: client.ApiClient, options: KubernetesOptions) -> None:
        self._api = api
        self.state = ClusterState()
        self._on_change: Callable[[], None] = lambda: None
        self._task: asyncio.Task[None] | None = None
        self.watcher = KubeWatcher(
            api,
            self.state,
            self._changed,
            namespaces=options.namespaces,
            backoff_initial=options.backoff_initial,
            backoff_max=options.backoff_max,
            watch_timeout=options.watch_timeout,
        )

    @classmethod
    async def connect(cls, options: KubernetesOptions) -> KubeDiscovery:
        """Load the configuration (raises ``KubeConfigError``); nothing is watched yet."""
        return cls(await api_client(options.kubeconfig), options)

    def _changed(self) -> None:
        self._on_change()

    def start(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._task = asyncio.create_task(self.watcher.run(), name="kubernetes-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._api.close()
