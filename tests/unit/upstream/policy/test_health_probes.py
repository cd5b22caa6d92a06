"""The health check probes against real servers on 127.0.0.1, and the runner end to end."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pilotfish.config.cluster_policy import HealthCheckConfig, HealthCheckType
from sidecar.upstream.policy.grpc_probe import GrpcProbe
from sidecar.upstream.policy.health import (
    HealthChanged,
    HealthChecker,
    HostBecameHealthy,
    HostBecameUnhealthy,
)
from sidecar.upstream.policy.health_probes import HealthCheckRunner, HttpProbe, make_probe
from sidecar.upstream.policy.probe import ProbeResult


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Handler(BaseHTTPRequestHandler):
    """``/status/<code>`` answers with that code; ``/slow`` answers after a second;
    ``/toggle`` answers with the server's current ``toggle_status``."""

    server: HealthServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers.get("Host", "")))
        if self.path == "/slow":
            time.sleep(1.0)
            status = 200
        elif self.path == "/toggle":
            status = self.server.toggle_status
        else:
            status = int(self.path.rsplit("/", 1)[-1])
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[tuple[str, str]]
    toggle_status = 200


@pytest.fixture(scope="module")
def http_server() -> Iterator[HealthServer]:
    server = HealthServer(("127.0.0.1", 0), Handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def http_check(server: HealthServer, path: str, **overrides: object) -> ProbeResult:
    config = HealthCheckConfig(path=path, timeout=0.3, **overrides)  # type: ignore[arg-type]
    probe = HttpProbe(config, authority="greeter")
    return asyncio.run(probe.check("127.0.0.1", server.server_address[1]))


def test_http_2xx_and_3xx_are_healthy_by_default(http_server: HealthServer) -> None:
    assert http_check(http_server, "/status/200") == ProbeResult(True, "status 200")
    assert http_check(http_server, "/status/302").ok
    assert http_check(http_server, "/status/404") == ProbeResult(False, "status 404")
    assert http_check(http_server, "/status/503") == ProbeResult(False, "status 503")


def test_http_expected_statuses_and_host_header(http_server: HealthServer) -> None:
    assert not http_check(http_server, "/status/302", expected_statuses=((200, 201),)).ok
    assert http_check(http_server, "/status/418", expected_statuses=((418, 419),)).ok
    http_check(http_server, "/status/200")
    assert http_server.requests[-1] == ("/status/200", "greeter")
    http_check(http_server, "/status/200", host="health.local")
    assert http_server.requests[-1] == ("/status/200", "health.local")


def test_http_timeout(http_server: HealthServer) -> None:
    # /slow answers 200 after a second: a probe that waited for it (past its 0.3 s) would
    # report it healthy, so the outcome alone shows the timeout cut it short.
    assert http_check(http_server, "/slow") == ProbeResult(False, "timeout")


def test_http_connection_refused() -> None:
    probe = HttpProbe(HealthCheckConfig(timeout=0.5), authority="x")
    result = asyncio.run(probe.check("127.0.0.1", free_port()))
    assert not result.ok and result.detail.startswith("connection failed")


def test_http_probe_of_something_that_is_not_http() -> None:
    async def scenario() -> ProbeResult:
        async def garbage(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await HttpProbe(HealthCheckConfig(timeout=0.5), "x").check("127.0.0.1", port)

    result = asyncio.run(scenario())
    assert not result.ok and result.detail.startswith("not an HTTP/1.x status line")


@pytest.fixture(scope="module")
def grpc_health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("greeter", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("sick", health_pb2.HealthCheckResponse.NOT_SERVING)
    yield port, servicer
    server.stop(None)


def grpc_checks(port: int, services: list[str]) -> list[ProbeResult]:
    async def scenario() -> list[ProbeResult]:
        results = []
        for name in services:
            probe = GrpcProbe(HealthCheckConfig(type=HealthCheckType.GRPC, service_name=name))
            results.append(await probe.check("127.0.0.1", port))
            await probe.close()
        return results

    return asyncio.run(scenario())


def test_grpc_serving_is_healthy_and_anything_else_is_not(
    grpc_health_server: tuple[int, health.HealthServicer],
) -> None:
    port, _ = grpc_health_server
    whole, greeter, sick, unknown = grpc_checks(port, ["", "greeter", "sick", "nope"])
    assert whole == ProbeResult(True, "SERVING") and greeter.ok
    assert sick == ProbeResult(False, "NOT_SERVING")
    assert not unknown.ok and unknown.detail.startswith("grpc status NOT_FOUND")


def test_grpc_server_down() -> None:
    config = HealthCheckConfig(type=HealthCheckType.GRPC, timeout=0.5)
    probe = make_probe(config, "x")

    async def scenario() -> ProbeResult:
        try:
            return await probe.check("127.0.0.1", free_port())
        finally:
            await probe.close()

    result = asyncio.run(scenario())
    assert not result.ok
    assert result.detail.startswith(("grpc status UNAVAILABLE", "timeout")), result.detail


def test_runner_takes_a_host_out_and_brings_it_back(http_server: HealthServer) -> None:
    config = HealthCheckConfig(
        path="/toggle", interval=0.02, timeout=0.5, unhealthy_threshold=2, healthy_threshold=2
    )
    events: list[HealthChanged] = []
    key = "app-1"

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        checker = HealthChecker(config, loop.time, random.Random(1))
        runner = HealthCheckRunner(checker, make_probe(config, "app"), events.append)
        runner.set_hosts({key: ("127.0.0.1", http_server.server_address[1])})

        async def until(count: int) -> None:
            async with asyncio.timeout(3):
                while len(events) < count:
                    await asyncio.sleep(0.01)

        await until(1)
        http_server.toggle_status = 503
        await until(2)
        http_server.toggle_status = 200
        await until(3)
        runner.set_hosts({})
        assert not runner._tasks
        await runner.close()

    try:
        asyncio.run(scenario())
    finally:
        http_server.toggle_status = 200
    assert events == [
        HostBecameHealthy(key=key),
        HostBecameUnhealthy(key=key),
        HostBecameHealthy(key=key),
    ]
