"""HPACK, paid for once per distinct header block: ``hpack`` decodes, ``LeanEncoder`` encodes.

Proxied traffic repeats itself: the same request headers from a load balancer's health
checks, the same response headers from a backend. Both coders keep a cache that is valid only
while their dynamic table is unchanged, which is what makes it correct:

* HPACK decoding is a function of the block's bytes and the decoder's state, and that state
  is the dynamic table (its entries and its size limit; ``max_header_list_size`` is fixed).
  Every change to the table goes through ``HeaderTable.add`` or the ``maxsize`` setter, and
  ``_VersionedTable`` counts those calls. A block whose decoding did not change the version
  left the table as it found it, so decoding the same bytes again against the same version
  gives the same header list and changes nothing: it may be answered from the cache. Any
  change of version empties the cache. Blocks that did change the table (literals with
  incremental indexing, size updates) are never cached, so they are always replayed.
* Encoding (``hpack_encoder.LeanEncoder``, ours) is the mirror image: a header list whose
  encoding did not change the encoder's table (no insertion, no pending size update)
  encodes to the same bytes again for as long as the table stays at that version. The key
  compares names and values, not the ``NeverIndexedHeaderTuple`` hint: a hit can only
  reuse a block whose fields were all already indexed or sent as literals, and the peer
  decodes the same list either way.

Decoded header lists are validated once per cached block (``Decoded.problems``).
"""

from __future__ import annotations

from itertools import compress
from operator import itemgetter, not_
from typing import Any, cast

import hpack
from hpack.exceptions import HPACKError, OversizedHeaderListError
from hpack.table import HeaderTable

from sidecar.codec.errors import COMPRESSION_ERROR, ENHANCE_YOUR_CALM, CodecProtocolError
from sidecar.codec.events import Headers
from sidecar.codec.hpack_encoder import PER_REQUEST_NAMES, LeanEncoder, encode_per_request
from sidecar.codec.validate import REQUEST, RESPONSE, TRAILERS, content_length, problem

__all__ = ["REQUEST", "RESPONSE", "TRAILERS", "CachingDecoder", "CachingEncoder", "validated"]

# Bounds on what a cache holds, per connection and direction: a peer chooses the contents.
CACHE_ENTRIES = 32
MAX_CACHED_BLOCK = 512  # bytes of encoded block
MAX_CACHED_FIELDS = 8192  # bytes of names and values
MAX_ENCODER_TABLE = 4096  # what we use of a larger table the peer offers
_NAME = itemgetter(0)


class _VersionedTable(HeaderTable):
    """A header table that counts its changes."""

    version = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.version += 1
        cast(Any, HeaderTable.maxsize).fset(self, newmax)


class Decoded:
    """One decoded header block and what validation found, per kind of block."""

    __slots__ = ("content_length", "headers", "problems")

    def __init__(self, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        self.headers = headers
        self.problems: dict[int, str | None] = {}
        self.content_length = -1  # of a valid request block: -1 when it has none


class CachingDecoder:
    def __init__(self, max_header_list_size: int) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._table = _VersionedTable()
        self.decoder.header_table = self._table
        self._cache: dict[bytes, Decoded] = {}
        self._version = 0

    @property
    def max_header_list_size(self) -> int:
        return self.decoder.max_header_list_size

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        self.decoder.max_header_list_size = value
        self._cache.clear()

    def decode(self, block: bytes) -> Decoded:
        table = self._table
        cache = self._cache
        version = table.version
        if version != self._version:
            cache.clear()
            self._version = version
        else:
            hit = cache.get(block)
            if hit is not None:
                return hit
        try:
            headers = self.decoder.decode(block, raw=True)
        except OversizedHeaderListError as exc:
            raise CodecProtocolError(f"header list too large: {exc}", ENHANCE_YOUR_CALM) from exc
        except HPACKError as exc:
            raise CodecProtocolError(f"HPACK: {exc}", COMPRESSION_ERROR) from exc
        decoded = Decoded(tuple(headers))
        if table.version == version and _cacheable(block, decoded.headers):
            if len(cache) >= CACHE_ENTRIES:
                cache.clear()
            cache[block] = decoded
        return decoded


class CachingEncoder:
    def __init__(self) -> None:
        self.encoder = LeanEncoder()
        self._cache: dict[tuple[tuple[bytes, bytes], ...], bytes] = {}
        self._version = 0

    def set_table_size(self, peer_max: int) -> None:
        self.encoder.set_max_size(min(peer_max, MAX_ENCODER_TABLE))

    def encode(self, headers: Headers) -> bytes:
        """The block for ``headers``. Per-request fields (request and trace ids, deadlines)
        are moved after the others and sent as literals that leave the table alone, so the
        rest of a request's block is encoded once and then served from the cache. Only the
        order of fields with different names changes, which carries no meaning (RFC 9110
        section 5.3)."""
        # Which fields are per request, in one pass without a Python step per field (a gRPC
        # request carries a dozen or more).
        marks = list(map(PER_REQUEST_NAMES.__contains__, map(_NAME, headers)))
        if True not in marks:
            return self._encode_cached(headers)
        stable = list(compress(headers, map(not_, marks)))
        return self._encode_cached(stable) + encode_per_request(list(compress(headers, marks)))

    def _encode_cached(self, headers: Headers) -> bytes:
        encoder = self.encoder
        cache = self._cache
        key = tuple(headers)
        version = encoder.version
        if version != self._version:
            cache.clear()
            self._version = version
        else:
            hit = cache.get(key)
            if hit is not None:
                return hit
        pending_resize = encoder.size_update_pending
        block = encoder.encode(headers)
        if (
            encoder.version == version
            and not pending_resize
            and not encoder.volatile
            and _cacheable(block, key)
        ):
            if len(cache) >= CACHE_ENTRIES:
                cache.clear()
            cache[key] = block
        return block


def _cacheable(block: bytes, headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    if len(block) > MAX_CACHED_BLOCK:
        return False
    return sum(len(name) + len(value) for name, value in headers) <= MAX_CACHED_FIELDS


# -- validation: the rules live in ``sidecar.codec.validate``, shared with HTTP/1.1 -------------

def validated(decoded: Decoded, kind: int) -> str | None:
    problems = decoded.problems
    if kind in problems:
        return problems[kind]
    found = problems[kind] = problem(kind, decoded.headers)
    if kind == REQUEST and found is None:
        decoded.content_length = content_length(decoded.headers)
    return found
