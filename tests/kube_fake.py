"""A small Kubernetes API server on loopback for Services and EndpointSlices.

It speaks the list/watch protocol the control plane's client library uses: JSON lists with
``metadata.resourceVersion``; ``?watch=true`` as a chunked stream of JSON lines from a
``resourceVersion``; ``BOOKMARK`` events when ``allowWatchBookmarks=true``; an ``ERROR``
event with a ``410 Gone`` Status for a version older than its history; ``timeoutSeconds``.
Tests edit objects (each edit is one event with the next version), drop every open watch
(the sockets are shut down mid-stream), compact the history, and restart the server on the
same port with a new, unrelated version counter, as an etcd restore would.
"""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

SERVICES = "services"
SLICES = "endpointslices"
KINDS = {SERVICES: ("Service", "v1"), SLICES: ("EndpointSlice", "discovery.k8s.io/v1")}


@dataclass(frozen=True, slots=True)
class Event:
    version: int
    resource: str
    type: str
    obj: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Request:
    resource: str
    namespace: str | None
    params: dict[str, str]

    @property
    def watch(self) -> bool:
        return self.params.get("watch", "").lower() in ("true", "1")


class FakeKubeApi:
    """The store and the server. Thread-safe: handlers run in threads of their own."""

    def __init__(self, version_base: int = 100) -> None:
        self._lock = threading.Condition()
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._events: list[Event] = []
        self._version = version_base
        self._oldest = version_base  # watches from before this get 410
        self.requests: list[Request] = []
        self._watch_sockets: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- the server ---------------------------------------------------------------------------

    def start(self, port: int = 0) -> FakeKubeApi:
        api = self

        class Handler(_Handler):
            fake = api

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self.drop_watches()
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def restart(self, version_base: int) -> None:
        """Stop, then serve the same objects on the same port from a new version counter
        with no history: any version a client remembers is now unknown (410)."""
        self.stop()
        with self._lock:
            self._version = version_base
            self._oldest = version_base
            self._events.clear()
            for obj in self._objects.values():
                obj["metadata"]["resourceVersion"] = str(version_base)
        self.start(self.port)

    def drop_watches(self) -> int:
        """Shut down every open watch connection mid-stream; returns how many there were."""
        with self._lock:
            sockets = list(self._watch_sockets)
            self._watch_sockets.clear()
            self._lock.notify_all()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return len(sockets)

    def compact(self) -> None:
        """Forget the history: watches from any version before now get 410 Gone."""
        with self._lock:
            self._oldest = self._version
            self._events.clear()

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current version on every watch that asked for them."""
        with self._lock:
            # The version is global: a bookmark reports changes elsewhere as progress.
            self._version += 1
            self._events.append(Event(self._version, "*", "BOOKMARK", {}))
            self._lock.notify_all()

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "fake", "user": {"token": "test-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def watch_requests(self, resource: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.resource == resource and r.watch]

    def list_requests(self, resource: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.resource == resource and not r.watch]

    def open_watches(self) -> int:
        with self._lock:
            return len(self._watch_sockets)

    # -- objects ------------------------------------------------------------------------------

    def put(self, resource: str, obj: dict[str, Any]) -> int:
        """Create or replace ``obj``; returns its new version."""
        meta = obj["metadata"]
        key = (resource, meta["namespace"], meta["name"])
        kind, api_version = KINDS[resource]
        with self._lock:
            self._version += 1
            stored = copy.deepcopy(obj)
            stored.update(kind=kind, apiVersion=api_version)
            stored["metadata"]["resourceVersion"] = str(self._version)
            event_type = "MODIFIED" if key in self._objects else "ADDED"
            self._objects[key] = stored
            self._events.append(Event(self._version, resource, event_type, stored))
            self._lock.notify_all()
            return self._version

    def delete(self, resource: str, namespace: str, name: str) -> int:
        with self._lock:
            stored = self._objects.pop((resource, namespace, name))
            self._version += 1
            stored = copy.deepcopy(stored)
            stored["metadata"]["resourceVersion"] = str(self._version)
            self._events.append(Event(self._version, resource, "DELETED", stored))
            self._lock.notify_all()
            return self._version

    def _list(self, resource: str, namespace: str | None) -> dict[str, Any]:
        with self._lock:
            items = [
                copy.deepcopy(obj)
                for (res, ns, _), obj in sorted(self._objects.items())
                if res == resource and namespace in (None, ns)
            ]
            version = self._version
        kind, api_version = KINDS[resource]
        return {
            "kind": f"{kind}List",
            "apiVersion": api_version,
            "metadata": {"resourceVersion": str(version)},
            "items": items,
        }

    def _next_events(
        self, resource: str, namespace: str | None, after: int, deadline: float, conn: socket.socket
    ) -> tuple[list[Event], int] | None:
        """Events after ``after`` (waiting for one); None when the watch should end."""
        with self._lock:
            while True:
                if conn not in self._watch_sockets:
                    return None
                found = [
                    e
                    for e in self._events
                    if e.version > after
                    and (e.resource == resource or e.type == "BOOKMARK")
                    and (
                        namespace is None
                        or e.type == "BOOKMARK"
                        or e.obj["metadata"]["namespace"] == namespace
                    )
                ]
                if found:
                    return found, max(e.version for e in found)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(min(remaining, 0.5))


class _Handler(BaseHTTPRequestHandler):
    fake: FakeKubeApi
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _route(self) -> tuple[str, str | None] | None:
        parts = [p for p in urlsplit(self.path).path.split("/") if p]
        # /api/v1/[namespaces/NS/]services, /apis/discovery.k8s.io/v1/[namespaces/NS/]endpointslices
        prefix = 2 if parts[:2] == ["api", "v1"] else 3
        if parts[:prefix] not in (["api", "v1"], ["apis", "discovery.k8s.io", "v1"]):
            return None
        rest = parts[prefix:]
        if len(rest) == 1 and rest[0] in KINDS:
            return rest[0], None
        if len(rest) == 3 and rest[0] == "namespaces" and rest[2] in KINDS:
            return rest[2], rest[1]
        return None

    def do_GET(self) -> None:
        route = self._route()
        if route is None:
            self._json(404, _status(404, "NotFound", f"no route {self.path}"))
            return
        resource, namespace = route
        params = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
        request = Request(resource, namespace, params)
        with self.fake._lock:
            self.fake.requests.append(request)
        if not request.watch:
            self._json(200, self.fake._list(resource, namespace))
            return
        self._watch(request)

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, event: dict[str, Any]) -> None:
        line = json.dumps(event).encode() + b"\n"
        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.flush()

    def _watch(self, request: Request) -> None:
        fake = self.fake
        params = request.params
        version = int(params.get("resourceVersion") or 0)
        timeout = float(params.get("timeoutSeconds") or 1800)
        bookmarks = params.get("allowWatchBookmarks", "").lower() in ("true", "1")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        conn = self.connection
        with fake._lock:
            fake._watch_sockets.add(conn)
            too_old = version < fake._oldest or version > fake._version
        try:
            if too_old:
                self._chunk(
                    {
                        "type": "ERROR",
                        "object": _status(
                            410, "Expired", f"too old resource version: {version} ({fake._oldest})"
                        ),
                    }
                )
            else:
                self._stream(request, version, time.monotonic() + timeout, bookmarks)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            pass  # dropped by the test, or by the client
        finally:
            with fake._lock:
                fake._watch_sockets.discard(conn)
            self.close_connection = True

    def _stream(self, request: Request, version: int, deadline: float, bookmarks: bool) -> None:
        kind, api_version = KINDS[request.resource]
        while True:
            found = self.fake._next_events(
                request.resource, request.namespace, version, deadline, self.connection
            )
            if found is None:
                return
            events, version = found
            for event in events:
                if event.type == "BOOKMARK":
                    if bookmarks:
                        self._chunk(
                            {
                                "type": "BOOKMARK",
                                "object": {
                                    "kind": kind,
                                    "apiVersion": api_version,
                                    "metadata": {"resourceVersion": str(event.version)},
                                },
                            }
                        )
                else:
                    self._chunk({"type": event.type, "object": event.obj})


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


# -- object builders ----------------------------------------------------------------------------


def service(
    name: str, namespace: str, port: int, cluster_ip: str = "10.96.0.10", port_name: str = "grpc"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "ports": [
                {"name": port_name, "port": port, "protocol": "TCP", "targetPort": port_name}
            ],
        },
    }


def endpoint(
    address: str,
    node: str = "node-a",
    zone: str = "zone-1",
    ready: bool = True,
    serving: bool = True,
    terminating: bool = False,
) -> dict[str, Any]:
    return {
        "addresses": [address],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": node,
        "zone": zone,
        "targetRef": {"kind": "Pod", "name": f"pod-{address}", "namespace": "default"},
    }


def endpoint_slice(
    name: str,
    namespace: str,
    service_name: str,
    target_port: int,
    endpoints: list[dict[str, Any]],
    port_name: str = "grpc",
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [{"name": port_name, "port": target_port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


@contextlib.contextmanager
def running_fake(version_base: int = 100) -> Iterator[FakeKubeApi]:
    fake = FakeKubeApi(version_base).start()
    try:
        yield fake
    finally:
        fake.stop()


def main() -> None:
    """Serve objects from a JSON file (``{"services": [...], "endpointslices": [...]}``) until
    killed: for tests that need the API server in a network namespace of their own."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--objects", required=True)
    args = parser.parse_args()
    fake = FakeKubeApi()
    objects = json.loads(Path(args.objects).read_text())
    for resource in (SERVICES, SLICES):
        for obj in objects.get(resource, []):
            fake.put(resource, obj)
    fake.start(args.port)
    print(f"serving on 127.0.0.1:{fake.port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
