"""Counts histograms with exact percentiles, in memory bounded by the range of values, not their number."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

QUANTILES = (0.5, 0.9, 0.99)


class LengthHistogram:
    """Counts of non-negative integers: exact below EXACT_LIMIT, 1%-wide log buckets above; exact min/mean/max."""

    EXACT_LIMIT = 1 << 20
    LOG_BASE = 1.01

    def __init__(self) -> None:
        self.counts = np.zeros(0, dtype=np.int64)
        self.big: Counter[int] = Counter()
        self.count = 0
        self.total = 0
        self.min: int | None = None
        self.max: int | None = None

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        values = values.astype(np.int64, copy=False)
        self.count += int(values.size)
        self.total += int(values.sum())
        lo, hi = int(values.min()), int(values.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        small = values[values < self.EXACT_LIMIT] if hi >= self.EXACT_LIMIT else values
        bc = np.bincount(small)
        if bc.size > self.counts.size:
            self.counts = np.concatenate([self.counts, np.zeros(bc.size - self.counts.size, dtype=np.int64)])
        self.counts[: bc.size] += bc
        if hi >= self.EXACT_LIMIT:
            buckets = np.floor(np.log(values[values >= self.EXACT_LIMIT]) / math.log(self.LOG_BASE)).astype(np.int64)
            keys, n = np.unique(buckets, return_counts=True)
            self.big.update(dict(zip(keys.tolist(), n.tolist(), strict=True)))

    def quantile(self, q: float) -> float | None:
        """Nearest rank: the smallest value v with at least q * count values <= v."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count - 1e-9))
        cum = np.cumsum(self.counts)
        if cum.size and cum[-1] >= rank:
            return float(np.searchsorted(cum, rank))
        seen = int(cum[-1]) if cum.size else 0
        for b in sorted(self.big):
            seen += self.big[b]
            if seen >= rank:
                return float(min(max(round(self.LOG_BASE**b), self.EXACT_LIMIT), self.max or 0))
        return float(self.max or 0)

    def summary(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {"count": self.count, "min": self.min}
        out["mean"] = round(self.total / self.count, 3) if self.count else None
        for q in QUANTILES:
            out[f"p{round(q * 100)}"] = self.quantile(q)
        out["max"] = self.max
        return out

    def bins(self, nbins: int = 80) -> tuple[np.ndarray, np.ndarray]:
        """(edges, counts) over [min, max] for plotting."""
        if self.count == 0:
            return np.array([0.0, 1.0]), np.zeros(1)
        hi = max(self.max or 0, 1)
        width = max(1, math.ceil((hi + 1) / nbins))
        edges = np.arange(0, hi + width + 1, width, dtype=np.float64)
        heights = np.add.reduceat(self.counts, np.arange(0, self.counts.size, width)).astype(np.float64)
        heights = np.pad(heights, (0, max(0, len(edges) - 1 - heights.size)))[: len(edges) - 1]
        for b, n in self.big.items():
            heights[min(len(heights) - 1, int(self.LOG_BASE**b // width))] += n
        return edges, heights
