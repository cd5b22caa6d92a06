"""A raw-bytes gRPC echo service and a ghz-like unary load client, each run as its own process.

    python -m bench.grpc_echo server --port P
    python -m bench.grpc_echo client --port P --concurrency C --duration S --max-calls N

The client connects, warms up, prints ``ready`` and waits for a line on stdin, so the harness can
take its CPU snapshot of the proxy exactly when measured calls begin. It then prints one JSON
line with the result. The measured phase stops at ``--max-calls`` or ``--duration``,
whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from bench.stats import percentile

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Call"
CALL_TIMEOUT_S = 10.0


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def serve(port: int, threads: int) -> None:
    # The thread-pool server: on this project's 2-core machines it answers unary calls about
    # a third faster than grpc.aio's, and the upstream should be the cheapest part of the path.
    server = grpc.server(ThreadPoolExecutor(max_workers=threads))
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"serving {SERVICE} on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


class _Tally:
    def __init__(self) -> None:
        self.issued = 0
        self.latencies_us: list[float] = []
        self.errors = 0
        self.first_error: str | None = None
        self.wrong_replies = 0


async def _worker(
    call: Any, payload: bytes, deadline: float, max_calls: int, tally: _Tally
) -> None:
    while tally.issued < max_calls and time.perf_counter() < deadline:
        tally.issued += 1
        started = time.perf_counter_ns()
        try:
            reply = await call(payload, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            tally.errors += 1
            if tally.first_error is None:
                tally.first_error = f"{exc.code().name}: {exc.details()}"
            continue
        tally.latencies_us.append((time.perf_counter_ns() - started) / 1000)
        if reply != payload:
            tally.wrong_replies += 1


async def drive(
    port: int, concurrency: int, duration_s: float, max_calls: int, payload_size: int,
    warmup_calls: int, authority: str | None = None,
) -> dict[str, Any]:
    payload = bytes(range(256)) * (payload_size // 256) + bytes(range(payload_size % 256))
    # A sidecar's outbound listener routes by authority: the service name, not its own address.
    options = [("grpc.default_authority", authority)] if authority else []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=CALL_TIMEOUT_S)
        call = channel.unary_unary(METHOD)
        warm = _Tally()
        await asyncio.gather(
            *(
                _worker(call, payload, time.perf_counter() + CALL_TIMEOUT_S, warmup_calls, warm)
                for _ in range(concurrency)
            )
        )
        if warm.errors:
            return {"error": f"warm-up failed: {warm.first_error}"}
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        tally = _Tally()
        started = time.perf_counter()
        await asyncio.gather(
            *(
                _worker(call, payload, started + duration_s, max_calls, tally)
                for _ in range(concurrency)
            )
        )
        elapsed = time.perf_counter() - started
    latencies = sorted(tally.latencies_us)
    return {
        "calls": len(latencies),
        "errors": tally.errors,
        "first_error": tally.first_error,
        "wrong_replies": tally.wrong_replies,
        "elapsed_s": elapsed,
        "p50_us": percentile(latencies, 50) if latencies else None,
        "p99_us": percentile(latencies, 99) if latencies else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_echo")
    sub = parser.add_subparsers(dest="role", required=True)
    server = sub.add_parser("server")
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--threads", type=int, default=16)
    client = sub.add_parser("client")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--concurrency", type=int, default=1)
    client.add_argument("--duration", type=float, default=5.0)
    client.add_argument("--max-calls", type=int, default=1_000_000)
    client.add_argument("--payload", type=int, default=16, help="request bytes (echoed back)")
    client.add_argument("--warmup-calls", type=int, default=200)
    client.add_argument("--authority", help="the :authority of the calls (default host:port)")
    args = parser.parse_args(argv)
    if args.role == "server":
        serve(args.port, args.threads)
        return 0
    result = asyncio.run(
        drive(
            args.port, args.concurrency, args.duration, args.max_calls, args.payload,
            args.warmup_calls, args.authority,
        )
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
