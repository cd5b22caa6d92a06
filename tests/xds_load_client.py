"""A proxyless gRPC caller for end-to-end tests: ``python -m tests.xds_load_client TARGET RATE``.

With ``GRPC_XDS_BOOTSTRAP`` set, it calls ``xds:///TARGET`` (grpcio's own xDS client resolves
it through the control plane) at RATE calls/s from four threads, prints ``seen NAME`` the first
time each backend answers, and on ``stop`` (or EOF) on stdin, or after 60 s, or 20,000 calls,
prints one JSON line ``{"calls": N, "failed": [...], "seen": {...}}`` and exits.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import grpc

METHOD = "/pilotfish.test.Echo/Whoami"
THREADS = 4
MAX_SECONDS = 60.0
MAX_CALLS = 20_000


def wait_for_stop(stop: threading.Event) -> None:
    sys.stdin.readline()  # "stop", or EOF when the test goes away
    stop.set()


def main(argv: list[str]) -> int:
    target, rate = argv[0], float(argv[1])
    lock = threading.Lock()
    stop = threading.Event()
    seen: dict[str, int] = {}
    failed: list[str] = []
    calls = 0

    def caller(channel: grpc.Channel) -> None:
        nonlocal calls
        whoami = channel.unary_unary(METHOD)
        interval = THREADS / rate
        next_at = time.monotonic()
        deadline = next_at + MAX_SECONDS
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                name = whoami(b"", timeout=5).decode()
                with lock:  # also keeps the threads' lines whole
                    calls += 1
                    if name not in seen:
                        print(f"seen {name}", flush=True)
                    seen[name] = seen.get(name, 0) + 1
            except grpc.RpcError as exc:
                with lock:
                    calls += 1
                    failed.append(f"{exc.code().name}: {exc.details()}")
            if calls >= MAX_CALLS:
                break
            next_at = max(next_at + interval, time.monotonic() - interval)
            stop.wait(max(0.0, next_at - time.monotonic()))

    with grpc.insecure_channel(f"xds:///{target}") as channel:
        # The first call waits for the xDS config; later ones must not need to.
        channel.unary_unary(METHOD)(b"", timeout=15, wait_for_ready=True)
        threads = [threading.Thread(target=caller, args=(channel,)) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        waiter = threading.Thread(target=wait_for_stop, args=(stop,), daemon=True)
        waiter.start()
        for thread in threads:
            thread.join()
    print(json.dumps({"calls": calls, "failed": failed, "seen": seen}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
