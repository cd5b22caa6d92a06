"""An app of about 200 calls/s offered twice that through its sidecar, with and without shedding.

``python -m bench.overload [seconds]`` prints one line per mode: calls offered, served (OK
within the caller's 1 s deadline), shed (flag OM), other failures, and the p99 latency of the
served calls. The app is a grpcio server in a process of its own, with 4 workers that each
take 20 ms a call; the caller
paces 400 calls/s from grpcio futures; the sidecar (threaded, in this process) fronts the app
with an inbound listener. ``tests/test_protection_e2e.py`` runs the same scenario (with
slower calls, so fewer of them) and asserts its counts; latencies are printed here only (they
depend on the machine's load).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tests.support import running_sidecar, simple_config

SERVICE = "pilotfish.bench.Overload"
METHOD = f"/{SERVICE}/Work"
WORKERS = 4
SERVICE_TIME = 0.02
CAPACITY = WORKERS / SERVICE_TIME  # calls per second
DEADLINE = 1.0
FLAGS_HEADER = "x-pilotfish-response-flags"


@dataclass(frozen=True)
class OverloadResult:
    offered: int
    served: int
    shed: int
    failed: int
    unflagged_failures: int
    p99_served: float

    def line(self, mode: str, seconds: float) -> str:
        return (
            f"{mode:<14} offered {self.offered} ({self.offered / seconds:.0f}/s)  "
            f"served {self.served} ({self.served / seconds:.0f}/s)  shed {self.shed}  "
            f"other failures {self.failed}  p99 of served {self.p99_served * 1000:.0f} ms"
        )


def serve_app(service_time: float = SERVICE_TIME) -> None:
    """The app, in a process of its own (``python -m bench.overload --app [SECONDS]``): sharing
    the sidecar's interpreter lock would make its capacity depend on how busy the sidecar is.
    Prints its port, serves until stdin closes."""

    def work(request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(service_time)
        return b"done"

    # grpcio queues calls beyond its workers without bound: the app "accepts" all the load.
    server = grpc.server(futures.ThreadPoolExecutor(WORKERS))
    handler = grpc.unary_unary_rpc_method_handler(work)
    generic = grpc.method_handlers_generic_handler(SERVICE, {"Work": handler})
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0).wait(5)


@contextlib.contextmanager
def app_process(service_time: float = SERVICE_TIME) -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.overload", "--app", str(service_time)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the app did not start: {line!r}")
        yield int(line)
    finally:
        if process.stdin is not None:
            process.stdin.close()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def capacity(service_time: float = SERVICE_TIME) -> float:
    """The app's calls per second with ``service_time`` per call."""
    return WORKERS / service_time


def run(
    shedding: bool,
    seconds: float = 10.0,
    rate: float | None = None,
    service_time: float = SERVICE_TIME,
) -> OverloadResult:
    """Offer ``rate`` calls/s (twice the app's capacity unless given) for ``seconds``
    (bounded: at most rate * seconds calls, each with a 1 s deadline) and count what came
    back."""
    with app_process(service_time) as port:
        return _offer(port, shedding, seconds, rate or 2 * capacity(service_time))


def _offer(port: int, shedding: bool, seconds: float, rate: float) -> OverloadResult:
    listener = {"direction": "inbound", "load_shedding": {"enabled": shedding}}
    config = simple_config([f"127.0.0.1:{port}"], extra_listener=listener)
    config["clusters"][0]["circuit_breakers"] = {
        "max_requests": 100_000, "max_pending_requests": 100_000,
    }  # fmt: skip
    lock = threading.Lock()
    served: list[float] = []
    counts = {"shed": 0, "failed": 0, "unflagged": 0}
    with running_sidecar(config) as sidecar, grpc.insecure_channel(sidecar.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=5)
        call = ch.unary_unary(METHOD)

        def done(started: float, future: Any) -> None:
            elapsed = time.monotonic() - started
            code = future.code()
            flags = dict(future.trailing_metadata() or ()).get(FLAGS_HEADER)
            with lock:
                if code is grpc.StatusCode.OK:
                    served.append(elapsed)
                elif flags == "OM":
                    counts["shed"] += 1
                else:
                    counts["failed"] += 1
                    if not flags and code is not grpc.StatusCode.DEADLINE_EXCEEDED:
                        counts["unflagged"] += 1

        offered = 0
        pending = []
        start = time.monotonic()
        for i in range(round(seconds * rate)):
            now = time.monotonic() - start
            if now >= seconds:
                break
            if now < i / rate:
                time.sleep(i / rate - now)
            started = time.monotonic()
            future = call.future(b"", timeout=DEADLINE)
            future.add_done_callback(lambda f, s=started: done(s, f))
            pending.append(future)
            offered += 1
        for future in pending:
            future.exception()  # waits: every call has its deadline
    served.sort()
    p99 = served[min(len(served) - 1, int(len(served) * 0.99))] if served else 0.0
    return OverloadResult(
        offered=offered,
        served=len(served),
        shed=counts["shed"],
        failed=counts["failed"],
        unflagged_failures=counts["unflagged"],
        p99_served=p99,
    )


def main(argv: list[str]) -> int:
    if argv[:1] == ["--app"]:
        serve_app(float(argv[1]) if len(argv) > 1 else SERVICE_TIME)
        return 0
    seconds = float(argv[0]) if argv else 10.0
    print(f"app capacity {CAPACITY:.0f} calls/s, offered {2 * CAPACITY:.0f}/s for {seconds:g} s")
    for mode, shedding in (("no shedding", False), ("shedding", True)):
        print(run(shedding, seconds).line(mode, seconds), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
