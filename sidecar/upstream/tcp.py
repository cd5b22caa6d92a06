"""TCP passthrough: relay bytes both ways to a target, with backpressure both ways.

The target is a cluster host, or the connection's original destination (where the client
meant to go before iptables redirected it to the sidecar). The bytes are moved by pumps
(``sidecar/upstream/pump.py``), zero-copy with splice(2) on Linux; ``PILOTFISH_TCP_SPLICE=0`` makes
them copy through user space instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Any, Protocol, cast

from sidecar.upstream.pump import Pump, splice_supported

if TYPE_CHECKING:
    from sidecar.stats import Scope
    from sidecar.upstream.clusters import ClusterRuntime

log = logging.getLogger(__name__)

SPLICE = splice_supported() and os.environ.get("PILOTFISH_TCP_SPLICE", "1") != "0"
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff 1, l_linger 0}: close with RST


class RelayOwner(Protocol):
    """What a relay needs of the listener that accepted its connection: the listener's stats,
    and its book of open connections (for stats and draining)."""

    @property
    def scope(self) -> Scope: ...

    def connection_opened(self, conn: Any) -> None: ...

    def connection_closed(self, conn: Any) -> None: ...


class RelayTarget(Protocol):
    """Where a passthrough connection goes, and where its upstream stats are counted."""

    @property
    def scope(self) -> Scope: ...

    @property
    def connect_timeout(self) -> float: ...

    def choose(self) -> tuple[str, int] | None:
        """``(host, port)`` to connect to, or None when there is nowhere to go."""
        ...


class ClusterTarget:
    """A host of a cluster, picked by the cluster's balancer."""

    def __init__(self, cluster: ClusterRuntime) -> None:
        self.cluster = cluster

    @property
    def scope(self) -> Scope:
        return self.cluster.scope

    @property
    def connect_timeout(self) -> float:
        return self.cluster.config.connect_timeout

    def choose(self) -> tuple[str, int] | None:
        choice = self.cluster.choose_host(set())
        if choice is None:
            return None
        endpoint = choice[1].endpoint
        return endpoint.host, endpoint.port


class OriginalDestination:
    """The one address the client dialled; stats go to ``cluster.original_dst``."""

    def __init__(self, host: str, port: int, connect_timeout: float, scope: Scope) -> None:
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.scope = scope

    def choose(self) -> tuple[str, int] | None:
        return self.host, self.port


async def connect_tcp(host: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket (``TCP_NODELAY`` on) to the first address that takes it.

    Literal addresses are not sent to the resolver, which runs in a thread pool.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


class TcpRelay(asyncio.Protocol):
    """One passthrough connection: the two sockets and a pump each way between them.

    It is handed the listener's transport only to take the socket out of it: a duplicate of
    the descriptor goes to the pumps and the transport is dropped (aborting it closes its
    descriptor, not the connection). Upstream it connects a socket of its own.

    A FIN from either side is passed on while the other direction keeps flowing; the
    connection is closed once both directions have ended. A reset or an error on either
    side resets both (``SO_LINGER`` 0): the other peer learns the conversation broke, rather
    than reading a FIN as a clean end.
    """

    def __init__(
        self, listener: RelayOwner, target: RelayTarget, *, splice: bool | None = None
    ) -> None:
        self.listener = listener
        self.target = target
        self.splice = SPLICE if splice is None else splice
        self.head = bytearray()
        self.downstream: socket.socket | None = None
        self.upstream: socket.socket | None = None
        self.pumps: tuple[Pump, Pump] | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def active_streams(self) -> int:
        return 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        listener = self.listener
        listener.connection_opened(self)
        listener.scope.inc("downstream_cx_tcp_passthrough")
        try:
            sock: socket.socket = transport.get_extra_info("socket").dup()
        except OSError as exc:  # out of file descriptors
            log.warning("tcp passthrough: cannot take the connection's socket: %s", exc)
            transport.abort()
            self.closed = True
            listener.connection_closed(self)
            return
        transport.abort()
        sock.setblocking(False)
        with contextlib.suppress(OSError):  # the client may be gone already; the pump will see
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.downstream = sock
        self.connect_task = asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        # Only the bytes the listener read while it told the protocol; the pump sends them
        # first, ahead of anything else the client sent.
        self.head += data

    def connection_lost(self, exc: Exception | None) -> None:
        """The dropped transport's end; the connection lives on in our own sockets."""

    async def _connect(self) -> None:
        target = self.target
        address = target.choose()
        if address is None:
            log.info("tcp passthrough: no host to connect to")
            self.close()
            return
        host, port = address
        try:
            upstream = await asyncio.wait_for(connect_tcp(host, port), target.connect_timeout)
        except (OSError, TimeoutError) as exc:
            target.scope.inc("upstream_cx_connect_fail")
            log.info("tcp passthrough to %s:%d failed: %r", host, port, exc)
            self.close()
            return
        downstream = self.downstream
        if self.closed or downstream is None:
            upstream.close()
            return
        self.upstream = upstream
        scope = target.scope
        scope.inc("upstream_cx_total")
        scope.gauge_add("upstream_cx_active", 1)
        scope.inc("upstream_cx_tx_bytes_total", len(self.head))
        loop = asyncio.get_running_loop()
        self.pumps = (
            Pump(
                loop,
                downstream,
                upstream,
                self,
                scope.counters,
                "upstream_cx_tx_bytes_total",
                pending=bytes(self.head),
                splice=self.splice,
            ),
            Pump(
                loop,
                upstream,
                downstream,
                self,
                scope.counters,
                "upstream_cx_rx_bytes_total",
                splice=self.splice,
            ),
        )
        self.head = bytearray()
        for pump in self.pumps:
            pump.start()

    def pump_done(self, pump: Pump) -> None:
        if self.pumps is not None and all(p.done for p in self.pumps):
            self.close()  # both directions are finished

    def pump_failed(self, pump: Pump, exc: OSError) -> None:
        to = "upstream" if self.pumps is not None and pump is self.pumps[0] else "downstream"
        log.debug("tcp passthrough: relaying to %s failed: %r", to, exc)
        self.abort()

    def close(self) -> None:
        """Close both sides: a FIN after what the kernel still holds to send."""
        self._close(reset=False)

    def abort(self) -> None:
        """Reset both sides."""
        self._close(reset=True)

    def _close(self, *, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        task = self.connect_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        if self.pumps is not None:
            for pump in self.pumps:
                pump.close()
        for sock in (self.downstream, self.upstream):
            if sock is None:
                continue
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.close()
        if self.upstream is not None:
            self.target.scope.gauge_add("upstream_cx_active", -1)
        self.listener.connection_closed(self)

    def start_drain(self) -> None:
        """Opaque bytes have no graceful end: let the connection run until the drain ends."""
