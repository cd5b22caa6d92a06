"""Pool bookkeeping without sockets: fake connections stand in for the I/O edge."""

from __future__ import annotations

from sidecar.flags import ResponseFlag
from sidecar.upstream.pool import ConnectionPool, PooledConnection


class Conn:
    def __init__(self, max_streams: int) -> None:
        self.max_streams = max_streams
        self.streams = 0
        self.draining = False
        self.closed = False

    def is_available(self) -> bool:
        return not self.closed and not self.draining and self.streams < self.max_streams

    def is_idle(self) -> bool:
        return self.streams == 0

    def close(self) -> None:
        self.closed = True


class Waiter:
    def __init__(self) -> None:
        self.cancelled = False
        self.conn: PooledConnection | None = None
        self.failure: ResponseFlag | None = None

    def on_connection(self, conn: PooledConnection) -> None:
        assert isinstance(conn, Conn)
        conn.streams += 1
        self.conn = conn

    def on_pool_failure(self, flag: ResponseFlag) -> None:
        self.failure = flag


def make_pool(
    hint: int, max_connections: int = 4, max_pending: int = 100
) -> tuple[ConnectionPool, list[int]]:
    connects: list[int] = []
    pool = ConnectionPool(
        lambda p: connects.append(1),
        max_connections=max_connections,
        max_pending=max_pending,
        streams_per_connection_hint=hint,
    )
    return pool, connects


def test_first_request_connects_and_waits() -> None:
    pool, connects = make_pool(hint=100)
    w = Waiter()
    pool.acquire(w)
    assert connects == [1] and w.conn is None
    conn = Conn(max_streams=100)
    pool.connected(conn)
    assert w.conn is conn


def test_http2_multiplexes_until_peer_limit_then_opens_another() -> None:
    pool, connects = make_pool(hint=2)
    first = Conn(max_streams=2)
    waiters = [Waiter() for _ in range(3)]
    pool.acquire(waiters[0])
    pool.connected(first)
    pool.acquire(waiters[1])
    assert waiters[1].conn is first and len(connects) == 1
    pool.acquire(waiters[2])  # first is full: SETTINGS_MAX_CONCURRENT_STREAMS reached
    assert waiters[2].conn is None and len(connects) == 2
    second = Conn(max_streams=2)
    pool.connected(second)
    assert waiters[2].conn is second


def test_queued_waiters_do_not_open_a_connection_each() -> None:
    pool, connects = make_pool(hint=100)
    for _ in range(50):
        pool.acquire(Waiter())
    assert len(connects) == 1


def test_http1_opens_one_connection_per_waiter_up_to_the_limit() -> None:
    pool, connects = make_pool(hint=1, max_connections=3)
    for _ in range(5):
        pool.acquire(Waiter())
    assert len(connects) == 3


def test_released_stream_serves_next_waiter() -> None:
    pool, _ = make_pool(hint=1, max_connections=1)
    conn = Conn(max_streams=1)
    a, b = Waiter(), Waiter()
    pool.acquire(a)
    pool.connected(conn)
    pool.acquire(b)
    assert b.conn is None
    conn.streams -= 1
    pool.released(conn)
    assert b.conn is conn


def test_draining_connection_gets_no_new_streams() -> None:
    pool, connects = make_pool(hint=100)
    conn = Conn(max_streams=100)
    pool.acquire(Waiter())
    pool.connected(conn)
    conn.draining = True  # GOAWAY received
    pool.capacity_changed(conn)
    w = Waiter()
    pool.acquire(w)
    assert w.conn is None and len(connects) == 2


def test_connect_failure_fails_waiters() -> None:
    pool, _ = make_pool(hint=100)
    waiters = [Waiter() for _ in range(3)]
    for w in waiters:
        pool.acquire(w)
    pool.connect_failed()
    assert [w.failure for w in waiters] == [ResponseFlag.UPSTREAM_CONNECT_FAILURE] * 3
    assert pool.connecting == 0 and not pool.waiters


def test_cancelled_waiters_are_skipped() -> None:
    pool, _ = make_pool(hint=100)
    a, b = Waiter(), Waiter()
    pool.acquire(a)
    pool.acquire(b)
    a.cancelled = True
    conn = Conn(max_streams=1)
    pool.connected(conn)
    assert a.conn is None and b.conn is conn


def test_pending_overflow() -> None:
    pool, _ = make_pool(hint=100, max_pending=2)
    waiters = [Waiter() for _ in range(3)]
    for w in waiters:
        pool.acquire(w)
    assert waiters[2].failure is ResponseFlag.UPSTREAM_OVERFLOW
    assert waiters[0].failure is None


def test_drain_fails_waiters_and_closes_idle() -> None:
    pool, _ = make_pool(hint=1, max_connections=1)
    idle, busy = Conn(max_streams=1), Conn(max_streams=1)
    pool.connecting = 2
    pool.connected(idle)
    pool.connected(busy)
    busy.streams = 1
    waiting = Waiter()
    pool.waiters.append(waiting)
    pool.drain()
    assert idle.closed and not busy.closed
    assert waiting.failure is ResponseFlag.NO_HEALTHY_UPSTREAM
    late = Waiter()
    pool.acquire(late)
    assert late.failure is ResponseFlag.NO_HEALTHY_UPSTREAM


def test_checkout_takes_a_connection_with_room_unless_waiters_are_ahead() -> None:
    pool, connects = make_pool(hint=1)
    assert pool.checkout() is None  # nothing yet: the caller waits in acquire
    first, second = Waiter(), Waiter()
    pool.acquire(first)
    pool.acquire(second)
    conn = Conn(max_streams=1)
    pool.connected(conn)
    assert first.conn is conn and second.conn is None
    conn.streams -= 1  # first's stream ends: room again, but second has waited longer
    assert pool.checkout() is None
    pool.released(conn)
    assert second.conn is conn
    conn.streams -= 1
    assert pool.checkout() is conn and connects == [1, 1]
    pool.drain()
    assert pool.checkout() is None
