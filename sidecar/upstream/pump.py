"""Moving bytes one way between two non-blocking sockets, as fast as Python lets us.

A pump is driven by the event loop's readiness callbacks (``add_reader``/``add_writer`` on raw
file descriptors), not by transports and protocols: no ``bytes`` object per read, no write
buffer, no protocol callbacks, one Python call per wakeup.

On Linux the bytes go socket → pipe → socket with splice(2), so they never enter user space.
The pipe is borrowed from a pool the thread's pumps share and given back as soon as it is
empty again, which is at the end of almost every wakeup: only a pump whose destination is full
holds one. So a thousand connections do not cost two thousand pipes (and four thousand file
descriptors), and per-user pipe limits are not reached. Without splice, or when no pipe can be
had, the bytes are read into a scratch buffer of the thread and sent on at once; only what the
destination did not take is copied out and kept.

Either way a pump holds at most one read's worth of bytes, and while the destination has not
taken them the source is not read: the sender is held back by TCP's own window, in both
directions, however slow the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import threading
import weakref
from collections import Counter
from typing import Protocol

# At most this much moves per wakeup: the size of a read, and of a pipe.
CHUNK_BYTES = 256 * 1024
# Empty pipes a thread keeps for its pumps; more are closed when given back.
SPARE_PIPES = 4

_SPLICE = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_SETPIPE_SZ: int | None = getattr(fcntl, "F_SETPIPE_SZ", None)
_GETPIPE_SZ: int | None = getattr(fcntl, "F_GETPIPE_SZ", None)


def splice_supported() -> bool:
    return _SPLICE is not None


class PumpOwner(Protocol):
    """Told when a pump has finished its direction, cleanly or not."""

    def pump_done(self, pump: Pump) -> None:
        """The source ended and everything was written; the destination was shut for writing."""

    def pump_failed(self, pump: Pump, exc: OSError) -> None:
        """Reading, writing or shutting down failed (a reset, most often); the pump stopped."""


def _close_pair(read_fd: int, write_fd: int) -> None:
    os.close(read_fd)
    os.close(write_fd)


class Pipe:
    """A non-blocking pipe to splice through; ``size`` is what it holds at most.

    Closed by ``close()``, or when it is collected: a thread's pool goes away with the thread,
    and its pipes must not stay open.
    """

    __slots__ = ("__weakref__", "_closer", "read_fd", "size", "write_fd")

    def __init__(self, read_fd: int, write_fd: int, size: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.size = size
        self._closer = weakref.finalize(self, _close_pair, read_fd, write_fd)

    @classmethod
    def open(cls) -> Pipe:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        size = 65536  # Linux's default
        if _SETPIPE_SZ is not None and _GETPIPE_SZ is not None:
            # A larger pipe moves more per wakeup. Past the per-user limit the kernel refuses,
            # and the pipe keeps the size it has.
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_fd, _SETPIPE_SZ, CHUNK_BYTES)
            with contextlib.suppress(OSError):
                size = fcntl.fcntl(write_fd, _GETPIPE_SZ)
        return cls(read_fd, write_fd, size)

    def close(self) -> None:
        self._closer()  # closes once; later calls do nothing


class PipePool:
    """Empty pipes for the pumps of one thread (one event loop)."""

    def __init__(self, spare: int = SPARE_PIPES) -> None:
        self.spare = spare
        self.pipes: list[Pipe] = []

    def take(self) -> Pipe | None:
        """An empty pipe, or None when none can be opened (out of file descriptors)."""
        if self.pipes:
            return self.pipes.pop()
        try:
            return Pipe.open()
        except OSError:
            return None

    def give(self, pipe: Pipe) -> None:
        """Take back a pipe; it must be empty."""
        if len(self.pipes) < self.spare:
            self.pipes.append(pipe)
        else:
            pipe.close()


_per_thread = threading.local()


def _thread_pool() -> PipePool:
    pool: PipePool | None = getattr(_per_thread, "pipes", None)
    if pool is None:
        pool = _per_thread.pipes = PipePool()
    return pool


def _thread_scratch() -> memoryview:
    view: memoryview | None = getattr(_per_thread, "scratch", None)
    if view is None:
        view = _per_thread.scratch = memoryview(bytearray(CHUNK_BYTES))
    return view


class Pump:
    """Moves the bytes that arrive on ``src`` to ``dst``, and ``src``'s end as a FIN.

    ``pending`` is written before anything is read (the bytes a listener read while telling
    the protocol). ``counters[counter]`` grows by every byte read from ``src``. The owner
    closes the sockets; a pump only stops watching them (``close``).
    """

    __slots__ = (
        "_dst_fd",
        "_reading",
        "_src_fd",
        "_writing",
        "closed",
        "counter",
        "counters",
        "done",
        "dst",
        "in_pipe",
        "loop",
        "owner",
        "pending",
        "pipe",
        "pipes",
        "src",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src: socket.socket,
        dst: socket.socket,
        owner: PumpOwner,
        counters: Counter[str],
        counter: str,
        *,
        pending: bytes = b"",
        splice: bool = True,
    ) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self._src_fd = src.fileno()
        self._dst_fd = dst.fileno()
        self.owner = owner
        self.counters = counters
        self.counter = counter
        # Bytes not yet written: the listener's, or what a copy could not send at once.
        self.pending = memoryview(pending)
        # The pipe this pump holds while its destination is full, and how much is in it.
        self.pipe: Pipe | None = None
        self.in_pipe = 0
        self.pipes = _thread_pool() if splice and _SPLICE is not None else None
        self._reading = self._writing = False
        self.done = self.closed = False

    @property
    def held(self) -> int:
        """Bytes read from ``src`` and not yet written to ``dst``."""
        return len(self.pending) + self.in_pipe

    @property
    def waiting_to_write(self) -> bool:
        return self._writing

    def start(self) -> None:
        if self._flush():
            self._read()

    def close(self) -> None:
        """Stop watching the sockets and drop what is held; the sockets stay open."""
        if self.closed:
            return
        self.closed = True
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self._src_fd)
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self._dst_fd)
        if self.pipe is not None:
            self.pipe.close()  # not empty: it cannot go back to the pool
            self.pipe = None

    # -- readiness callbacks --------------------------------------------------------------

    def _on_readable(self) -> None:
        # Only called with nothing held (a pump waiting to write does not read), so the
        # pipe taken here is empty: EAGAIN means the socket had nothing, never a full pipe.
        pipes = self.pipes
        pipe = pipes.take() if pipes is not None else None
        if pipe is None:
            self._copy()
            return
        assert _SPLICE is not None
        try:
            n = _SPLICE(self._src_fd, pipe.write_fd, pipe.size, None, None, _SPLICE_FLAGS)
        except BlockingIOError:
            n = -1
        except OSError as exc:
            self._give_back(pipe)
            self._fail(exc)
            return
        if n <= 0:
            self._give_back(pipe)
            if n == 0:
                self._end_of_input()
            return
        self.counters[self.counter] += n
        try:
            while n:
                n -= _SPLICE(pipe.read_fd, self._dst_fd, n, None, None, _SPLICE_FLAGS)
        except BlockingIOError:
            self.pipe = pipe
            self.in_pipe = n
            self._wait_writable()
            return
        except OSError as exc:
            pipe.close()  # it still holds bytes
            self._fail(exc)
            return
        self._give_back(pipe)

    def _copy(self) -> None:
        view = _thread_scratch()
        try:
            n = self.src.recv_into(view)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(exc)
            return
        if n == 0:
            self._end_of_input()
            return
        self.counters[self.counter] += n
        try:
            sent = self.dst.send(view[:n])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(exc)
            return
        if sent < n:
            self.pending = memoryview(bytes(view[sent:n]))
            self._wait_writable()

    def _on_writable(self) -> None:
        if self._flush():
            self._writing = False
            self.loop.remove_writer(self._dst_fd)
            self._read()

    # -- states -----------------------------------------------------------------------------

    def _flush(self) -> bool:
        """Write what is held; True when nothing is left (False: waiting, or failed)."""
        try:
            while self.pending:
                sent = self.dst.send(self.pending)
                self.pending = self.pending[sent:]
            pipe = self.pipe
            if pipe is not None:
                assert _SPLICE is not None
                while self.in_pipe:
                    self.in_pipe -= _SPLICE(
                        pipe.read_fd, self._dst_fd, self.in_pipe, None, None, _SPLICE_FLAGS
                    )
                self.pipe = None
                self._give_back(pipe)
        except BlockingIOError:
            self._wait_writable()
            return False
        except OSError as exc:
            self._fail(exc)
            return False
        return True

    def _give_back(self, pipe: Pipe) -> None:
        if self.pipes is not None:
            self.pipes.give(pipe)
        else:
            pipe.close()

    def _read(self) -> None:
        if not self._reading and not self.closed:
            self._reading = True
            self.loop.add_reader(self._src_fd, self._on_readable)

    def _wait_writable(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self._src_fd)
        if not self._writing and not self.closed:
            self._writing = True
            self.loop.add_writer(self._dst_fd, self._on_writable)

    def _end_of_input(self) -> None:
        # Nothing is held here: input is only read once all before it was written.
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(exc)
            return
        self.done = True
        self.close()
        self.owner.pump_done(self)

    def _fail(self, exc: OSError) -> None:
        self.close()
        self.owner.pump_failed(self, exc)
