"""Endpoint choice. Pure: no sockets, no clock.

Smooth weighted round robin (as in nginx): every pick adds each host's weight to its current
score and takes the highest, then subtracts the total. Weights are honoured exactly over a cycle
and heavy hosts are interleaved with light ones rather than picked in bursts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence


class SmoothWeightedRoundRobin:
    def __init__(self, weights: Sequence[int]) -> None:
        self.weights = list(weights)
        self._current = [0] * len(self.weights)

    def pick(self, exclude: Collection[int] = ()) -> int | None:
        """Index of the next host, skipping ``exclude`` unless nothing else is left."""
        candidates = [i for i in range(len(self.weights)) if i not in exclude]
        if not candidates:
            candidates = list(range(len(self.weights)))
        if not candidates:
            return None
        total = 0
        best = candidates[0]
        current = self._current
        for i in candidates:
            current[i] += self.weights[i]
            total += self.weights[i]
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return best
