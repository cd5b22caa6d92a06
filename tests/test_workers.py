"""``--concurrency N``: one acceptor deals connections to the workers, fewest active first.

A real ``pilotfish sidecar --concurrency 2`` process, real HTTP/2 connections on loopback;
the split is read from worker 0's ``/stats`` (``workers.<i>.*``, counted by each worker).
"""

from __future__ import annotations

from collections.abc import Iterator

import h2.events
import pytest

from tests.h2_upstream import H2Upstream
from tests.support import SidecarProcess, http_get, simple_config, wait_for
from tests.test_http_proxy import RawH2Client


@pytest.fixture
def two_workers() -> Iterator[SidecarProcess]:
    upstream = H2Upstream()
    proc = SidecarProcess(simple_config([upstream.address]), "--concurrency", "2")
    try:
        yield proc
    finally:
        proc.stop()
        upstream.stop()


def worker_stats(proc: SidecarProcess) -> dict[str, int]:
    status, text = http_get(proc.admin_url + "/stats")
    assert status == 200
    stats: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith("workers."):
            stats[name.removeprefix("workers.")] = int(value)
    return stats


def connect_and_get(proc: SidecarProcess) -> RawH2Client:
    client = RawH2Client(proc.address)
    sid = client.request("/echo")
    assert client.read_until(
        lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == sid
    ), proc.log()
    assert client.status(sid) == "200"
    return client


def test_connections_are_split_evenly_and_to_the_least_busy_worker(
    two_workers: SidecarProcess,
) -> None:
    clients = [connect_and_get(two_workers) for _ in range(8)]
    stats = worker_stats(two_workers)
    assert (stats["0.downstream_cx_accepted"], stats["1.downstream_cx_accepted"]) == (4, 4)
    assert (stats["0.downstream_cx_active"], stats["1.downstream_cx_active"]) == (4, 4)

    # Close the four connections of worker 0 (ties are dealt in turn: 0, 1, 0, 1...): the
    # next four all go to it, the worker with fewer connections open.
    for client in clients[0::2]:
        client.close()
    assert wait_for(lambda: worker_stats(two_workers)["0.downstream_cx_active"] == 0)
    clients[0::2] = [connect_and_get(two_workers) for _ in range(4)]
    stats = worker_stats(two_workers)
    assert (stats["0.downstream_cx_accepted"], stats["1.downstream_cx_accepted"]) == (8, 4)
    assert (stats["0.downstream_cx_active"], stats["1.downstream_cx_active"]) == (4, 4)
    for client in clients:
        client.close()
    assert wait_for(
        lambda: worker_stats(two_workers)
        in ({"0.downstream_cx_accepted": 8, "1.downstream_cx_accepted": 4,
             "0.downstream_cx_active": 0, "1.downstream_cx_active": 0},)
    )  # fmt: skip


def test_workers_stop_on_sigterm_even_while_starting(two_workers: SidecarProcess) -> None:
    # Ready means worker 0 is: worker 1 may still be starting. It must stop cleanly too
    # (it was forked with SIGTERM blocked until its handler is in place).
    assert two_workers.stop() == 0
