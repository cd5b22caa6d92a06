"""``pilotfish control-plane`` and ``pilotfish validate``: serve the mesh file over xDS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from control_plane.mesh import load_mesh_file
from control_plane.metrics import ControlPlaneMetrics
from control_plane.proxyless import ignored_by_proxyless
from control_plane.status_service import StatusServicer
from control_plane.watcher import MeshFileWatcher
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.callbacks import Callbacks
from control_plane.xds.server import AdsServicer, ProxyRegistry
from control_plane.xds.snapshot import InconsistentSnapshot
from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import parse_address
from pilotfish.gen.pilotfish.status.v1 import status_pb2, status_pb2_grpc
from pilotfish.plainhttp import start_plain_http

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
STATUS_SERVICE = status_pb2.DESCRIPTOR.services_by_name["ControlPlaneStatus"].full_name


@dataclass(eq=False)
class ControlPlane:
    """A started control plane; ``port`` is the bound port (useful when asked for port 0)."""

    server: grpc.aio.Server
    port: int
    cache: SnapshotCache
    registry: ProxyRegistry
    watcher: MeshFileWatcher
    health: health.aio.HealthServicer
    _watch_task: asyncio.Task[None]
    metrics: ControlPlaneMetrics
    metrics_server: asyncio.AbstractServer | None = None

    async def stop(self, grace: float | None = 1.0) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        self._watch_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch_task
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_control_plane(
    config: str | Path,
    address: str = "127.0.0.1",
    port: int = 0,
    callbacks: Callbacks | None = None,
    poll_interval: float = 0.2,
    metrics_address: tuple[str, int] | None = None,
) -> ControlPlane:
    """Load the mesh file and serve it; raises ``ConfigError`` if the file is bad."""
    data = Path(config).read_bytes()
    mesh = load_mesh_file(config)
    try:
        cache = SnapshotCache(mesh)
    except InconsistentSnapshot as exc:
        raise ConfigError("", f"{config}: {exc}") from None
    registry = ProxyRegistry()
    watcher = MeshFileWatcher(config, cache.set_mesh, digest=MeshFileWatcher.digest_of(data))

    metrics = ControlPlaneMetrics(callbacks)
    metrics.generation = lambda: cache.generation
    metrics.reload_errors = lambda: watcher.errors
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
        AdsServicer(cache, registry, metrics), server
    )
    status_pb2_grpc.add_ControlPlaneStatusServicer_to_server(
        StatusServicer(cache, registry, lambda: watcher.last_error), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (ADS_SERVICE, STATUS_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    bound = server.add_insecure_port(f"{address}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {address}:{port}")
    await server.start()
    for name in ("", ADS_SERVICE, STATUS_SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_server = None
    if metrics_address is not None:
        metrics_server = await start_plain_http(metrics.handle, *metrics_address)
        log.info("metrics on http://%s:%d/metrics", *metrics_address)
    task = asyncio.create_task(watcher.run(poll_interval), name="mesh-file-watcher")
    log.info(
        "control plane serving %s (%d services) on %s:%d",
        config,
        len(mesh.services),
        address,
        bound,
    )
    return ControlPlane(
        server, bound, cache, registry, watcher, health_servicer, task, metrics, metrics_server
    )


async def _serve(args: argparse.Namespace) -> int:
    try:
        metrics_address = (
            parse_address("--metrics-address", args.metrics_address)
            if args.metrics_address
            else None
        )
        plane = await start_control_plane(
            args.config, args.address, args.port, metrics_address=metrics_address
        )
    except ConfigError as exc:
        print(f"pilotfish control-plane: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:
        print(f"pilotfish control-plane: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await plane.stop(grace=2.0)
    return 0


def run_control_plane(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


def run_validate(args: argparse.Namespace) -> int:
    """Check a mesh file offline, including that every proxy view is consistent."""
    try:
        mesh = load_mesh_file(args.file)
        SnapshotCache(mesh)
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    except (ConfigError, InconsistentSnapshot) as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({len(mesh.services)} services)")
    for line in ignored_by_proxyless(mesh):
        print(f"{args.file}: proxyless gRPC clients ignore {line}")
    return 0
