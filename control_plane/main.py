"""``pilotfish control-plane`` and ``pilotfish validate``: serve the mesh file over xDS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from control_plane.ca.authority import CsrRejected
from control_plane.ca.service import CA_SERVICE, CertificateServicer
from control_plane.ca.serving import DEFAULT_SERVING_NAMES, ServingCertificate
from control_plane.ca.settings import (
    CaSettings,
    build_authenticator,
    build_authority,
    ca_settings_from_args,
)
from control_plane.kube.discovery import MeshSources
from control_plane.kube.inject import InjectOptions
from control_plane.kube.options import DEFAULT_CLUSTER_DOMAIN, KubernetesOptions
from control_plane.mesh import load_mesh_file
from control_plane.mesh_warnings import mesh_warnings
from control_plane.metrics import ControlPlaneMetrics
from control_plane.registry.core import DEFAULT_HEARTBEAT_INTERVAL, Registry
from control_plane.registry.service import RegistryServicer, expire_leases
from control_plane.registry.store import (
    EtcdStore,
    MemoryStore,
    RegistryStore,
    StoreUnavailable,
    parse_store_url,
)
from control_plane.status_service import StatusServicer
from control_plane.watcher import MeshFileWatcher
from control_plane.xds.cache import SnapshotCache
from control_plane.xds.callbacks import Callbacks
from control_plane.xds.peer_view import authenticate_peer
from control_plane.xds.server import AdsServicer, ProxyRegistry
from control_plane.xds.snapshot import InconsistentSnapshot
from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import parse_address
from pilotfish.gen.pilotfish.ca.v1 import ca_pb2_grpc
from pilotfish.gen.pilotfish.registry.v1 import registry_pb2, registry_pb2_grpc
from pilotfish.gen.pilotfish.status.v1 import status_pb2, status_pb2_grpc
from pilotfish.plainhttp import start_plain_http

if TYPE_CHECKING:
    # The Kubernetes client and aiohttp are imported only when asked for (about 0.5 s).
    from aiohttp import web

    from control_plane.kube.runner import KubeDiscovery

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
STATUS_SERVICE = status_pb2.DESCRIPTOR.services_by_name["ControlPlaneStatus"].full_name
REGISTRY_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["Registry"].full_name


@dataclass(frozen=True, slots=True)
class WebhookOptions:
    """The injection webhook: HTTPS on ``address`` with this certificate and key."""

    address: tuple[str, int]
    cert: str
    key: str
    inject: InjectOptions = InjectOptions()


@dataclass(frozen=True, slots=True)
class TlsPorts:
    """The control plane's TLS ports (both need a CA, whose serving certificate they present).

    ``ca_port``: server-side TLS, serving the CA (a workload's first certificate, with its
    bearer token). ``xds_port``: mutual TLS, serving ADS (each stream's view bound to the
    client certificate's SPIFFE ID) and the CA. ``plaintext``: whether the plaintext port
    (everything, unauthenticated: for development, ``pilotfish status`` and clients without an
    identity) is served too, on ``plaintext_address`` (default: the main address).
    """

    ca_port: int | None = None
    xds_port: int | None = None
    names: tuple[str, ...] = DEFAULT_SERVING_NAMES
    plaintext: bool = True
    plaintext_address: str | None = None


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
    sources: MeshSources
    service_registry: Registry
    registry_store: RegistryStore
    _expiry_task: asyncio.Task[None]
    metrics_server: asyncio.AbstractServer | None = None
    kube: KubeDiscovery | None = None
    webhook: web.AppRunner | None = None
    ca: CertificateServicer | None = None
    ca_api: Any = None  # the Kubernetes client of the CA's TokenReviews
    ca_port: int = 0
    """The bound server-side TLS port of the CA; 0 when off."""
    xds_port: int = 0
    """The bound mutual-TLS xDS port; 0 when off."""
    serving: ServingCertificate | None = None
    tls_servers: tuple[grpc.aio.Server, ...] = ()
    _renewal_task: asyncio.Task[None] | None = None

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._renewal_task is not None:
            self._renewal_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal_task
        if self.ca_api is not None:
            await self.ca_api.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.webhook is not None:
            await self.webhook.cleanup()
        for task in (self._watch_task, self._expiry_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.kube is not None:
            await self.kube.stop()
        self.sources.close()
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(*(s.stop(grace) for s in (self.server, *self.tls_servers)))
        await self.registry_store.close()


async def start_control_plane(
    config: str | Path,
    address: str = "127.0.0.1",
    port: int = 0,
    callbacks: Callbacks | None = None,
    poll_interval: float = 0.2,
    metrics_address: tuple[str, int] | None = None,
    unknown_nodes: str = "serve",
    kubernetes: KubernetesOptions | None = None,
    webhook: WebhookOptions | None = None,
    ca: CaSettings | None = None,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    registry_store: str | None = None,
    tls: TlsPorts | None = None,
) -> ControlPlane:
    """Load the mesh file and serve it; raises ``ConfigError`` if the file or the CA is bad.

    With ``kubernetes``, Services and their pods are added as the watch finds them (the mesh
    file alone is served until the first list arrives). ``heartbeat_interval``: how often
    registered instances must renew their lease (they are evicted after three missed
    heartbeats). ``registry_store``: ``etcd://HOST:PORT`` keeps registrations in etcd (shared
    by every control plane on it); None keeps them here. ``tls``: the TLS ports (they need
    ``ca``); ``port`` and ``address`` are then those of the plaintext port, if it is on.
    """
    if tls is not None and ca is None:
        flag = "--xds-mtls-port" if tls.xds_port is not None else "--ca-tls-port"
        raise ConfigError(flag, "needs a CA (--ca-dir or --ca-cert)")
    data = Path(config).read_bytes()
    mesh = load_mesh_file(config)
    authority = build_authority(ca, time.time) if ca is not None else None
    clock = asyncio.get_running_loop().time
    service_registry = Registry(clock, heartbeat_interval=heartbeat_interval)
    try:
        cache = SnapshotCache(mesh, service_registry)
    except InconsistentSnapshot as exc:
        raise ConfigError("", f"{config}: {exc}") from None
    registry = ProxyRegistry()
    webhook_tls = None
    if webhook is not None and webhook.inject.ca_address:
        if authority is None:
            raise ConfigError("--inject-ca-address", "needs a CA (--ca-dir or --ca-cert)")
        # Injected pods trust the control plane through these roots until their first
        # certificate brings the current bundle.
        webhook = replace(
            webhook, inject=replace(webhook.inject, ca_roots_pem=authority.bundle.pem().decode())
        )
    if webhook is not None:
        from control_plane.kube.webhook import start_webhook, tls_context

        webhook_tls = tls_context(webhook.cert, webhook.key)
    kube: KubeDiscovery | None = None
    if kubernetes is not None:
        from control_plane.kube.runner import KubeDiscovery

        kube = await KubeDiscovery.connect(kubernetes)
    ca_servicer = None
    review_api = None
    if ca is not None and authority is not None:
        reviewer = None
        if ca.token_audiences and kubernetes is not None:
            from control_plane.ca.token_review import KubeTokenReviewer
            from control_plane.kube.watch import api_client

            review_api = await api_client(kubernetes.kubeconfig)
            reviewer = KubeTokenReviewer(review_api)
        ca_servicer = CertificateServicer(authority, build_authenticator(ca, reviewer))
    sources = MeshSources(
        mesh,
        cache.set_mesh,
        discovered=kube.state.services if kube is not None else dict,
        cluster_domain=kubernetes.cluster_domain if kubernetes else DEFAULT_CLUSTER_DOMAIN,
    )
    watcher = MeshFileWatcher(config, sources.set_file_mesh, digest=MeshFileWatcher.digest_of(data))
    store: RegistryStore
    if registry_store:
        try:
            etcd_host, etcd_port = parse_store_url(registry_store)
        except ValueError as exc:
            raise ConfigError("--registry-store", str(exc)) from None
        etcd = EtcdStore(service_registry, etcd_host, etcd_port)
        try:
            await etcd.start()
        except StoreUnavailable as exc:
            raise OSError(f"--registry-store {registry_store}: {exc}") from None
        store = etcd
    else:
        store = MemoryStore(service_registry)

    metrics = ControlPlaneMetrics(callbacks)
    metrics.generation = lambda: cache.generation
    metrics.reload_errors = lambda: watcher.errors
    if ca_servicer is not None:
        metrics.ca_outcomes = ca_servicer.counters.as_dict
    if kube is not None:
        metrics.kube_watch = kube.watcher.stats.by_name
        state = kube.state
        metrics.kube_services = lambda: state.service_count
    # grpc sets SO_REUSEPORT by default, so a second control plane on a busy port would start
    # and share the port silently; without it, a busy port is an error that says so.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ads_servicers = [AdsServicer(cache, registry, metrics, unknown_nodes=unknown_nodes)]
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads_servicers[0], server)
    status_pb2_grpc.add_ControlPlaneStatusServicer_to_server(
        StatusServicer(cache, registry, lambda: watcher.last_error), server
    )
    registry_pb2_grpc.add_RegistryServicer_to_server(
        RegistryServicer(service_registry, store, cache, registry), server
    )
    services = [ADS_SERVICE, STATUS_SERVICE, REGISTRY_SERVICE]
    if ca_servicer is not None:
        ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(ca_servicer, server)
        services.append(CA_SERVICE)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    serving = None
    tls_servers: list[grpc.aio.Server] = []
    ca_bound = xds_bound = 0
    plaintext_address = address
    if tls is not None and ca is not None and ca_servicer is not None:
        plaintext_address = tls.plaintext_address or address
        serving = ServingCertificate(ca_servicer.authority, tls.names, time.time)
        if tls.ca_port is not None:
            ca_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(ca_servicer, ca_server)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, ca_server)
            ca_bound = _bind(ca_server, "CA (TLS)", address, tls.ca_port,
                             serving.credentials(require_client_certificate=False))
            tls_servers.append(ca_server)
        if tls.xds_port is not None:
            trust_domain = ca.trust_domain
            xds_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            ads_servicers.append(AdsServicer(
                cache, registry, metrics, unknown_nodes=unknown_nodes,
                authenticate=lambda context: authenticate_peer(context, trust_domain),
            ))
            ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(
                ads_servicers[-1], xds_server
            )
            ca_pb2_grpc.add_CertificateAuthorityServicer_to_server(ca_servicer, xds_server)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, xds_server)
            # The status service reads only; the registry binds writes to the caller's identity.
            status_pb2_grpc.add_ControlPlaneStatusServicer_to_server(
                StatusServicer(cache, registry, lambda: watcher.last_error), xds_server
            )
            registry_pb2_grpc.add_RegistryServicer_to_server(
                RegistryServicer(
                    service_registry, store, cache, registry,
                    authenticate=lambda context: authenticate_peer(context, trust_domain),
                ),
                xds_server,
            )
            xds_bound = _bind(xds_server, "xDS (mTLS)", address, tls.xds_port,
                              serving.credentials(require_client_certificate=True))
            tls_servers.append(xds_server)
    metrics.xds_refused = lambda: dict(sum((a.refused for a in ads_servicers), Counter()))
    if serving is not None:
        certificate = serving
        metrics.serving_expiry = lambda: certificate.current.not_after
    bound = 0
    if tls is None or tls.plaintext:
        bound = _bind(server, "xDS", plaintext_address, port, None)
    await asyncio.gather(*(s.start() for s in (server, *tls_servers)))
    for name in ("", *services):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_server = None
    if metrics_address is not None:
        try:
            metrics_server = await start_plain_http(metrics.handle, *metrics_address)
        except OSError as exc:
            await asyncio.gather(*(s.stop(None) for s in (server, *tls_servers)))
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            host, metrics_port = metrics_address
            raise OSError(f"metrics: cannot listen on {host}:{metrics_port}: {reason}") from None
        log.info("metrics on http://%s:%d/metrics", *metrics_address)
    webhook_runner = None
    if webhook is not None and webhook_tls is not None:
        webhook_runner = await start_webhook(webhook.inject, *webhook.address, webhook_tls)
        log.info("injection webhook on https://%s:%d/inject", *webhook.address)
    task = asyncio.create_task(watcher.run(poll_interval), name="mesh-file-watcher")
    if kube is not None:
        kube.start(sources.discovery_changed)
    # With etcd, etcd's leases are the TTL; the core's own leases never run out.
    expiry = asyncio.create_task(expire_leases(service_registry, clock), name="registry-expiry")
    renewal = None
    if serving is not None:
        renewal = asyncio.create_task(_renew_serving(serving), name="serving-certificate")
        log.info("CA over TLS on %s:%d, xDS over mTLS on %s:%d (names %s)", address, ca_bound,
                 address, xds_bound, ",".join(serving.dns_names))
    log.info(
        "control plane serving %s (%d services) %s",
        config,
        len(mesh.services),
        f"on {plaintext_address}:{bound}" if bound else "on its TLS ports only (plaintext off)",
    )
    return ControlPlane(
        server,
        bound,
        cache,
        registry,
        watcher,
        health_servicer,
        task,
        metrics,
        sources,
        service_registry,
        store,
        expiry,
        metrics_server,
        kube,
        webhook_runner,
        ca_servicer,
        review_api,
        ca_bound,
        xds_bound,
        serving,
        tuple(tls_servers),
        renewal,
    )


def _bind(
    server: grpc.aio.Server,
    what: str,
    address: str,
    port: int,
    credentials: grpc.ServerCredentials | None,
) -> int:
    where = f"{address}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(where)
        else:
            bound = server.add_secure_port(where, credentials)
    except RuntimeError:  # grpc says "Failed to bind", not why
        bound = 0
    if bound == 0:
        raise OSError(f"{what}: cannot listen on {where}: {_bind_failure(address, port)}")
    return int(bound)


async def _renew_serving(serving: ServingCertificate) -> None:
    """Renew the serving certificate at half its lifetime, for as long as the server runs."""
    while True:
        await asyncio.sleep(serving.seconds_to_renewal())
        try:
            serving.renew()
        except CsrRejected as exc:
            # The CA itself has expired (or is not valid yet): keep serving the current
            # certificate while it lasts, and try again, loudly.
            log.error("cannot renew the serving certificate: %s; retrying in 30s", exc)
            await asyncio.sleep(30)


def _bind_failure(address: str, port: int) -> str:
    """Why grpc could not bind: found by binding a plain socket, since grpc does not say."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address.strip("[]"), port))
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno else str(exc)
    return "grpc could not bind it"


def tls_ports_from_args(args: argparse.Namespace) -> TlsPorts | None:
    """``--ca-tls-port``, ``--xds-mtls-port``, ``--tls-names``, ``--plaintext-address`` and
    ``--no-plaintext``; None when no TLS port is asked for."""
    ca_port, xds_port = args.ca_tls_port, args.xds_mtls_port
    if ca_port is None and xds_port is None:
        if args.no_plaintext:
            raise ConfigError(
                "--no-plaintext", "needs a TLS port (--ca-tls-port or --xds-mtls-port)"
            )
        return None
    for flag, value in (("--ca-tls-port", ca_port), ("--xds-mtls-port", xds_port)):
        if value is not None and not 0 <= value < 65536:
            raise ConfigError(flag, f"{value} is not a port")
    names = tuple(n.strip() for n in args.tls_names.split(",") if n.strip())
    if not names:
        raise ConfigError("--tls-names", "at least one DNS name is needed")
    return TlsPorts(
        ca_port=ca_port,
        xds_port=xds_port,
        names=names,
        plaintext=not args.no_plaintext,
        plaintext_address=args.plaintext_address or None,
    )


async def _serve(args: argparse.Namespace) -> int:
    try:
        metrics_address = (
            parse_address("--metrics-address", args.metrics_address)
            if args.metrics_address
            else None
        )
        heartbeat = args.registry_heartbeat_interval
        if heartbeat <= 0:
            raise ConfigError("--registry-heartbeat-interval", "expected a number of seconds > 0")
        kubernetes = None
        if args.kubernetes:
            kubernetes = KubernetesOptions(
                kubeconfig=args.kubeconfig or None,
                namespaces=tuple(n for n in args.kube_namespaces.split(",") if n),
                cluster_domain=args.cluster_domain,
            )
        webhook = None
        if args.webhook_address:
            if not args.webhook_cert or not args.webhook_key:
                raise ConfigError("--webhook-address", "needs --webhook-cert and --webhook-key")
            webhook = WebhookOptions(
                address=parse_address("--webhook-address", args.webhook_address),
                cert=args.webhook_cert,
                key=args.webhook_key,
                inject=InjectOptions(
                    image=args.inject_image,
                    xds_address=args.inject_xds_address,
                    native=not args.inject_classic,
                    ca_address=args.inject_ca_address,
                    ca_token_audience=args.ca_token_audience,
                    trust_domain=args.trust_domain,
                ),
            )
        tls = tls_ports_from_args(args)
        plane = await start_control_plane(
            args.config,
            args.address,
            args.port,
            metrics_address=metrics_address,
            unknown_nodes=args.unknown_nodes,
            kubernetes=kubernetes,
            webhook=webhook,
            ca=ca_settings_from_args(args),
            heartbeat_interval=heartbeat,
            registry_store=args.registry_store or None,
            tls=tls,
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
    """Check a mesh file (or a sidecar bootstrap) offline: every error, with its line."""
    from control_plane.validate import validate_file

    try:
        report = validate_file(args.file)
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    except UnicodeDecodeError as exc:
        print(f"{args.file}: not UTF-8 text: {exc.reason}", file=sys.stderr)
        return 1
    for finding in report.findings:
        print(finding.format(args.file), file=sys.stderr)
    if report.findings:
        count = len(report.findings)
        plural = "s" if count > 1 else ""
        print(f"{args.file}: {count} error{plural} ({report.kind})", file=sys.stderr)
        return 1
    if report.kind == "mesh file":
        # Valid, but maybe not what it seems to say (a retry policy that never fires...).
        for warning in mesh_warnings(load_mesh_file(args.file)):
            print(f"{args.file}: warning: {warning}", file=sys.stderr)
    print(f"{args.file}: ok ({report.kind}: {report.summary})")
    for line in report.notes:
        print(f"{args.file}: {line}")
    return 0
