"""Test helpers: free ports, sidecars in a thread or a process, gRPC test servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import yaml

from pilotfish.config.bootstrap import parse_bootstrap
from sidecar.main import serve
from sidecar.server import Sidecar

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 60.0
"""How long a test waits for a ``pilotfish`` process it started to serve. About a second on an
idle machine; importing grpcio and protobuf has taken over 15 s on a CI machine under full
load. Only a failing start waits this long."""


_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never the same twice in one test run (a test often asks
    for several before it binds any, and the kernel may offer a just-released one again)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def simple_config(
    upstreams: list[str],
    *,
    protocol: str = "http2",
    timeout: str = "15s",
    extra_listener: dict[str, Any] | None = None,
    extra_clusters: list[dict[str, Any]] | None = None,
    routes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A one-listener bootstrap that sends everything to cluster ``app``."""
    listener: dict[str, Any] = {
        "name": "ingress",
        "address": f"127.0.0.1:{free_port()}",
        "route_config": "local",
    }
    listener.update(extra_listener or {})
    return {
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "drain_timeout": "3s",
        "listeners": [listener],
        "route_configs": [
            {
                "name": "local",
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": routes
                        or [
                            {
                                "match": {"prefix": "/"},
                                "route": {"cluster": "app", "timeout": timeout},
                            }
                        ],
                    }
                ],
            }
        ],
        "clusters": [{"name": "app", "protocol": protocol, "endpoints": upstreams}]
        + (extra_clusters or []),
    }


class ThreadedSidecar:
    """A sidecar running on its own event loop in a background thread of the test process."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.bootstrap = parse_bootstrap(config)
        self.sidecar: Sidecar | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def address(self) -> str:
        listener = self.bootstrap.listeners[0]
        return f"{listener.host}:{listener.port}"

    @property
    def port(self) -> int:
        return self.bootstrap.listeners[0].port

    @property
    def admin_url(self) -> str:
        return f"http://{self.bootstrap.admin.host}:{self.bootstrap.admin.port}"

    def _run(self) -> None:
        import uvloop

        loop = uvloop.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)

        def started(sidecar: Sidecar) -> None:
            self.sidecar = sidecar
            self._ready.set()

        loop.run_until_complete(serve(self.bootstrap, signals=False, started=started))
        loop.close()

    def start(self) -> ThreadedSidecar:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("sidecar did not start")
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the sidecar's loop and return its result."""
        assert self.loop is not None
        result: futures.Future[Any] = futures.Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:  # handed to the caller
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return result.result(10)

    def stop(self) -> None:
        if self.loop is not None and self.sidecar is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.sidecar.request_stop)
            self._thread.join(15)

    def admin(self, path: str, method: str = "GET") -> tuple[int, str]:
        return http_get(self.admin_url + path, method)

    def stat(self, name: str) -> int:
        _, text = self.admin("/stats")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0


@contextlib.contextmanager
def running_sidecar(config: dict[str, Any]) -> Iterator[ThreadedSidecar]:
    sc = ThreadedSidecar(config).start()
    try:
        yield sc
    finally:
        sc.stop()


class SidecarProcess:
    """A sidecar as a real ``pilotfish sidecar`` process (for signals and RSS)."""

    def __init__(self, config: dict[str, Any], *args: str) -> None:
        self.config = config
        self._dir = tempfile.TemporaryDirectory()
        path = Path(self._dir.name) / "bootstrap.yaml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = Path(self._dir.name) / "sidecar.log"
        self._log = self.log_path.open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pilotfish", "sidecar", "--config", str(path), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        admin = config["admin"]
        self.admin_url = f"http://{admin['address']}:{admin['port']}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited: {self.log()}")
            with contextlib.suppress(OSError):
                if http_get(self.admin_url + "/ready")[0] == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sidecar not ready: {self.log()}")

    @property
    def address(self) -> str:
        return str(self.config["listeners"][0]["address"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._dir.cleanup()
        return self.proc.returncode


def http_get(url: str, method: str = "GET") -> tuple[int, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def identity(x: bytes) -> bytes:
    return x


class GrpcServer:
    """A real grpcio server on loopback with generic (raw bytes) handlers."""

    def __init__(self, service: str, handlers: dict[str, grpc.RpcMethodHandler], workers: int = 16):
        self.server = grpc.server(futures.ThreadPoolExecutor(workers))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(0).wait(5)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
