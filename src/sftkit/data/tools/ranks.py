"""Order statistics of a stream of per-example figures, for `sftkit data inspect`: percentiles of the
lengths, and the few worst examples of each kind without keeping every example.

    percentiles([1, 2, 3, 100])          # {'p50': 3, 'p90': 100, 'p95': 100, 'p99': 100, 'max': 100}
    longest = Worst(); longest.add(n_tokens, offender); longest.items()   # the 5 longest, longest first
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

import numpy as np

WORST = 5  # offenders listed of each kind
PERCENTILES = (50, 90, 95, 99)


def percentiles(values: Iterable[int]) -> dict[str, int]:
    """p50/p90/p95/p99 (nearest rank: each is a real example's value) and max; {} when empty."""
    array = np.fromiter(values, dtype=np.int64)
    if not array.size:
        return {}
    stats = {f"p{q}": int(np.percentile(array, q, method="nearest")) for q in PERCENTILES}
    return stats | {"max": int(array.max())}


class Worst:
    """The `WORST` items of largest (or smallest) key as they stream past, ties to the earliest: what
    `heapq.nlargest` / `nsmallest` give over the whole list, holding 5 items instead of every row's."""

    def __init__(self, largest: bool = True) -> None:
        self._heap: list[tuple[float, int, Any]] = []  # (signed key, -arrival, item): the root goes first
        self._sign, self._arrived = 1 if largest else -1, 0

    def add(self, key: float, item: Any, order: int | None = None) -> None:
        entry = (self._sign * key, -(self._arrived if order is None else order), item)
        self._arrived += 1
        if len(self._heap) < WORST:
            heapq.heappush(self._heap, entry)
        elif entry[:2] > self._heap[0][:2]:
            heapq.heapreplace(self._heap, entry)

    def items(self, *others: Worst) -> list[Any]:
        """The worst, best first; with `others` (added with a shared `order`), of all together."""
        entries = sorted((e for w in (self, *others) for e in w._heap), key=lambda e: e[:2], reverse=True)
        return [item for *_, item in entries[:WORST]]
