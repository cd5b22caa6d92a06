"""``pilotfish sidecar``: run the proxy from a static bootstrap."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pilotfish.config.bootstrap import load_bootstrap_file
from pilotfish.config.cluster_policy import HealthCheckConfig, HealthCheckType
from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import parse_address
from pilotfish.config.model import AdminConfig, Bootstrap, ListenerConfig
from pilotfish.identity import InvalidSpiffeId, SpiffeId
from sidecar.admin import AdminServer
from sidecar.listen.handoff import Acceptor, Receiver, WorkerTable, bind_listener
from sidecar.observability.tracing_config import split_endpoint
from sidecar.server import ApplyError, Sidecar

if TYPE_CHECKING:
    from sidecar.register.agent import RegistrationOptions
    from sidecar.security.workload import WorkloadCertificates

log = logging.getLogger("pilotfish.sidecar")

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
ACCEPT_POLL_S = 0.2  # how often the acceptor looks at its workers between connections


@dataclass(frozen=True)
class Handoff:
    """A worker's share of the acceptor (``sidecar.listen.handoff``)."""

    channel: socket.socket
    index: int
    table: WorkerTable
    listeners: dict[str, tuple[str, int]]


class StartError(Exception):
    """The sidecar could not start (a port is busy); the message says which and why."""


@dataclass(frozen=True)
class XdsOptions:
    address: str
    node_id: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class IdentityOptions:
    """Where the workload certificate comes from; each worker makes its own key."""

    ca_address: str
    token_file: str
    identity: SpiffeId
    control_plane_roots: bytes | None = None
    """The mesh's roots: the CA is then reached over TLS and xDS over mutual TLS."""


class IdentityUnavailable(Exception):
    """The CA did not issue the first certificate (the message says why)."""


async def _start_identity(options: IdentityOptions) -> tuple[WorkloadCertificates, Any]:
    # Loaded only when asked for: grpc and the CA's messages cost memory.
    from sidecar.security.workload import (
        CaChannel,
        CertificateError,
        GrpcCertificateSource,
        WorkloadCertificates,
        token_file,
    )

    channel = CaChannel(options.ca_address, options.control_plane_roots)
    workload = WorkloadCertificates(
        GrpcCertificateSource(channel, token_file(options.token_file)), options.identity
    )
    workload.on_change.append(lambda svid: channel.trust(svid.bundle_pem))
    try:
        await workload.start()
    except CertificateError as exc:
        await channel.close()
        raise IdentityUnavailable(str(exc)) from None
    except BaseException:
        await channel.close()
        raise
    return workload, channel


def identity_options(args: argparse.Namespace) -> IdentityOptions | None:
    """From the flags; None without ``--ca-token-file``, ``ConfigError`` naming a bad flag."""
    if not args.ca_token_file:
        if args.control_plane_roots:
            raise ConfigError(
                "--control-plane-roots", "needs --ca-token-file (mTLS needs a certificate)"
            )
        return None
    if args.control_plane_roots and not args.ca:
        raise ConfigError(
            "--ca", "required with --control-plane-roots: the CA's TLS port (the xDS port "
            "accepts only callers that already have a certificate)"
        )
    address = args.ca or args.xds
    if not address:
        raise ConfigError("--ca", "required with --ca-token-file (or give --xds)")
    parse_address("--ca", address)
    account = args.service_account or args.service
    if not account:
        raise ConfigError("--service-account", "required with --ca-token-file (or --service)")
    try:
        identity = SpiffeId(args.trust_domain, args.namespace, account)
    except InvalidSpiffeId as exc:
        raise ConfigError("--service-account", str(exc)) from None
    roots = None
    if args.control_plane_roots:
        from sidecar.security.workload import read_roots

        roots = read_roots("--control-plane-roots", args.control_plane_roots)
    return IdentityOptions(address, args.ca_token_file, identity, roots)


def _install_event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve(
    bootstrap: Bootstrap,
    *,
    admin: bool = True,
    reuse_port: bool = False,
    signals: bool = True,
    started: Callable[[Sidecar], None] | None = None,
    xds: XdsOptions | None = None,
    identity: IdentityOptions | None = None,
    handoff: Handoff | None = None,
    register: RegistrationOptions | None = None,
) -> int:
    sidecar = Sidecar(
        bootstrap,
        reuse_port=reuse_port,
        dynamic=xds is not None,
        handed_off=handoff.listeners if handoff is not None else None,
    )
    started_identity: tuple[WorkloadCertificates, Any] | None = None
    if identity is not None:
        # Before the listeners open: an mTLS listener without a certificate refuses TLS.
        started_identity = await _start_identity(identity)
        sidecar.workload = started_identity[0]
    loop = asyncio.get_event_loop()
    receiver: Receiver | None = None
    if handoff is not None:
        receiver = Receiver(handoff.channel, handoff.index, handoff.table, sidecar.serve_accepted)
        sidecar.handoff_closed = receiver.connection_closed
        if admin:
            sidecar.stats.scope("workers").sources["handoff"] = handoff.table.stats
    if signals:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, sidecar.request_stop)
        # A worker is forked with these blocked (``_run_workers``): one sent while it started
        # is delivered now, to the handler.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    admin_server = AdminServer(sidecar)
    where: tuple[str, str, int] | None = None
    try:
        if admin:
            where = "admin", bootstrap.admin.host, bootstrap.admin.port
            await admin_server.start(bootstrap.admin.host, bootstrap.admin.port)
            log.info("admin on http://%s:%d/", bootstrap.admin.host, bootstrap.admin.port)
            if bootstrap.admin.prometheus is not None:
                where = "admin prometheus_address", *bootstrap.admin.prometheus
                await admin_server.start_prometheus(*bootstrap.admin.prometheus)
            if bootstrap.admin.health is not None:
                where = "admin health_address", *bootstrap.admin.health
                await admin_server.start_health(*bootstrap.admin.health)
                log.info("health probes on http://%s:%d/ready", *bootstrap.admin.health)
        where = None
        await sidecar.start()
    except OSError as exc:
        if where is None:
            raise
        # asyncio's message repeats the address as a tuple; the reason is the errno's.
        admin_server.close()
        name, host, port = where
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartError(f"{name}: cannot listen on {host}:{port}: {reason}") from exc
    except ApplyError as exc:
        admin_server.close()
        raise StartError(str(exc)) from exc
    if receiver is not None:
        receiver.start(loop)
    xds_task: asyncio.Task[None] | None = None
    if xds is not None:
        # The xDS messages (and grpc) cost memory: only xDS-driven sidecars load them.
        from sidecar.xds.client import XdsClient, make_node

        credentials = None
        if started_identity is not None and identity is not None and identity.control_plane_roots:
            credentials = started_identity[0].channel_credentials
        client = XdsClient(
            sidecar, bootstrap, xds.address, make_node(xds.node_id, xds.metadata),
            credentials=credentials,
        )
        xds_task = loop.create_task(client.run())

        def xds_ended(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error(
                    "xDS client stopped; no further config updates", exc_info=task.exception()
                )
                sidecar.initialized = False  # stop reporting ready on a config that is frozen

        xds_task.add_done_callback(xds_ended)
    if register is not None:
        from sidecar.register.agent import RegistrationAgent

        tls = None
        if started_identity is not None and identity is not None and identity.control_plane_roots:
            # The registry is on the control plane's mTLS port, as xDS is.
            tls = started_identity[0].channel_credentials
        agent = RegistrationAgent(register, ready=lambda: sidecar.initialized, credentials=tls)
        sidecar.before_drain = agent.leave
        sidecar.on_health_check = agent.set_draining
        agent.start()
    if started is not None:
        started(sidecar)
    await sidecar.stopped.wait()
    if receiver is not None:
        receiver.stop(loop)
    if xds_task is not None:
        xds_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await xds_task
    admin_server.close()
    if started_identity is not None:
        workload, ca_channel = started_identity
        await workload.stop()
        await ca_channel.close()
    log.info("stopped")
    return 0


# glibc's mallopt parameters (malloc.h), and what the sidecar sets them to.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
TRIM_THRESHOLD = 8 << 20
MMAP_THRESHOLD = 1 << 20
ARENA_MAX = 2


def tune_malloc() -> bool:
    """Keeps freed payload buffers in the heap instead of handing them back to the kernel, and
    caps malloc's arenas.

    With glibc's defaults, a 64 KiB DATA payload freed at the top of the heap is trimmed away
    and faulted back in, zeroed, for the next one: about five page faults per proxied 64 KiB
    response. Fixed thresholds stop that, at the cost of holding up to ``TRIM_THRESHOLD`` of
    freed memory. Only on glibc, and not when the operator set ``MALLOC_*_THRESHOLD_``.
    Returns whether the thresholds were set.

    glibc gives each new thread an arena of its own, up to eight per core; grpcio starts
    several threads (an OTLP/gRPC exporter's, the xDS client's), each of which then keeps its
    own partly used heap: ``ARENA_MAX`` of them are shared instead (0.8 MB less RSS under
    load with the benchmark's bootstrap). The event loop thread does nearly all the
    allocating, so the sharing costs no contention worth measuring. Not when the operator set
    ``MALLOC_ARENA_MAX``.
    """
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        glibc = None
    if not glibc:
        return False
    import ctypes

    libc = ctypes.CDLL(None)
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(_M_ARENA_MAX, ARENA_MAX)
    if any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def _run_worker(
    bootstrap: Bootstrap,
    admin: bool,
    reuse_port: bool,
    xds: XdsOptions | None = None,
    identity: IdentityOptions | None = None,
    handoff: Handoff | None = None,
    register: RegistrationOptions | None = None,
) -> int:
    _install_event_loop_policy()
    tune_malloc()
    try:
        return asyncio.run(
            serve(
                bootstrap,
                admin=admin,
                reuse_port=reuse_port,
                xds=xds,
                identity=identity,
                handoff=handoff,
                register=register,
            )
        )
    except StartError as exc:
        print(f"pilotfish sidecar: {exc}", file=sys.stderr)
        return 1
    except IdentityUnavailable as exc:
        print(f"pilotfish sidecar: no workload certificate: {exc}", file=sys.stderr)
        return 1


def registration_options(args: argparse.Namespace) -> RegistrationOptions:
    """``--register`` and its flags; ``ConfigError`` names the flag that is wrong."""
    from sidecar.register.agent import RegistrationOptions

    if not args.xds or not args.service:
        raise ConfigError("--register", "needs --xds (the registry) and --service")
    if not args.app_address:
        raise ConfigError("--register", "needs --app-address (the app whose health gates it)")
    if int(args.concurrency) != 1:
        raise ConfigError("--register", "works with --concurrency 1 only")
    flag = "--register-address" if args.register_address else "--inbound-address"
    address = args.register_address or args.inbound_address
    if not address:
        raise ConfigError("--register-address", "required when --inbound-address is not given")
    host, port = parse_address(flag, address)
    if host in ("0.0.0.0", "::"):
        raise ConfigError(flag, "a wildcard address cannot be called: give --register-address")
    app_host, app_port = parse_address("--app-address", args.app_address)
    labels: dict[str, str] = {}
    for label in args.register_label:
        key, sep, value = label.partition("=")
        if not sep or not key:
            raise ConfigError("--register-label", f"expected KEY=VALUE, got {label!r}")
        labels[key] = value
    if not 1 <= args.register_weight <= 128:
        raise ConfigError("--register-weight", "expected 1 to 128")
    if args.register_health_interval <= 0:
        raise ConfigError("--register-health-interval", "expected seconds > 0")
    kind, _, path = args.register_health.partition(":")
    if kind == "grpc" and not path:
        health = HealthCheckConfig(type=HealthCheckType.GRPC)
    elif kind == "http" and path.startswith("/"):
        health = HealthCheckConfig(type=HealthCheckType.HTTP, path=path)
    else:
        raise ConfigError("--register-health", "expected grpc or http:/PATH")
    # One failure pulls the endpoint: a caller's retry is cheaper than a call to a dying app.
    health = dataclasses.replace(
        health, interval=args.register_health_interval, unhealthy_threshold=1,
        healthy_threshold=1, timeout=min(1.0, args.register_health_interval),
    )
    return RegistrationOptions(
        registry=args.xds, service=args.service, host=host, port=port, app_host=app_host,
        app_port=app_port, weight=args.register_weight, zone=args.register_zone, labels=labels,
        health=health,
    )


def xds_bootstrap(args: argparse.Namespace) -> Bootstrap:
    """The static part of an xDS-driven sidecar: admin, and the outbound listener."""
    admin_host, admin_port = parse_address("--admin-address", args.admin_address)
    health = parse_address("--health-address", args.health_address) if args.health_address else None
    out_host, out_port = parse_address("--outbound-address", args.outbound_address)
    base = load_bootstrap_file(args.config) if args.config else None
    outbound = ListenerConfig(
        name="outbound",
        host=out_host,
        port=out_port,
        route_config="outbound",
        # Behind iptables interception, what is not HTTP goes where the app sent it.
        tcp_passthrough_original_destination=(args.outbound_passthrough == "original-destination"),
    )
    if base is None:
        return Bootstrap(
            listeners=(outbound,),
            admin=AdminConfig(admin_host, admin_port, health=health),
            node_id=args.node_id or socket.gethostname(),
        )
    return base


def run_sidecar(args: argparse.Namespace) -> int:
    if not args.config and not args.xds:
        print("pilotfish sidecar: give --config FILE, --xds HOST:PORT, or both", file=sys.stderr)
        return 2
    # Flags win over the bootstrap and the control plane: as the standard OTEL_* variables
    # do, which every tracer this process builds applies last.
    if args.otlp_endpoint:
        try:
            split_endpoint(args.otlp_endpoint)
        except ValueError as exc:
            print(f"pilotfish sidecar: --otlp-endpoint: {exc}", file=sys.stderr)
            return 2
        os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = args.otlp_endpoint
    if args.trace_sampling is not None:
        if not 0 <= args.trace_sampling <= 1:
            print(
                "pilotfish sidecar: --trace-sampling takes a fraction from 0 to 1", file=sys.stderr
            )
            return 2
        os.environ["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        os.environ["OTEL_TRACES_SAMPLER_ARG"] = str(args.trace_sampling)
    try:
        bootstrap = xds_bootstrap(args) if args.xds else load_bootstrap_file(args.config)
        if args.app_address:
            parse_address("--app-address", args.app_address)
        if args.inbound_address:
            parse_address("--inbound-address", args.inbound_address)
        register = registration_options(args) if args.register else None
    except (ConfigError, OSError) as exc:
        print(f"pilotfish sidecar: invalid config: {exc}", file=sys.stderr)
        return 2
    xds: XdsOptions | None = None
    if args.xds:
        xds = XdsOptions(
            address=args.xds,
            node_id=args.node_id or bootstrap.node_id or socket.gethostname(),
            metadata={
                # For `pilotfish proxy-config NODE`, which finds the admin through the control
                # plane.
                "admin_address": f"{bootstrap.admin.host}:{bootstrap.admin.port}",
                "service": args.service,
                "namespace": args.namespace,
                "app_address": args.app_address,
                "inbound_address": args.inbound_address,
            },
        )
    try:
        identity = identity_options(args)
    except ConfigError as exc:
        print(f"pilotfish sidecar: {exc}", file=sys.stderr)
        return 2
    workers = max(1, int(args.concurrency))
    if workers == 1:
        return _run_worker(
            bootstrap, admin=True, reuse_port=False, xds=xds, identity=identity,
            register=register,
        )
    return _run_workers(bootstrap, workers, xds, identity)


def _run_workers(
    bootstrap: Bootstrap, workers: int, xds: XdsOptions | None, identity: IdentityOptions | None
) -> int:
    """Fork workers; this process accepts on the bootstrap's listeners and deals the
    connections out (``sidecar.listen.handoff``); worker 0 runs admin. Listeners added later
    by xDS are bound by each worker with SO_REUSEPORT."""
    sockets = {}
    for config in bootstrap.listeners:
        try:
            sockets[config.name] = bind_listener(config.host, config.port)
        except OSError as exc:
            for sock in sockets.values():
                sock.close()
            print(
                f"pilotfish sidecar: listener {config.name}: cannot listen on "
                f"{config.host}:{config.port}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 2
    table = WorkerTable(workers)
    acceptor = Acceptor(sockets, table)
    addresses = {c.name: (c.host, c.port) for c in bootstrap.listeners}
    # What exists now (modules, the parsed config) is shared with the workers copy-on-write.
    # Frozen, it is out of every worker's garbage collections, which would otherwise write to
    # each object's header and so give every worker its own copy of those pages.
    gc.freeze()
    children: dict[int, int] = {}  # pid -> worker index
    # Until each process has its handlers, a SIGTERM waits instead of killing it half-started.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for index in range(workers):
        theirs = acceptor.channel_for(index)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # The acceptor's sockets stay with it: a worker holding a listening socket
                # would keep it accepting (into nobody's hands) after the acceptor closed it.
                for sock in [*sockets.values(), *acceptor.channels.values()]:
                    sock.close()
                handoff = Handoff(theirs, index, table, addresses)
                code = _run_worker(
                    bootstrap,
                    admin=index == 0,
                    reuse_port=True,
                    xds=xds,
                    identity=identity,
                    handoff=handoff,
                )
            finally:
                os._exit(code)
        theirs.close()
        children[pid] = index

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    status = 0
    while children:
        if stopping and acceptor.listeners:
            acceptor.close_listeners()  # the workers drain; new connections are refused
        if acceptor.listeners:
            acceptor.run_once(ACCEPT_POLL_S)
        else:
            time.sleep(ACCEPT_POLL_S)
        while children:
            pid, code = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid in children:
                channel = acceptor.channels.pop(children.pop(pid), None)
                if channel is not None:
                    channel.close()
            status = status or os.waitstatus_to_exitcode(code)
    return status
