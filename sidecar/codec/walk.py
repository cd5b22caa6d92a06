"""Frame headers walked in place, for what must be known of a read before a codec parses it.

``Ngh2Codec`` hands libnghttp2 a client's read whole; before it does, ``walk`` reads the frame
headers (9 bytes each, payloads skipped) to cap the frames handled per turn, to count the
frames that carry no request for the peer's budget, and to see whether a header block is left
open. ``resets_in`` looks through what libnghttp2 answered for an RST_STREAM of its own.
"""

from __future__ import annotations

import struct

unpack_header = struct.Struct(">BHBB").unpack_from  # length (high, low), type, flags
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
HEADERS, RST_STREAM, CONTINUATION = 0x1, 0x3, 0x9
# What a frame costs the peer's budget, by type, when it is walked: nothing (it carries a
# request, or its cost is decided on its event: RST_STREAM), always, unless it is an ACK
# (SETTINGS, PING), or when it is empty without END_STREAM (DATA). Unknown types always cost.
_FREE, _ALWAYS, _UNLESS_ACK, _IF_EMPTY = 0, 1, 2, 3
CHARGE = bytes([_IF_EMPTY, _FREE, _ALWAYS, _FREE, _UNLESS_ACK, _FREE, _UNLESS_ACK, _FREE])
CHARGE += bytes([_ALWAYS, _FREE]) + bytes([_ALWAYS]) * 246
NO_CHARGE = bytes(256)  # a connection without a budget


def resets_in(frames: bytes) -> bool:
    """Whether serialized ``frames`` hold an RST_STREAM."""
    pos = 0
    end = len(frames)
    while pos + 9 <= end:
        hi, lo, ftype, _ = unpack_header(frames, pos)
        if ftype == RST_STREAM:
            return True
        pos += 9 + (hi << 16 | lo)
    return False


def walk(
    buf: bytearray, pos: int, end: int, quota: int, charge: bytes
) -> tuple[int, int, int, int]:
    """Frame headers from ``pos`` to ``end``, at most ``quota`` of them (0: no limit): where
    the walk stopped, how many frames ``charge`` charges, the last frame's type and flags."""
    charged = 0
    ftype = flags = -1
    if quota:  # a large read: the frames after the quota wait for a later turn
        while pos + 9 <= end and quota:
            quota -= 1
            hi, lo, ftype, flags = unpack_header(buf, pos)
            pos += 9 + (hi << 16 | lo)
            kind = charge[ftype]
            if kind and (
                kind == _ALWAYS
                or (kind == _UNLESS_ACK and not flags & ACK)
                or (kind == _IF_EMPTY and not (hi or lo) and not flags & END_STREAM)
            ):
                charged += 1
        return pos, charged, ftype, flags
    while pos + 9 <= end:  # the same, without counting
        hi, lo, ftype, flags = unpack_header(buf, pos)
        pos += 9 + (hi << 16 | lo)
        kind = charge[ftype]
        if kind and (
            kind == _ALWAYS
            or (kind == _UNLESS_ACK and not flags & ACK)
            or (kind == _IF_EMPTY and not (hi or lo) and not flags & END_STREAM)
        ):
            charged += 1
    return pos, charged, ftype, flags
