"""The load driver: a few caller threads that send SayHello at a fixed rate, for a fixed count.

Call ``i`` is due at ``start + i / rate``. A caller takes the next due call, waits for its time
and sends it, so the callers together keep the rate as long as they are not all busy waiting
for replies; then the rate drops rather than calls piling up without bound.

Each call starts its own trace: the driver sends a W3C ``traceparent`` with a new trace id and
the sampled flag, so every sidecar on the path records its spans under that id, and the demo can
print ids a user can look up in a tracing UI. The driver's own span (the parent id it sends) is
not exported; a UI shows the client sidecar's span as the trace's top span.
"""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Any

import grpc

from pilotfish.demo.api import demo_pb2, demo_pb2_grpc
from pilotfish.demo.services import client_channel_options
from pilotfish.demo.summary import OK, CallFinished, CallLog
from pilotfish.demo.topology import GREETER

CALL_TIMEOUT = 5.0
MIN_CALLERS = 4
MAX_CALLERS = 32
# Expected latency through the mesh, to size the callers so the rate is reachable.
CALLER_BUDGET = 0.04


def callers_for(rate: float) -> int:
    return max(MIN_CALLERS, min(MAX_CALLERS, math.ceil(rate * CALLER_BUDGET)))


def new_traceparent() -> tuple[str, str]:
    """A new sampled W3C trace context: (trace id, ``traceparent`` value)."""
    trace_id = f"{random.getrandbits(128) or 1:032x}"
    span_id = f"{random.getrandbits(64) or 1:016x}"
    return trace_id, f"00-{trace_id}-{span_id}-01"


def call_greeter(stub: Any, name: str, timeout: float = CALL_TIMEOUT) -> CallFinished:
    trace_id, traceparent = new_traceparent()
    metadata = (("traceparent", traceparent),)
    sent = time.monotonic()
    started = time.perf_counter()
    try:
        reply = stub.SayHello(
            demo_pb2.HelloRequest(name=name), timeout=timeout, metadata=metadata
        )
    except grpc.RpcError as exc:
        latency = time.perf_counter() - started
        return CallFinished(
            status=exc.code().name,
            latency=latency,
            detail=exc.details() or "",
            trace_id=trace_id,
            started=sent,
        )
    latency = time.perf_counter() - started
    return CallFinished(
        status=OK,
        latency=latency,
        greeter=reply.served_by,
        quotes=reply.quote_served_by,
        trace_id=trace_id,
        started=sent,
    )


def greeter_channel(target: str) -> grpc.Channel:
    """A channel to the load driver's sidecar that names the greeter service as its authority."""
    return grpc.insecure_channel(target, options=client_channel_options(GREETER))


class LoadDriver:
    def __init__(
        self, channel: grpc.Channel, log: CallLog, *, rate: float, total: int, callers: int
    ) -> None:
        self._stub = demo_pb2_grpc.GreeterStub(channel)
        self._log = log
        self._interval = 1.0 / rate
        self._total = total
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._next_call = 0
        self._start = 0.0
        self._threads = [
            threading.Thread(target=self._caller, name=f"demo-caller-{i}", daemon=True)
            for i in range(callers)
        ]

    def start(self) -> None:
        self._start = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Send no further calls; calls in flight still finish (or time out)."""
        self._stopping.set()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every caller; True when all have finished."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    @property
    def finished(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def _take(self) -> int | None:
        with self._lock:
            if self._next_call >= self._total:
                return None
            n = self._next_call
            self._next_call += 1
            return n

    def _caller(self) -> None:
        while not self._stopping.is_set():
            n = self._take()
            if n is None:
                return
            delay = self._start + n * self._interval - time.monotonic()
            if delay > 0 and self._stopping.wait(delay):
                return
            self._log.add(call_greeter(self._stub, f"caller {n}"))
