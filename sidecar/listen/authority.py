"""The authority of a connection's first HTTP/1.1 request, read from its first bytes (sans-IO).

Behind interception the outbound listener sees every connection the app opens. One whose
first request names a host the mesh routes is proxied as HTTP; any other goes, as TCP, to the
address the app dialled (its original destination), HTTP included: the mesh has no business
with it, and the app reaches the outside world as if there were no sidecar. The decision is
per connection, which matches what the app did: it opened the connection to one address.

``first_authority`` returns the authority, ``""`` when the request names none (the caller
then treats the connection as not the mesh's), or ``None`` while more bytes are needed.

HTTP/2 with prior knowledge is not read this way: its clients (grpcio among them) wait for the
server's SETTINGS before they send a request, so the listener decides those by the address
dialled instead.
"""

from __future__ import annotations

# A request head larger than this is not waited for: the connection is handled as HTTP by the
# mesh, as it would be without this check.
MAX_HEAD = 64 * 1024


class Unreadable(ValueError):
    """The first bytes are not a request this reader understands."""


def first_authority(head: bytes) -> str | None:
    """The authority of the HTTP/1.x request that ``head`` starts with."""
    end = head.find(b"\r\n\r\n")
    if end == -1:
        if len(head) > MAX_HEAD:
            raise Unreadable("request head too large")
        return None
    lines = head[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise Unreadable("malformed request line")
    target = parts[1]
    if target.startswith((b"http://", b"https://")):
        # absolute-form: the authority is in the target (RFC 9112, section 3.2.2).
        rest = target.split(b"://", 1)[1]
        return rest.split(b"/", 1)[0].decode("latin-1").lower()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            return value.strip().decode("latin-1").lower()
    return ""
