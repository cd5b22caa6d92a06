"""Connection pool bookkeeping for one upstream endpoint, without I/O.

The pool decides; its owner does the I/O. ``checkout`` returns a connection with room for one
more stream, if one has room now. Otherwise ``acquire`` either hands the waiter a connection at
once, queues it, or fails it (overflow). When the queue needs more
capacity than the connections being established will bring, the pool asks its ``connect``
callback for a new connection; the owner reports back through ``connected``/``connect_failed``.
HTTP/2 connections take many streams each (up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS);
HTTP/1.1 connections take one request at a time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from sidecar.flags import ResponseFlag


class PooledConnection(Protocol):
    def is_available(self) -> bool:
        """Can take one more stream now (open, not draining, under the stream limit)."""

    def is_idle(self) -> bool:
        """Carries no stream."""

    def close(self) -> None: ...


class Waiter(Protocol):
    cancelled: bool

    def on_connection(self, conn: PooledConnection) -> None: ...

    def on_pool_failure(self, flag: ResponseFlag) -> None: ...


class ConnectionPool:
    def __init__(
        self,
        connect: Callable[[ConnectionPool], None],
        *,
        max_connections: int,
        max_pending: int,
        streams_per_connection_hint: int,
    ) -> None:
        self._connect = connect
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.hint = streams_per_connection_hint
        self.connections: list[PooledConnection] = []
        self.connecting = 0
        self.waiters: deque[Waiter] = deque()
        self.draining = False

    @property
    def total_connections(self) -> int:
        return len(self.connections) + self.connecting

    def checkout(self) -> PooledConnection | None:
        """A connection with room for one more stream now, unless waiters are ahead (they
        go first); None: the caller waits in ``acquire``. The common request takes this
        path, and so never waits, nor holds a pending-request slot."""
        if self.draining or self.waiters:
            return None
        for conn in self.connections:
            if conn.is_available():
                return conn
        return None

    def acquire(self, waiter: Waiter) -> None:
        if self.draining:
            waiter.on_pool_failure(ResponseFlag.NO_HEALTHY_UPSTREAM)
            return
        conn = self._find_available()
        if conn is not None:
            waiter.on_connection(conn)
            return
        self._drop_cancelled()
        if len(self.waiters) >= self.max_pending:
            waiter.on_pool_failure(ResponseFlag.UPSTREAM_OVERFLOW)
            return
        self.waiters.append(waiter)
        self._maybe_connect()

    def _find_available(self) -> PooledConnection | None:
        for conn in self.connections:
            if conn.is_available():
                return conn
        return None

    def _drop_cancelled(self) -> None:
        while self.waiters and self.waiters[0].cancelled:
            self.waiters.popleft()
        if any(w.cancelled for w in self.waiters):
            self.waiters = deque(w for w in self.waiters if not w.cancelled)

    def _maybe_connect(self) -> None:
        while (
            self.waiters
            and self.connecting * self.hint < len(self.waiters)
            and self.total_connections < self.max_connections
        ):
            self.connecting += 1
            self._connect(self)

    def _serve_waiters(self) -> None:
        while self.waiters:
            waiter = self.waiters[0]
            if waiter.cancelled:
                self.waiters.popleft()
                continue
            conn = self._find_available()
            if conn is None:
                break
            self.waiters.popleft()
            waiter.on_connection(conn)
        if self.waiters:
            self._maybe_connect()

    # -- reports from the owner --------------------------------------------------------------

    def connected(self, conn: PooledConnection) -> None:
        self.connecting -= 1
        self.connections.append(conn)
        self._serve_waiters()

    def connect_failed(self, flag: ResponseFlag = ResponseFlag.UPSTREAM_CONNECT_FAILURE) -> None:
        """A connection attempt failed: the waiters it was meant for fail with it."""
        self.connecting -= 1
        doomed = len(self.waiters) if self.connecting == 0 else min(self.hint, len(self.waiters))
        for _ in range(doomed):
            waiter = self.waiters.popleft()
            if not waiter.cancelled:
                waiter.on_pool_failure(flag)

    def released(self, conn: PooledConnection) -> None:
        """A stream or request on ``conn`` finished: room for a waiter."""
        if self.waiters:
            self._serve_waiters()

    def capacity_changed(self, conn: PooledConnection) -> None:
        if self.waiters:
            self._serve_waiters()

    def closed(self, conn: PooledConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        if self.waiters:
            self._serve_waiters()

    def drain(self) -> None:
        """The endpoint left the cluster: close idle connections, let busy ones finish."""
        self.draining = True
        waiters, self.waiters = self.waiters, deque()
        for waiter in waiters:
            if not waiter.cancelled:
                waiter.on_pool_failure(ResponseFlag.NO_HEALTHY_UPSTREAM)
        for conn in list(self.connections):
            if conn.is_idle():
                conn.close()

    def close_idle(self) -> list[PooledConnection]:
        idle = [c for c in self.connections if c.is_idle()]
        for conn in idle:
            conn.close()
        return idle
