"""A real grpcio app process for end-to-end tests: ``python -m tests.grpc_app NAME PORT``.

It answers ``pilotfish.test.Echo/Whoami`` with its name and serves ``grpc.health.v1`` as
SERVING. On SIGTERM it stops gracefully (in-flight calls finish); SIGKILL is a crash.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "pilotfish.test.Echo"
METHOD = f"/{SERVICE}/Whoami"


def main() -> int:
    name, port = sys.argv[1], int(sys.argv[2])
    server = grpc.server(futures.ThreadPoolExecutor(16))

    def whoami(request: bytes, context: grpc.ServicerContext) -> bytes:
        return name.encode()

    handler = grpc.unary_unary_rpc_method_handler(whoami)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Whoami": handler,
    }),))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        print(f"cannot listen on port {port}", flush=True)
        return 1
    server.start()
    print(f"{name} serving on 127.0.0.1:{port}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
