"""An HPACK encoder (RFC 7541) built for a proxy: cheap per field, and a calm dynamic table.

``hpack.Encoder`` scans its whole dynamic table for every field and inserts every field it
has not seen, so a per-request value (a request id, a trace id) is inserted on every request,
evicts what was worth keeping and changes the table each time. This encoder:

* finds fields with two dictionaries (exact field, name only) keyed by insertion number, so
  a lookup costs the same whatever the table holds;
* sends per-request values (request and trace ids, deadlines), values that vary by response
  (dates, lengths, validators) and large values as literals without indexing, so the table
  holds what repeats;
* sends credentials and short cookies as never-indexed literals (RFC 7541 section 7.1.3),
  as does anything the peer sent us never-indexed (``NeverIndexedHeaderTuple``);
* never Huffman-codes: pure-Python Huffman costs far more CPU than the bytes it saves here.

Only the static table's contents come from the ``hpack`` package.
"""

from __future__ import annotations

from collections import deque
from itertools import chain
from operator import itemgetter

from hpack.struct import NeverIndexedHeaderTuple
from hpack.table import HeaderTable

from sidecar.codec.events import Headers

STATIC_LENGTH = len(HeaderTable.STATIC_TABLE)
ENTRY_OVERHEAD = 32  # RFC 7541 section 4.1

_STATIC_FIELD: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELD.setdefault((_name, _value), _index)
    _STATIC_NAME.setdefault(_name, _index)

# Values new with every request: indexing them churns the table, caching their blocks is vain.
PER_REQUEST_NAMES = frozenset(
    {
        b"x-request-id",
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"grpc-timeout",
        b"x-pilotfish-expected-rq-timeout-ms",
    }
)
# Values that vary too much to earn a table entry, though a whole block may well repeat.
UNINDEXED_NAMES = PER_REQUEST_NAMES | {b"date", b"content-length", b"last-modified", b"etag"}
SENSITIVE_NAMES = frozenset({b"authorization", b"proxy-authorization"})
SHORT_COOKIE = 20  # shorter cookies are guessable from compression side channels


def encode_integer(value: int, prefix_bits: int, first: int) -> bytes:
    """``value`` with an N-bit prefix (RFC 7541 section 5.1); ``first`` holds the high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_string(data: bytes) -> bytes:
    size = len(data)
    if size < 0x7F:
        return bytes((size,)) + data
    return encode_integer(size, 7, 0) + data


# "Literal without indexing, new name" (RFC 7541 section 6.2.2) up to the value, per name.
_LITERAL_PREFIX = {name: b"\x00" + encode_string(name) for name in PER_REQUEST_NAMES}


_NAME, _VALUE = itemgetter(0), itemgetter(1)
# The one-byte length of a short string literal, without Huffman coding, by length.
_SHORT_LENGTH = tuple(bytes((n,)) for n in range(0x7F))


def encode_per_request(headers: Headers) -> bytes:
    """Per-request fields as literals that leave the dynamic table alone (their names are in
    neither table: they are never inserted), so they can follow any cached block."""
    values = list(map(_VALUE, headers))
    if (
        values
        and max(map(len, values)) < 0x7F
        and _LITERAL_PREFIX.keys() >= set(map(_NAME, headers))
        and NeverIndexedHeaderTuple not in map(type, headers)
    ):
        # The usual request's (ids, trace context, a deadline: known names, short values):
        # each field its name's prefix, a length byte and the value, joined without a Python
        # step per field.
        parts = zip(
            map(_LITERAL_PREFIX.__getitem__, map(_NAME, headers)),
            map(_SHORT_LENGTH.__getitem__, map(len, values)),
            values,
            strict=True,
        )
        return b"".join(chain.from_iterable(parts))
    return encode_literals(headers)


def encode_literals(headers: Headers) -> bytes:
    """``encode_per_request`` field by field, for any names and values."""
    out: list[bytes] = []
    for header in headers:
        name, value = header
        prefix = _LITERAL_PREFIX.get(name)
        if prefix is None or type(header) is NeverIndexedHeaderTuple:
            first = b"\x10" if type(header) is NeverIndexedHeaderTuple else b"\x00"
            out.append(first + encode_string(name) + encode_string(value))
        elif len(value) < 0x7F:
            out += (prefix, _SHORT_LENGTH[len(value)], value)
        else:
            out.append(prefix + encode_string(value))
    return b"".join(out)


class LeanEncoder:
    def __init__(self) -> None:
        self.max_size = 4096
        self.size = 0
        self.version = 0  # changes whenever the dynamic table does
        self._inserted = 0  # insertion number of the newest entry
        self._evicted = 0  # insertion number of the newest evicted entry
        self._entries: deque[tuple[tuple[bytes, bytes], int]] = deque()  # oldest first
        self._by_field: dict[tuple[bytes, bytes], int] = {}  # field -> insertion number
        self._by_name: dict[bytes, int] = {}
        self._size_updates: list[int] = []  # to announce at the start of the next block
        self.volatile = False  # the last block held a per-request value: not worth caching

    @property
    def size_update_pending(self) -> bool:
        return bool(self._size_updates)

    def set_max_size(self, max_size: int) -> None:
        """The table's new limit; the change is announced at the start of the next block."""
        if max_size == self.max_size:
            return
        updates = self._size_updates
        # RFC 7541 section 4.2: the smallest limit since the last block, then the final one.
        if updates and updates[0] < max_size:
            self._size_updates = [updates[0], max_size]
        else:
            self._size_updates = [max_size]
        self.max_size = max_size
        self.version += 1
        self._evict(0)

    def encode(self, headers: Headers) -> bytes:
        out: list[bytes] = []
        volatile = False
        if self._size_updates:
            out.extend(encode_integer(size, 5, 0x20) for size in self._size_updates)
            self._size_updates = []
        for header in headers:
            name, value = header
            field = (name, value)
            index = _STATIC_FIELD.get(field)
            if index is not None:
                out.append(encode_integer(index, 7, 0x80))
                continue
            number = self._by_field.get(field)
            if number is not None and number > self._evicted:
                out.append(encode_integer(self._inserted - number + 1 + STATIC_LENGTH, 7, 0x80))
                continue
            name_index = _STATIC_NAME.get(name)
            if name_index is None:
                number = self._by_name.get(name)
                if number is not None and number > self._evicted:
                    name_index = self._inserted - number + 1 + STATIC_LENGTH
            if (
                type(header) is NeverIndexedHeaderTuple
                or name in SENSITIVE_NAMES
                or (name == b"cookie" and len(value) < SHORT_COOKIE)
            ):
                prefix_bits, first = 4, 0x10
            elif name in UNINDEXED_NAMES:
                prefix_bits, first = 4, 0x00
                if name in PER_REQUEST_NAMES:
                    volatile = True
            elif not self._insert(field):
                prefix_bits, first = 4, 0x00
            else:
                prefix_bits, first = 6, 0x40
            if name_index is None:
                out.append(bytes((first,)) + encode_string(name) + encode_string(value))
            else:
                out.append(encode_integer(name_index, prefix_bits, first) + encode_string(value))
        self.volatile = volatile
        return b"".join(out)

    def _insert(self, field: tuple[bytes, bytes]) -> bool:
        """Add ``field`` to the table, or say it is not worth a quarter of the table."""
        entry_size = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        if entry_size * 4 > self.max_size:
            return False
        self._evict(entry_size)
        self._inserted += 1
        self._entries.append((field, self._inserted))
        self._by_field[field] = self._inserted
        self._by_name[field[0]] = self._inserted
        self.size += entry_size
        self.version += 1
        return True

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until ``room`` more bytes fit."""
        entries = self._entries
        while entries and self.size + room > self.max_size:
            field, number = entries.popleft()
            self.size -= len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
            self._evicted = number
            if self._by_field.get(field) == number:
                del self._by_field[field]
            if self._by_name.get(field[0]) == number:
                del self._by_name[field[0]]
            self.version += 1
