"""``pilotfish identity-agent``: keep a workload certificate fresh and serve it over SDS.

For pods whose proxy is Envoy: the agent runs beside it, makes the key, gets it signed by the
control plane's CA, rotates it at half lifetime, and serves it on a Unix socket that Envoy's
SDS config points at (``sidecar.security.sds``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.secret.v3 import sds_pb2_grpc

from pilotfish.config.errors import ConfigError
from pilotfish.config.fields import parse_duration
from pilotfish.identity import InvalidSpiffeId, SpiffeId
from sidecar.security.sds import SecretDiscovery, SecretSource
from sidecar.security.workload import (
    CaChannel,
    CertificateError,
    GrpcCertificateSource,
    WorkloadCertificates,
    read_roots,
    token_file,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class IdentityAgent:
    certificates: WorkloadCertificates
    server: grpc.aio.Server
    channel: CaChannel
    socket_path: Path

    async def stop(self) -> None:
        await self.server.stop(None)
        await self.certificates.stop()
        await self.channel.close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


async def start_identity_agent(
    ca_address: str,
    token_path: str | Path,
    identity: SpiffeId,
    socket_path: str | Path,
    ttl: float | None = None,
    control_plane_roots: bytes | None = None,
) -> IdentityAgent:
    """Fetch the first certificate (``CertificateError`` if the CA refuses), then serve SDS.

    ``control_plane_roots``: the CA is called over TLS, verified against these roots."""
    channel = CaChannel(ca_address, control_plane_roots)
    certificates = WorkloadCertificates(
        GrpcCertificateSource(channel, token_file(token_path)), identity, ttl
    )
    certificates.on_change.append(lambda svid: channel.trust(svid.bundle_pem))
    try:
        await certificates.start()
    except BaseException:
        await channel.close()
        raise
    source = SecretSource()
    source.update(certificates.svid)
    certificates.on_change.append(source.update)
    server = grpc.aio.server()
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(SecretDiscovery(source), server)
    path = Path(socket_path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a socket left by a previous run
    # The socket hands out the private key: only the pod's own user may connect.
    old_umask = os.umask(0o077)
    try:
        bound = server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(old_umask)
    if bound == 0:
        await certificates.stop()
        await channel.close()
        raise OSError(f"cannot listen on unix:{path}")
    await server.start()
    log.info("identity agent: %s, SDS on unix:%s", identity, path)
    return IdentityAgent(certificates, server, channel, path)


def _identity(args: argparse.Namespace) -> SpiffeId:
    try:
        return SpiffeId(args.trust_domain, args.namespace, args.service_account)
    except InvalidSpiffeId as exc:
        raise ConfigError("--service-account", str(exc)) from None


async def _serve(args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration("--cert-ttl", args.cert_ttl) if args.cert_ttl else None
        roots = (
            read_roots("--control-plane-roots", args.control_plane_roots)
            if args.control_plane_roots
            else None
        )
        agent = await start_identity_agent(
            args.ca, args.token_file, _identity(args), args.sds_socket, ttl, roots
        )
    except (ConfigError, CertificateError, OSError) as exc:
        print(f"pilotfish identity-agent: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await agent.stop()
    return 0


def run_identity_agent(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))
