"""Consistent hashing balancers: ring hash and maglev. Pure.

Both map a request key (source IP, source IP and port, a header or a cookie) to a host so the
same key keeps reaching the same host, and a change of the host set moves few keys: hosts are
placed by hashing their ``key`` (address), never their index.

The hash is BLAKE2b cut to 64 bits (``hashlib``, C code): stable across processes and Python
versions, unlike ``hash()``, and about 1 µs per short key, most of it call overhead (a pure
Python FNV or murmur is slower still). A pick costs one hash plus a bisect (ring) or a list
lookup (maglev), about 2 µs in all. Building runs on every ``set_hosts`` and is the expensive
part: a ring of ~1024 entries takes about 3 ms; a 65537-entry maglev table about 0.1 s of
pure Python, so ``Maglev`` keeps its last few tables (health flaps then cost nothing) and a
cluster with few hosts may use a smaller prime.
"""

from __future__ import annotations

import abc
import bisect
import hashlib
import math
import random
from collections.abc import Collection, Sequence

from pilotfish.config.cluster_policy import HashOn
from sidecar.upstream.policy.lb import BalancerBase, LbContext, LbHost


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def request_key(ctx: LbContext, hash_on: HashOn, name: str | None) -> str | None:
    """The value a request is hashed on, or None when the request does not carry it."""
    if hash_on is HashOn.SOURCE_IP:
        return ctx.source_ip or None
    if hash_on is HashOn.SOURCE_IP_PORT:
        return f"{ctx.source_ip}:{ctx.source_port}" if ctx.source_ip else None
    assert name is not None, "hash_on header/cookie needs a name"
    if hash_on is HashOn.HEADER:
        return ctx.header(name)
    return ctx.cookie(name)


class _Hashing(BalancerBase):
    def __init__(self, rng: random.Random, hash_on: HashOn, name: str | None) -> None:
        super().__init__()
        self.rng = rng
        self.hash_on = hash_on
        self.name = name

    def choose(self, ctx: LbContext, exclude: Collection[int] = ()) -> int | None:
        if not self.hosts:
            return None
        key = request_key(ctx, self.hash_on, self.name)
        if key is None:
            # Nothing to be sticky on: spread such requests instead of piling them on one host.
            return self.rng.choice(self._candidates(exclude)).index
        return self._lookup(hash64(key), exclude)

    @abc.abstractmethod
    def _lookup(self, point: int, exclude: Collection[int]) -> int:
        """The host that owns ``point`` (skipping ``exclude``); supplied by the subclass."""


class RingHash(_Hashing):
    """Ketama-style ring: each host owns virtual nodes in proportion to its weight.

    The ring has between ``minimum_size`` and twice that many entries, at most
    ``maximum_size``, and every host at least one. A retry walks on clockwise to the next
    host not yet tried.
    """

    def __init__(
        self,
        rng: random.Random,
        hash_on: HashOn,
        name: str | None,
        minimum_size: int = 1024,
        maximum_size: int = 8 * 1024 * 1024,
    ) -> None:
        super().__init__(rng, hash_on, name)
        self.minimum_size = minimum_size
        self.maximum_size = maximum_size
        self._points: list[int] = []
        self._owners: list[int] = []

    def _hosts_changed(self) -> None:
        entries: list[tuple[int, int]] = []
        per_weight = self.entries_per_weight(sum(h.weight for h in self.hosts))
        for host in self.hosts:
            for replica in range(max(1, round(host.weight * per_weight))):
                entries.append((hash64(f"{host.key}_{replica}"), host.index))
        entries.sort()
        self._points = [p for p, _ in entries]
        self._owners = [i for _, i in entries]

    def entries_per_weight(self, total_weight: int) -> float:
        """Ring entries per unit of weight: a power of two giving ``minimum_size`` or more.

        A power of two rather than exactly ``minimum_size / total``: it only changes when the
        total weight crosses one, so a host coming or going leaves every other host's entries
        (and the keys they own) where they were.
        """
        if total_weight <= 0:
            return 0.0
        per_weight = 2.0 ** math.ceil(math.log2(self.minimum_size / total_weight))
        while per_weight * total_weight > self.maximum_size:
            per_weight /= 2
        return per_weight

    def _lookup(self, point: int, exclude: Collection[int]) -> int:
        n = len(self._points)
        start = bisect.bisect_left(self._points, point) % n
        if exclude:
            for step in range(n):
                owner = self._owners[(start + step) % n]
                if owner not in exclude:
                    return owner
        return self._owners[start]

    @property
    def ring_size(self) -> int:
        return len(self._points)


_RECENT_TABLES = 4


class Maglev(_Hashing):
    """Google's Maglev lookup table: even load, lookups in O(1), slightly more disruption.

    Each host fills table slots along its own permutation of the table (from its key's
    hash); hosts take turns, a host of weight w taking w/max_weight of a turn each round, so
    slot counts follow the weights. ``table_size`` must be prime. A retry walks on to the
    next slot owned by a host not yet tried.
    """

    def __init__(
        self, rng: random.Random, hash_on: HashOn, name: str | None, table_size: int = 65537
    ) -> None:
        super().__init__(rng, hash_on, name)
        self.table_size = table_size
        self._table: list[int] = []
        self._recent: dict[tuple[LbHost, ...], list[int]] = {}

    def _hosts_changed(self) -> None:
        hosts = tuple(sorted(self.hosts, key=lambda h: h.key))
        table = self._recent.pop(hosts, None)
        if table is None:
            table = _maglev_table(hosts, self.table_size)
        self._recent[hosts] = table  # most recent last
        while len(self._recent) > _RECENT_TABLES:
            del self._recent[next(iter(self._recent))]
        self._table = table

    def _lookup(self, point: int, exclude: Collection[int]) -> int:
        table = self._table
        size = len(table)
        slot = point % size
        if exclude:
            for step in range(size):
                owner = table[(slot + step) % size]
                if owner not in exclude:
                    return owner
        return table[slot]

    def slot_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for owner in self._table:
            counts[owner] = counts.get(owner, 0) + 1
        return counts


def _maglev_table(hosts: Sequence[LbHost], size: int) -> list[int]:
    if not hosts:
        return []
    offsets: list[int] = []
    skips: list[int] = []
    for host in hosts:
        digest = hashlib.blake2b(host.key.encode(), digest_size=16).digest()
        offsets.append(int.from_bytes(digest[:8], "little") % size)
        skips.append(int.from_bytes(digest[8:], "little") % (size - 1) + 1)
    heaviest = max(h.weight for h in hosts)
    shares = [h.weight / heaviest for h in hosts]
    credits = [0.0] * len(hosts)
    tried = [0] * len(hosts)
    table = [-1] * size
    filled = 0
    while True:
        for i, host in enumerate(hosts):
            credits[i] += shares[i]
            if credits[i] < 1.0:
                continue
            credits[i] -= 1.0
            offset, skip, j = offsets[i], skips[i], tried[i]
            slot = (offset + j * skip) % size
            while table[slot] >= 0:
                j += 1
                slot = (offset + j * skip) % size
            tried[i] = j + 1
            table[slot] = host.index
            filled += 1
            if filled == size:
                return table
