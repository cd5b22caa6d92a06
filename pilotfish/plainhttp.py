"""A small HTTP/1.1 server for operator endpoints (admin, metrics): text in, text out.

Not for traffic: one request at a time per connection, whole bodies, no streaming.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Collection

import h11

log = logging.getLogger(__name__)

# (status, content type, body)
Response = tuple[int, str, bytes]
Handler = Callable[[str, str], Response]  # (method, target) -> response


FORBIDDEN: Response = (
    403,
    "text/plain",
    b"forbidden: this request changes state and is only taken from the loopback address\n",
)


def is_loopback(peer: object) -> bool:
    """Whether a ``peername`` is a loopback address (an IPv4-mapped one included)."""
    if not isinstance(peer, tuple) or not peer:
        return False  # a Unix socket has no address to trust; none is used here
    try:
        address = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


async def start_plain_http(
    handle: Handler, host: str, port: int, *, loopback_only_methods: Collection[str] = ()
) -> asyncio.AbstractServer:
    """Serve ``handle``. Requests with a method in ``loopback_only_methods`` from any peer
    but a loopback address get 403, whatever address the server is bound to."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        guarded = handle
        if loopback_only_methods and not is_loopback(writer.get_extra_info("peername")):

            def guarded(method: str, target: str) -> Response:
                return FORBIDDEN if method in loopback_only_methods else handle(method, target)

        await _serve_connection(guarded, reader, writer)

    return await asyncio.start_server(serve, host, port, reuse_address=True)


async def _serve_connection(
    handle: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if isinstance(event, h11.Request):
                status, ctype, body = handle(event.method.decode(), event.target.decode())
                headers = [("content-type", ctype), ("content-length", str(len(body)))]
                writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
                writer.write(conn.send(h11.Data(data=body)) or b"")
                writer.write(conn.send(h11.EndOfMessage()) or b"")
                await writer.drain()
            elif isinstance(event, h11.EndOfMessage):
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    break
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                break
    except (h11.ProtocolError, ConnectionError) as exc:
        log.debug("operator endpoint connection error: %s", exc)
    finally:
        writer.close()
