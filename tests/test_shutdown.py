"""Stopping a sidecar: drain on SIGTERM and /quitquitquit, and taking it out of rotation.

A real ``pilotfish sidecar`` process in front of a real grpcio server: in-flight calls finish,
new connections are refused, and the process exits 0 within ``drain_timeout``.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from tests.support import (
    GrpcServer,
    SidecarProcess,
    ThreadedSidecar,
    http_get,
    running_sidecar,
    simple_config,
    wait_for,
)

SERVICE = "pilotfish.test.Slow"
DRAIN_TIMEOUT = 3.0  # simple_config's drain_timeout
IN_FLIGHT_SECONDS = 1.0


class SlowService:
    def __init__(self) -> None:
        self.started = threading.Event()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Sleep": grpc.unary_unary_rpc_method_handler(self.sleep),
            "Echo": grpc.unary_unary_rpc_method_handler(lambda request, _: request),
        }

    def sleep(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.started.set()
        time.sleep(float(request.decode()))
        return b"done:" + request


def refuses_connections(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def exit_code_within(sidecar: SidecarProcess, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        code = sidecar.proc.poll()
        if code is not None:
            return code
        time.sleep(0.02)
    return sidecar.proc.poll()


@pytest.fixture
def service() -> SlowService:
    return SlowService()


@pytest.fixture
def upstream(service: SlowService) -> Iterator[GrpcServer]:
    server = GrpcServer(SERVICE, service.handlers())
    yield server
    server.stop()


@pytest.fixture
def sidecar_process(upstream: GrpcServer) -> Iterator[SidecarProcess]:
    sidecar = SidecarProcess(simple_config([upstream.address]))
    yield sidecar
    sidecar.stop()


def test_sigterm_stops_accepting_and_exits_zero_within_the_drain_timeout(
    sidecar_process: SidecarProcess, service: SlowService
) -> None:
    sidecar = sidecar_process
    with grpc.insecure_channel(sidecar.address) as channel:
        assert channel.unary_unary(f"/{SERVICE}/Echo")(b"up", timeout=5) == b"up"
        in_flight = channel.unary_unary(f"/{SERVICE}/Sleep").future(
            str(IN_FLIGHT_SECONDS).encode(), timeout=10
        )
        assert service.started.wait(5), "the call never reached the server"

        sidecar.proc.send_signal(signal.SIGTERM)

        # Draining: out of rotation at once, and the listener no longer accepts.
        assert wait_for(lambda: http_get(sidecar.admin_url + "/ready")[0] == 503, timeout=1)
        assert http_get(sidecar.admin_url + "/ready")[1] == "DRAINING\n"
        assert wait_for(lambda: refuses_connections(sidecar.address), timeout=1)
        assert sidecar.proc.poll() is None, "exited with a call still in flight"

        code = exit_code_within(sidecar, DRAIN_TIMEOUT + 1)
        assert code == 0, sidecar.log()
        with contextlib.suppress(grpc.RpcError):  # whether it completed: the next test
            in_flight.result(timeout=1)


# h2's own close_connection() closes its state machine (python-hyper/h2#1181), which once made
# every in-flight response fail on send_headers and the drain wait out drain_timeout.
def test_sigterm_lets_the_in_flight_call_finish(
    sidecar_process: SidecarProcess, service: SlowService
) -> None:
    sidecar = sidecar_process
    with grpc.insecure_channel(sidecar.address) as channel:
        in_flight = channel.unary_unary(f"/{SERVICE}/Sleep").future(
            str(IN_FLIGHT_SECONDS).encode(), timeout=10
        )
        assert service.started.wait(5), "the call never reached the server"
        signalled = time.monotonic()
        sidecar.proc.send_signal(signal.SIGTERM)

        assert in_flight.result(timeout=5) == f"done:{IN_FLIGHT_SECONDS}".encode()
        assert in_flight.code() is grpc.StatusCode.OK

    code = exit_code_within(sidecar, DRAIN_TIMEOUT + 1)
    elapsed = time.monotonic() - signalled
    assert code == 0, sidecar.log()
    # It left once the call was done, not at the end of the drain timeout.
    assert elapsed < DRAIN_TIMEOUT - 0.5, f"exited {elapsed:.2f}s after SIGTERM"
    assert "drain timeout" not in sidecar.log()
    assert "Traceback" not in sidecar.log()


def test_sigterm_gives_up_on_calls_longer_than_the_drain_timeout(
    sidecar_process: SidecarProcess, service: SlowService
) -> None:
    sidecar = sidecar_process
    with grpc.insecure_channel(sidecar.address) as channel:
        too_long = channel.unary_unary(f"/{SERVICE}/Sleep").future(b"6", timeout=10)
        assert service.started.wait(5)
        signalled = time.monotonic()
        sidecar.proc.send_signal(signal.SIGTERM)

        code = exit_code_within(sidecar, DRAIN_TIMEOUT + 2)
        elapsed = time.monotonic() - signalled
        assert code == 0, sidecar.log()
        assert DRAIN_TIMEOUT - 0.5 < elapsed < DRAIN_TIMEOUT + 2
        assert "drain timeout: closing 1 streams still open" in sidecar.log()
        with pytest.raises(grpc.RpcError) as caught:
            too_long.result(timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_quitquitquit_stops_the_process(sidecar_process: SidecarProcess) -> None:
    sidecar = sidecar_process

    status, body = http_get(sidecar.admin_url + "/quitquitquit", method="POST")

    assert (status, body) == (200, "OK\n")
    assert exit_code_within(sidecar, DRAIN_TIMEOUT + 1) == 0, sidecar.log()
    assert refuses_connections(sidecar.address)


def test_quitquitquit_needs_post(sidecar_process: SidecarProcess) -> None:
    status, _ = http_get(sidecar_process.admin_url + "/quitquitquit")

    assert status == 405
    time.sleep(0.2)
    assert sidecar_process.proc.poll() is None


@pytest.fixture
def threaded_sidecar(upstream: GrpcServer) -> Iterator[ThreadedSidecar]:
    with running_sidecar(simple_config([upstream.address])) as sc:
        yield sc


def test_healthcheck_fail_takes_the_sidecar_out_of_rotation_and_ok_restores_it(
    threaded_sidecar: ThreadedSidecar,
) -> None:
    sidecar = threaded_sidecar
    assert sidecar.admin("/ready") == (200, "LIVE\n")

    assert sidecar.admin("/healthcheck/fail", method="POST") == (200, "OK\n")
    assert sidecar.admin("/ready") == (503, "HEALTHCHECK_FAILED\n")
    # Out of rotation is not out of service: traffic still flows.
    with grpc.insecure_channel(sidecar.address) as channel:
        assert channel.unary_unary(f"/{SERVICE}/Echo")(b"still", timeout=5) == b"still"

    assert sidecar.admin("/healthcheck/ok", method="POST") == (200, "OK\n")
    assert sidecar.admin("/ready") == (200, "LIVE\n")
