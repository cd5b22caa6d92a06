"""The sidecar process: listeners, clusters and routes, live config, admin, draining."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import TYPE_CHECKING

from pilotfish.config.model import Bootstrap
from sidecar.listener import ListenerRuntime, SniffingProtocol
from sidecar.routing import RouteTable
from sidecar.stats import StatsStore
from sidecar.upstream import ClusterManager

if TYPE_CHECKING:
    from sidecar.router import Exchange

log = logging.getLogger("pilotfish.sidecar")
access_log = logging.getLogger("pilotfish.access")


class Sidecar:
    def __init__(self, bootstrap: Bootstrap, *, reuse_port: bool = False) -> None:
        self.bootstrap = bootstrap
        self.reuse_port = reuse_port
        self.stats = StatsStore()
        self.clusters = ClusterManager(self.stats)
        self.route_tables: dict[str, RouteTable] = {}
        self.listeners: dict[str, ListenerRuntime] = {}
        self.health_check_failed = False
        self.initialized = False
        self.draining = False
        self.started_at = time.time()
        self.config_updated_at = 0.0
        self.stopped = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        self.apply(bootstrap)

    # -- config ----------------------------------------------------------------------------

    def apply(self, bootstrap: Bootstrap) -> None:
        """Swap in new clusters and routes. Streams already routed keep what they hold."""
        self.clusters.apply(bootstrap.clusters)
        self.route_tables = {name: RouteTable(rc) for name, rc in bootstrap.route_configs.items()}
        self.bootstrap = bootstrap
        self.config_updated_at = time.time()
        self.stats.scope("server").inc("config_updates")

    @property
    def ready(self) -> bool:
        return self.initialized and not self.draining and not self.health_check_failed

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_event_loop()
        for config in self.bootstrap.listeners:
            runtime = ListenerRuntime(self, config)
            runtime.server = await loop.create_server(
                lambda rt=runtime: SniffingProtocol(rt),
                config.host,
                config.port,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
                family=socket.AF_INET6 if ":" in config.host else socket.AF_INET,
                backlog=1024,
            )
            self.listeners[config.name] = runtime
            log.info("listener %s on %s:%d", config.name, config.host, config.port)
        self.initialized = True

    def request_stop(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.get_event_loop().create_task(self.drain_and_stop())
            self._drain_task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("draining failed; stopping now", exc_info=task.exception())
        self.stopped.set()

    async def drain_and_stop(self) -> None:
        """Stop accepting, GOAWAY everyone, let streams finish within the drain timeout."""
        self.draining = True
        log.info("draining (up to %.1fs)", self.bootstrap.drain_timeout)
        for runtime in self.listeners.values():
            if runtime.server is not None:
                runtime.server.close()
            runtime.start_drain()
        deadline = time.monotonic() + self.bootstrap.drain_timeout
        while time.monotonic() < deadline:
            if not any(rt.active_streams for rt in self.listeners.values()):
                break
            await asyncio.sleep(0.05)
        leftover = sum(rt.active_streams for rt in self.listeners.values())
        if leftover:
            log.warning("drain timeout: closing %d streams still open", leftover)
        for runtime in self.listeners.values():
            for conn in list(runtime.connections):
                conn.close()
        self.clusters.close_all()
        await asyncio.sleep(0)
        self.stopped.set()

    # -- logging ---------------------------------------------------------------------------

    def access_log(self, listener: ListenerRuntime, exchange: Exchange) -> None:
        if access_log.isEnabledFor(logging.DEBUG):
            access_log.debug(
                "%s %s %s%s %d %s %.1fms upstream=%s",
                listener.config.name,
                exchange.method,
                exchange.authority,
                exchange.path,
                exchange.status,
                exchange.flag.code if exchange.flag else "-",
                (time.monotonic() - exchange.start) * 1000,
                exchange.upstream_host or "-",
            )
