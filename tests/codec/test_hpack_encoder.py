"""Our HPACK encoder against the ``hpack`` library's decoder."""

from __future__ import annotations

import hpack
from hpack.hpack import encode_integer as reference_integer
from hpack.struct import NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.codec.headers import CachingEncoder
from sidecar.codec.hpack_encoder import (
    PER_REQUEST_NAMES,
    LeanEncoder,
    encode_integer,
    encode_literals,
    encode_per_request,
)

names = st.one_of(
    st.sampled_from(
        [
            b":method",
            b":path",
            b":status",
            b"content-type",
            b"x-request-id",
            b"traceparent",
            b"authorization",
            b"cookie",
            b"date",
            b"x-a",
            b"x-b",
            b"grpc-status",
            b"accept-encoding",
        ]
    ),
    st.binary(min_size=1, max_size=20),
)
values = st.one_of(
    st.sampled_from([b"", b"GET", b"/", b"200", b"gzip, deflate", b"1"]),
    st.binary(max_size=50),
    st.binary(min_size=120, max_size=300),
)
fields = st.tuples(names, values, st.booleans())
blocks = st.lists(fields, max_size=10)
# Each step: table size changes before the block (often none), then a header list.
steps = st.lists(
    st.tuples(st.lists(st.sampled_from([0, 64, 100, 150, 256, 4096]), max_size=2), blocks),
    min_size=1,
    max_size=20,
)

Field = tuple[bytes, bytes, bool]
Steps = list[tuple[list[int], list[Field]]]


def as_headers(block: list[tuple[bytes, bytes, bool]]) -> list[tuple[bytes, bytes]]:
    return [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in block]


@settings(max_examples=400, deadline=None)
@given(steps, st.booleans())
def test_hpack_decodes_what_we_encode(sequence: Steps, repeat: bool) -> None:
    ours = LeanEncoder()
    decoder = hpack.Decoder(max_header_list_size=1 << 20)
    for sizes, block in sequence:
        for size in sizes:
            ours.set_max_size(size)
        headers = as_headers(block)
        for _ in range(2 if repeat else 1):  # the second time, from the table
            assert decoder.decode(ours.encode(headers), raw=True) == [tuple(h) for h in headers]
            table = decoder.header_table
            assert table.maxsize == ours.max_size
            assert table._current_size == ours.size
            assert list(table.dynamic_entries) == [f for f, _ in reversed(ours._entries)]


@given(st.integers(0, 2**32), st.integers(1, 8))
def test_integers_match_the_reference(value: int, prefix_bits: int) -> None:
    assert encode_integer(value, prefix_bits, 0) == bytes(reference_integer(value, prefix_bits))


def test_per_request_values_leave_the_table_alone() -> None:
    ours = LeanEncoder()
    decoder = hpack.Decoder()
    request = [(b":method", b"GET"), (b":path", b"/x"), (b"user-agent", b"h2load")]
    decoder.decode(ours.encode(request), raw=True)
    version = ours.version
    for n in range(5):
        block = ours.encode([*request, (b"x-request-id", str(n).encode())])
        assert list(decoder.decode(block, raw=True))[-1] == (b"x-request-id", str(n).encode())
        assert block[:3] == bytes((0x82, 0xBF, 0xBE))  # all indexed but the id
        assert block[3] & 0xF0 == 0x00  # literal without indexing
    assert ours.version == version


def test_credentials_are_never_indexed() -> None:
    ours = LeanEncoder()
    block = ours.encode([(b"authorization", b"Bearer secret-token-value")])
    assert block[0] & 0xF0 == 0x10
    (header,) = hpack.Decoder().decode(block, raw=True)
    assert isinstance(header, NeverIndexedHeaderTuple)
    assert ours.size == 0


def test_size_updates_announce_the_smallest_then_the_final_limit() -> None:
    ours = LeanEncoder()
    ours.encode([(b"x-a", b"1")])
    ours.set_max_size(0)
    ours.set_max_size(2048)
    block = ours.encode([(b"x-a", b"1")])
    assert block[:4] == b"\x20\x3f\xe1\x0f"  # 0, then 2048 (5-bit prefix: 31 + 2017)
    assert ours.size == 36


def test_per_request_fields_follow_a_cached_block() -> None:
    caching = CachingEncoder()
    decoder = hpack.Decoder()
    steady = [(b":status", b"200"), (b"date", b"Sat, 28 Nov 2026 08:00:00 GMT")]
    blocks = []
    for n in range(3):
        headers = [(b"x-request-id", str(n).encode()), *steady, (b"grpc-timeout", b"99m")]
        block = caching.encode(headers)
        blocks.append(block)
        assert decoder.decode(block, raw=True) == [*steady, headers[0], headers[-1]]
        assert decoder.decode(caching.encode(steady), raw=True) == steady
    assert list(caching._cache) == [tuple(steady)]
    assert all(block.startswith(caching._cache[tuple(steady)]) for block in blocks)


per_request_fields = st.tuples(
    st.one_of(st.sampled_from(sorted(PER_REQUEST_NAMES)), st.binary(min_size=1, max_size=12)),
    st.one_of(st.binary(max_size=130), st.sampled_from([b"", b"9999876u", b"x" * 126])),
    st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(per_request_fields, max_size=8))
def test_per_request_literals_are_the_same_bytes_whichever_way_they_are_made(
    block: list[Field],
) -> None:
    headers = as_headers(block)
    encoded = encode_per_request(headers)
    # The field-by-field encoding is the reference; never-indexed fields keep their flag.
    assert encoded == encode_literals(headers)
    decoded = hpack.Decoder().decode(encoded, raw=True)
    assert decoded == [tuple(h) for h in headers]
    assert [type(h) is NeverIndexedHeaderTuple for h in decoded] == [never for *_, never in block]


@settings(max_examples=300, deadline=None)
@given(st.lists(blocks, min_size=1, max_size=12))
def test_hpack_decodes_what_the_caching_encoder_sends(sequence: list[list[Field]]) -> None:
    caching = CachingEncoder()
    decoder = hpack.Decoder(max_header_list_size=1 << 20)
    for block in sequence * 2:  # the second pass meets its own cache
        headers = as_headers(block)
        moved = [h for h in headers if h[0] in PER_REQUEST_NAMES]
        expected = [h for h in headers if h[0] not in PER_REQUEST_NAMES] + moved
        decoded = decoder.decode(caching.encode(headers), raw=True)
        assert decoded == [tuple(h) for h in expected]
        table = decoder.header_table
        assert list(table.dynamic_entries) == [f for f, _ in reversed(caching.encoder._entries)]
