"""Small servers and clients that ``tests/test_interception.py`` runs inside network namespaces.

Run as ``python tests/netns_tools.py COMMAND ...`` under ``ip netns exec``; standard library
only (h2-get uses the h2 package, a dependency of ours), every client has a timeout, and each
prints one JSON object on stdout.

    http-server --port P --name N     answers every request with its path and headers
    tcp-echo --port P                 echoes what it receives, prefixed with "echo: "
    http-get URL [--host H]           prints status, headers and body
    h2-get HOST PORT PATH AUTHORITY   the same over HTTP/2 with prior knowledge (gRPC's way);
                                      a connection that fails prints {"error": ...}
    tcp-send HOST PORT TEXT           sends TEXT, half-closes, prints what came back
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import socketserver
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TIMEOUT = 5.0


def http_server(port: int, name: str) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            body = json.dumps(
                {
                    "server": name,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "client": self.client_address[0],
                }
            ).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"{name}: {format % args}\n")

    ThreadingHTTPServer.allow_reuse_address = True
    with ThreadingHTTPServer(("0.0.0.0", port), Handler) as server:
        server.serve_forever()


def tcp_echo(port: int) -> None:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(TIMEOUT)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            sock.sendall(b"echo: " + received)

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    with socketserver.ThreadingTCPServer(("0.0.0.0", port), Handler) as server:
        server.serve_forever()


def http_get(url: str, host: str | None, method: str = "GET") -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=TIMEOUT)
    try:
        headers = {"host": host} if host is not None else {}
        conn.request(method, parts.path or "/", headers=headers)
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        return {
            "status": response.status,
            "headers": {k.lower(): v for k, v in response.getheaders()},
            "body": body,
        }
    finally:
        conn.close()


def h2_get(host: str, port: int, path: str, authority: str) -> dict[str, Any]:
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    try:
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
    except OSError as exc:
        return {"error": str(exc)}
    with sock:
        conn.initiate_connection()
        headers = [(":method", "GET"), (":scheme", "http"), (":authority", authority),
                   (":path", path)]
        conn.send_headers(1, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, body, seen = 0, b"", {}
        while True:
            try:
                data = sock.recv(65536)
            except OSError as exc:
                return {"error": str(exc)}
            if not data:
                return {"error": "connection closed before the response ended"}
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    seen = {k.decode(): v.decode() for k, v in event.headers}
                    status = int(seen[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return {"status": status, "headers": seen, "body": body.decode()}
                elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                    return {"error": type(event).__name__}
            sock.sendall(conn.data_to_send())


def tcp_send(host: str, port: int, text: str) -> dict[str, Any]:
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(text.encode())
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return {"reply": received.decode("utf-8", "replace")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("http-server")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    p = sub.add_parser("tcp-echo")
    p.add_argument("--port", type=int, required=True)
    p = sub.add_parser("http-get")
    p.add_argument("url")
    p.add_argument("--host")
    p.add_argument("--method", default="GET")
    p = sub.add_parser("h2-get")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("path")
    p.add_argument("authority")
    p = sub.add_parser("tcp-send")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("text")
    args = parser.parse_args(argv)
    if args.command == "http-server":
        http_server(args.port, args.name)
    elif args.command == "tcp-echo":
        tcp_echo(args.port)
    elif args.command == "http-get":
        print(json.dumps(http_get(args.url, args.host, args.method)))
    elif args.command == "h2-get":
        print(json.dumps(h2_get(args.host, args.port, args.path, args.authority)))
    else:
        print(json.dumps(tcp_send(args.host, args.port, args.text)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
