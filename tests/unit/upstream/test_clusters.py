"""Upstream hosts and their connections, against a loopback server that accepts and waits."""

from __future__ import annotations

import asyncio
import dataclasses

from pilotfish.config.bootstrap import parse_bootstrap
from pilotfish.config.cluster_policy import LbPolicy, SlowStartConfig
from pilotfish.config.model import Endpoint
from sidecar.flags import ResponseFlag
from sidecar.observability.metrics import MeshMetrics
from sidecar.stats import StatsStore
from sidecar.upstream.clusters import ClusterRuntime
from sidecar.upstream.policy.breaker import Resource
from sidecar.upstream.pool import PooledConnection
from tests.support import simple_config


class Waiter:
    def __init__(self) -> None:
        self.cancelled = False
        self.failure: ResponseFlag | None = None

    def on_connection(self, conn: PooledConnection) -> None:
        raise AssertionError("the host left the cluster: nobody may get a connection")

    def on_pool_failure(self, flag: ResponseFlag) -> None:
        self.failure = flag


def test_a_connection_that_completes_after_its_host_left_is_closed() -> None:
    """Otherwise it stays open for good: no stream will ever use it or arm its idle timer,
    and it keeps its circuit-breaker connection permit."""

    async def run() -> tuple[ClusterRuntime, Waiter, int]:
        accepted: list[asyncio.StreamWriter] = []

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = parse_bootstrap(simple_config([f"127.0.0.1:{port}"], protocol="http1"))
        cluster = ClusterRuntime(config.clusters["app"], StatsStore(), MeshMetrics())
        host = cluster.hosts[0]
        waiter = Waiter()
        host.pool.acquire(waiter)  # starts a connect
        host.drain()  # the endpoint leaves before the connect completes
        for _ in range(100):
            await asyncio.sleep(0.01)
            if accepted and not host.connections:
                break
        await asyncio.sleep(0.05)
        open_connections = len(host.connections)
        server.close()
        return cluster, waiter, open_connections

    cluster, waiter, open_connections = asyncio.run(run())
    assert waiter.failure is ResponseFlag.NO_HEALTHY_UPSTREAM
    assert open_connections == 0
    assert cluster.resilience.breakers.active(Resource.CONNECTIONS) == 0


def test_a_joining_endpoint_ramps_up_on_the_loop_until_its_window_ends() -> None:
    async def run() -> list[list[int]]:
        base = parse_bootstrap(simple_config(["127.0.0.1:1"])).clusters["app"]
        slow = SlowStartConfig(window=1.0, min_weight_percent=10.0)
        config = dataclasses.replace(base, lb_policy=LbPolicy(slow_start=slow))
        cluster = ClusterRuntime(config, StatsStore(), MeshMetrics())
        endpoints = (*config.endpoints, Endpoint("127.0.0.1", 2))
        joined = dataclasses.replace(config, endpoints=endpoints)
        cluster = cluster.updated(joined, StatsStore())
        seen = [[h.weight for h in cluster.balancer.eligible]]
        for _ in range(250):  # bounded: the window is 1 s, the ramp steps 50 ms
            await asyncio.sleep(0.02)
            seen.append([h.weight for h in cluster.balancer.eligible])
            if seen[-1] == [100, 100]:
                break
        cluster.drain()
        return seen

    seen = asyncio.run(run())
    assert seen[0] == [100, 10]
    assert seen[-1] == [100, 100]
    ramp = [weights[1] for weights in seen]
    assert ramp == sorted(ramp) and len(set(ramp)) > 2  # rose in steps, never fell
