"""The demo's sample gRPC services: ``quotes`` answers with a quote, ``greeter`` asks it for one.

Each instance runs in its own process, started by ``pilotfish demo``:

    python -m pilotfish.demo.services quotes --port 7001 --name quotes-1
    python -m pilotfish.demo.services greeter --port 7002 --name greeter-1 \\
        --quotes-target 127.0.0.1:7100

The greeter knows nothing of the quotes instances: it dials one address (its own sidecar's
outbound listener) with the authority ``quotes`` and lets the mesh pick the instance. It copies
the trace headers of each incoming call onto its call to quotes (``forwarded_metadata``): the
sidecars record the spans, but only the app knows which outgoing call belongs to which incoming
one, so this copy is what makes the two hops one trace.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pilotfish.demo.api import demo_pb2, demo_pb2_grpc

QUOTES_AUTHORITY = "quotes"
# The trace context (W3C, B3 single and multi) and the request id: what a service in the mesh
# must pass from the call it serves to the calls it makes.
FORWARDED_HEADERS = frozenset(
    {
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-parentspanid",
        "x-b3-sampled",
        "x-b3-flags",
        "x-request-id",
    }
)
# The greeter's budget for its own upstream call, kept under the caller's usual deadline.
QUOTES_CALL_TIMEOUT = 2.0
STOP_GRACE = 1.0

_QUOTES = (
    "The sea is deep, and the pilot fish swims close to the shark.",
    "Every hop adds a header, every header tells a story.",
    "A timeout you did not set is a timeout you will discover.",
    "Retries are a loan against the upstream's patience.",
    "Measure the tail; the mean is a polite fiction.",
)


def forwarded_metadata(context: grpc.ServicerContext) -> list[tuple[str, str]]:
    """The incoming call's trace headers, to send along with an outgoing call."""
    return [
        (key, value)
        for key, value in context.invocation_metadata()
        if key in FORWARDED_HEADERS and isinstance(value, str)
    ]


def client_channel_options(authority: str | None = None) -> list[tuple[str, Any]]:
    """Options for every demo channel: never go through an HTTP proxy from the environment."""
    options: list[tuple[str, Any]] = [("grpc.enable_http_proxy", 0)]
    if authority is not None:
        options.append(("grpc.default_authority", authority))
    return options


class QuotesService:
    def __init__(self, name: str) -> None:
        self._name = name
        self._next = itertools.count()
        self._lock = threading.Lock()

    def GetQuote(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            n = next(self._next)
        text = _QUOTES[n % len(_QUOTES)]
        if request.topic:
            text = f"[{request.topic}] {text}"
        return demo_pb2.Quote(text=text, served_by=self._name)


class GreeterService:
    def __init__(self, name: str, quotes: Any) -> None:
        self._name = name
        self._quotes = quotes

    def SayHello(self, request: Any, context: grpc.ServicerContext) -> Any:
        remaining = context.time_remaining()
        timeout = QUOTES_CALL_TIMEOUT if remaining is None else min(remaining, QUOTES_CALL_TIMEOUT)
        try:
            quote = self._quotes.GetQuote(
                demo_pb2.QuoteRequest(topic="greeting"),
                timeout=timeout,
                metadata=forwarded_metadata(context),
            )
        except grpc.RpcError as exc:
            # Pass the upstream's status through, so the demo's summary shows what really failed.
            context.abort(exc.code(), f"quotes call failed: {exc.details()}")
        name = request.name or "stranger"
        return demo_pb2.HelloReply(
            message=f"Hello, {name}! {quote.text}",
            served_by=self._name,
            quote_served_by=quote.served_by,
        )


def serve(server: grpc.Server, port: int) -> None:
    """Bind to loopback only, run until SIGTERM or SIGINT, then stop with a short grace.

    The server answers ``grpc.health.v1`` as SERVING: a sidecar registers its app only once
    that says so."""
    checks = health.HealthServicer()
    checks.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    if bound != port:
        raise SystemExit(f"could not bind 127.0.0.1:{port}")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    stop.wait()
    server.stop(STOP_GRACE).wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pilotfish.demo.services")
    sub = parser.add_subparsers(dest="service", required=True)
    quotes = sub.add_parser("quotes", help="answer GetQuote")
    quotes.add_argument("--port", type=int, required=True)
    quotes.add_argument("--name", default="quotes")
    greeter = sub.add_parser("greeter", help="answer SayHello with a quote from the quotes service")
    greeter.add_argument("--port", type=int, required=True)
    greeter.add_argument("--name", default="greeter")
    greeter.add_argument(
        "--quotes-target", required=True, help="host:port to dial for quotes (the local sidecar)"
    )
    greeter.add_argument("--quotes-authority", default=QUOTES_AUTHORITY)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    if args.service == "quotes":
        demo_pb2_grpc.add_QuotesServicer_to_server(QuotesService(args.name), server)
        serve(server, args.port)
        return 0
    channel = grpc.insecure_channel(
        args.quotes_target, options=client_channel_options(args.quotes_authority)
    )
    try:
        stub = demo_pb2_grpc.QuotesStub(channel)
        demo_pb2_grpc.add_GreeterServicer_to_server(GreeterService(args.name, stub), server)
        serve(server, args.port)
    finally:
        channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
