"""Hypothesis: HPACK both ways against the ``hpack`` library, caches that never lie, and
arbitrary input that never raises anything but ``CodecProtocolError``."""

from __future__ import annotations

import contextlib

import hpack
import hyperframe.frame as hf
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.codec import CodecProtocolError, H2Codec
from sidecar.codec.frames import PREFACE
from sidecar.codec.headers import CachingDecoder, CachingEncoder
from tests.codec.factory import REQUEST, RESPONSE, client, server

names = st.sampled_from([b"content-type", b"x-a", b"x-b", b"user-agent", b"cookie", b":path"])
values = st.one_of(st.sampled_from([b"", b"1", b"text/plain", b"/"]), st.binary(max_size=40))
header_lists = st.lists(st.tuples(names, values), max_size=8)
# Each step: a header list (often one seen before) and sometimes a table size change first.
steps = st.lists(
    st.tuples(st.integers(0, 5), header_lists, st.sampled_from([None, None, None, 0, 64, 4096])),
    min_size=1,
    max_size=25,
)


Fields = list[tuple[bytes, bytes]]
Steps = list[tuple[int, Fields, int | None]]


def pick(history: list[Fields], which: int, fresh: Fields) -> Fields:
    return history[which % len(history)] if history and which else fresh


@settings(max_examples=200, deadline=None)
@given(steps)
def test_our_encoder_against_hpack_decoder(sequence: Steps) -> None:
    ours = CachingEncoder()
    reference = hpack.Decoder()
    history: list[list[tuple[bytes, bytes]]] = []
    for which, fresh, size in sequence:
        headers = pick(history, which, fresh)
        history.append(headers)
        if size is not None:
            ours.set_table_size(size)
        assert reference.decode(ours.encode(headers), raw=True) == headers


@settings(max_examples=200, deadline=None)
@given(steps, st.booleans())
def test_hpack_encoder_against_our_decoder(sequence: Steps, huffman: bool) -> None:
    encoder = hpack.Encoder()
    ours = CachingDecoder(1 << 20)
    history: list[list[tuple[bytes, bytes]]] = []
    for which, fresh, size in sequence:
        headers = pick(history, which, fresh)
        history.append(headers)
        if size is not None:
            encoder.header_table_size = size
        block = encoder.encode(headers, huffman=huffman)
        assert list(ours.decode(block).headers) == headers


@settings(max_examples=200, deadline=None)
@given(steps)
def test_cached_decoding_tracks_a_plain_decoder(sequence: Steps) -> None:
    """Repeated header lists come back as byte-identical blocks, as from a warm peer."""
    encoder = hpack.Encoder()
    ours = CachingDecoder(1 << 20)
    reference = hpack.Decoder(max_header_list_size=1 << 20)
    history: list[list[tuple[bytes, bytes]]] = []
    for which, fresh, size in sequence:
        headers = pick(history, which, fresh)
        history.append(headers)
        if size is not None:
            encoder.header_table_size = size
        block = encoder.encode(headers, huffman=False)
        assert list(ours.decode(block).headers) == reference.decode(block, raw=True)
        ours_table = ours.decoder.header_table
        assert ours_table.dynamic_entries == reference.header_table.dynamic_entries
        assert ours_table.maxsize == reference.header_table.maxsize


def test_a_cache_hit_never_survives_a_table_change() -> None:
    encoder = hpack.Encoder()
    ours = CachingDecoder(1 << 20)
    warm = encoder.encode([(b"x-a", b"1")])
    ours.decode(warm)
    indexed = encoder.encode([(b"x-a", b"1")])  # refers to dynamic entry 62
    assert ours.decode(indexed).headers == ((b"x-a", b"1"),)
    assert ours.decode(indexed).headers == ((b"x-a", b"1"),)  # from the cache
    ours.decode(encoder.encode([(b"x-b", b"2")]))  # entry 62 is now x-b
    assert ours.decode(indexed).headers == ((b"x-b", b"2"),)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_after_the_preface(data: bytes) -> None:
    codec, _ = server()
    with contextlib.suppress(CodecProtocolError):
        codec.receive_data(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_random_bytes_from_the_start(data: bytes, client_side: bool) -> None:
    codec = H2Codec(client_side=client_side)
    codec.initiate_connection()
    with contextlib.suppress(CodecProtocolError):
        codec.receive_data((b"" if client_side else PREFACE) + data)


frame_types = st.sampled_from(range(11))
frames = st.tuples(
    frame_types,
    st.integers(0, 255),
    st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1]),
    st.binary(max_size=40),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(frames, max_size=12), st.integers(1, 7), st.booleans())
def test_well_framed_random_frames(
    raw_frames: list[tuple[int, int, int, bytes]], split: int, client_side: bool
) -> None:
    """Valid frame headers around random payloads, fed in pieces, on a connection in use."""
    if client_side:
        codec, peer = client()
        codec.send_headers(1, REQUEST)
        start = peer.headers(1, RESPONSE)
    else:
        codec, peer = server()
        start = peer.headers(1, REQUEST)
    start += bytes(hf.PingFrame(0).serialize())
    data = start + b"".join(
        len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload
        for ftype, flags, sid, payload in raw_frames
    )
    try:
        for pos in range(0, len(data), split * 7):
            codec.receive_data(data[pos : pos + split * 7])
            codec.data_to_send()
    except CodecProtocolError:
        assert codec.data_to_send()  # the GOAWAY
