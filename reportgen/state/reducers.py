"""Mergeable streaming statistics: bounded memory however large the folder, and exact merges across shards.

Every reducer has `merge(other)`; merging the reducers of any split of the data equals one reducer fed everything.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, List, Tuple

import numpy as np


@dataclass
class BoundedTop:
    """The `capacity` items with the largest scores, ties broken by the smaller `order` key (e.g. file index),
    so the kept set does not depend on arrival order. Items are (score, order, payload)."""

    capacity: int
    heap: List[Tuple[float, int, Any]] = field(default_factory=list)  # min-heap on (score, -order)

    def accepts(self, score: float, order: int) -> bool:
        """Would an item with this score enter? (Lets callers skip building an expensive payload.)"""
        if self.capacity <= 0:
            return False
        if len(self.heap) < self.capacity:
            return True
        return (score, -order) > (self.heap[0][0], self.heap[0][1])

    def accepts_many(self, scores: np.ndarray, orders: np.ndarray) -> np.ndarray:
        """`accepts` of each (score, order) pair (arrays of one shape), judged against the items kept now."""
        scores, orders = np.asarray(scores, dtype=np.float64), np.asarray(orders, dtype=np.int64)
        if self.capacity <= 0:
            return np.zeros(scores.shape, dtype=bool)
        if len(self.heap) < self.capacity:
            return np.ones(scores.shape, dtype=bool)
        worst, worst_order = self.heap[0][0], -self.heap[0][1]
        return (scores > worst) | ((scores == worst) & (orders < worst_order))

    def push(self, score: float, order: int, payload: Any) -> None:
        if not self.accepts(score, order):
            return
        entry = (float(score), -int(order), _Payload(payload))
        if len(self.heap) < self.capacity:
            heapq.heappush(self.heap, entry)
        else:
            heapq.heapreplace(self.heap, entry)

    def merge(self, other: "BoundedTop") -> None:
        for score, neg_order, payload in other.heap:
            self.push(score, -neg_order, payload.value)

    def items(self) -> List[Tuple[float, int, Any]]:
        """(score, order, payload), best first."""
        ranked = sorted(self.heap, key=lambda e: (-e[0], -e[1]))
        return [(score, -neg_order, payload.value) for score, neg_order, payload in ranked]

    def __len__(self) -> int:
        return len(self.heap)


class _Payload:
    """Wraps a payload so heap comparisons never reach it (arrays do not compare)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __lt__(self, other: "_Payload") -> bool:
        return False


@dataclass
class FixedHistogram:
    """Counts over fixed bin edges; values outside go to the end bins, NaN is counted apart."""

    edges: np.ndarray
    counts: np.ndarray = None  # type: ignore[assignment]
    nan: int = 0

    def __post_init__(self) -> None:
        self.edges = np.asarray(self.edges, dtype=np.float64)
        if self.counts is None:
            self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(values)
        self.nan += int((~finite).sum())
        clipped = np.clip(values[finite], self.edges[0], self.edges[-1])
        bins = np.clip(np.searchsorted(self.edges, clipped, side="right") - 1, 0, len(self.counts) - 1)
        self.counts += np.bincount(bins, minlength=len(self.counts))

    def merge(self, other: "FixedHistogram") -> None:
        if not np.array_equal(self.edges, other.edges):
            raise ValueError("histograms with different bin edges cannot be merged")
        self.counts += other.counts
        self.nan += other.nan
