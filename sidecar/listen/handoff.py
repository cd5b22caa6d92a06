"""Connections balanced across workers: one acceptor deals accepted sockets to the workers.

With ``--concurrency N`` and SO_REUSEPORT, the kernel hashes each connection's addresses to a
worker: a handful of long-lived HTTP/2 connections (what a mesh has) lands unevenly, four
connections split 4/0 as easily as 2/2. Instead, as Envoy's ``exact_balance``, the parent
process binds the bootstrap's listeners, accepts, and hands each connection (its file
descriptor, over a Unix socket, with the listener's name) to the worker with the fewest active
connections; ties go round the workers in turn.

What each worker has accepted and closed is counted in memory shared by all the processes
(``WorkerTable``, made before the fork): each counter has one writer (the acceptor writes
``handed``, worker *i* writes its own ``accepted`` and ``closed``), so no lock is needed and a
reader sees each count whole. Worker 0's ``/stats`` shows them as ``workers.<i>.*``.

Listeners that come later from xDS are not known to the acceptor: each worker binds those with
SO_REUSEPORT, as before.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import selectors
import socket
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

_FIELDS = 3  # handed, accepted, closed
_HANDED, _ACCEPTED, _CLOSED = range(_FIELDS)
MAX_NAME = 256  # a listener name, the message that goes with each descriptor
BATCH = 64  # connections accepted from one listener per wake-up, at most


class WorkerTable:
    """Per-worker connection counts in an anonymous shared mapping (inherited by ``fork``)."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._map = mmap.mmap(-1, 8 * _FIELDS * workers)
        self._counts = memoryview(self._map).cast("q")
        self._next = 0

    def _add(self, worker: int, field: int) -> None:
        self._counts[worker * _FIELDS + field] += 1

    def handed(self, worker: int) -> None:
        self._add(worker, _HANDED)

    def accepted(self, worker: int) -> None:
        self._add(worker, _ACCEPTED)

    def closed(self, worker: int) -> None:
        self._add(worker, _CLOSED)

    def active(self, worker: int) -> int:
        """Connections handed to ``worker`` and not yet closed (in flight to it included)."""
        counts = self._counts
        return counts[worker * _FIELDS + _HANDED] - counts[worker * _FIELDS + _CLOSED]

    def pick(self, alive: Iterable[int]) -> int | None:
        """The live worker with the fewest active connections; ties in turn from the last."""
        candidates = sorted(alive)
        if not candidates:
            return None
        start = self._next
        best = min(candidates, key=lambda w: (self.active(w), (w - start) % self.workers))
        self._next = (best + 1) % self.workers
        return best

    def stats(self) -> dict[str, int]:
        counts = self._counts
        out: dict[str, int] = {}
        for worker in range(self.workers):
            base = worker * _FIELDS
            accepted = counts[base + _ACCEPTED]
            out[f"{worker}.downstream_cx_accepted"] = accepted
            out[f"{worker}.downstream_cx_active"] = accepted - counts[base + _CLOSED]
        return out


def bind_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Acceptor:
    """The parent's loop: accept on every listener, hand each connection to a worker."""

    def __init__(self, listeners: dict[str, socket.socket], table: WorkerTable) -> None:
        self.listeners = listeners
        self.table = table
        self.channels: dict[int, socket.socket] = {}  # worker index -> its end of the pair
        self._selector = selectors.DefaultSelector()
        for name, sock in listeners.items():
            self._selector.register(sock, selectors.EVENT_READ, name)
        self.stopped = False

    def channel_for(self, worker: int) -> socket.socket:
        """Make worker ``worker``'s channel before forking it; returns the worker's end."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.channels[worker] = ours
        return theirs

    def close_listeners(self) -> None:
        for sock in self.listeners.values():
            self._selector.unregister(sock)
            sock.close()
        self.listeners = {}

    def run_once(self, timeout: float) -> int:
        """Wait up to ``timeout`` for connections and deal them out; how many were handed."""
        handed = 0
        for key, _ in self._selector.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            for _ in range(BATCH):
                try:
                    conn, _addr = sock.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # EMFILE, ECONNABORTED...: this connection is lost
                    log.warning("listener %s: accept failed: %s", key.data, exc)
                    break
                with conn:
                    handed += self._hand(key.data, conn)
        return handed

    def _hand(self, name: str, conn: socket.socket) -> int:
        while True:
            worker = self.table.pick(self.channels)
            if worker is None:
                return 0  # no worker left: the connection is closed
            try:
                socket.send_fds(self.channels[worker], [name.encode()], [conn.fileno()])
            except OSError as exc:  # that worker is gone: take it out and try the next
                log.warning("worker %d does not take connections (%s); skipping it", worker, exc)
                self.channels.pop(worker).close()
                continue
            self.table.handed(worker)
            return 1


class Receiver:
    """A worker's end: takes the connections the acceptor hands it."""

    def __init__(
        self,
        channel: socket.socket,
        worker: int,
        table: WorkerTable,
        serve: Callable[[str, socket.socket], bool],
    ) -> None:
        """``serve(listener_name, sock)`` starts serving an accepted socket; False if that
        listener is gone (the socket is then closed)."""
        self.channel = channel
        self.worker = worker
        self.table = table
        self.serve = serve
        channel.setblocking(False)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_reader(self.channel.fileno(), self._readable)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.channel.fileno())

    def connection_closed(self) -> None:
        self.table.closed(self.worker)

    def _readable(self) -> None:
        for _ in range(BATCH):
            try:
                message, fds, _flags, _addr = socket.recv_fds(self.channel, MAX_NAME, 1)
            except (BlockingIOError, InterruptedError):
                return
            for fd in fds:
                sock = socket.socket(fileno=fd)
                self.table.accepted(self.worker)
                sock.setblocking(False)
                if not self.serve(message.decode(errors="replace"), sock):
                    sock.close()
                    self.table.closed(self.worker)
