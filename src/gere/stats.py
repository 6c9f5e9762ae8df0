"""Per-dimension running statistics of activation states, in float64.

Uses Chan et al.'s parallel merge of (count, mean, M2): each block of rows is reduced exactly in float64
and merged into the running totals, so variance survives activations with a large mean (the naive
E[x^2] - E[x]^2 in float32 loses it entirely). The same merge combines statistics from several processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunningStats:
    """Streaming mean / variance per dimension. ``update`` takes ``[rows, dim]`` arrays."""

    dim: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.dim, dtype=np.float64)
        if self.m2 is None:
            self.m2 = np.zeros(self.dim, dtype=np.float64)

    def update(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.dim)
        n = rows.shape[0]
        if n == 0:
            return
        block_mean = rows.mean(axis=0)
        block_m2 = np.square(rows - block_mean).sum(axis=0)
        self.merge(RunningStats(self.dim, n, block_mean, block_m2))

    def merge(self, other: RunningStats) -> None:
        """Chan's parallel update: combine two disjoint sets' (count, mean, M2) exactly."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean.copy(), other.m2.copy()
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + np.square(delta) * (self.count * other.count / total)
        self.count = total

    @property
    def var(self) -> np.ndarray:
        """Population variance (divides by the count, as the paper's statistics do)."""
        if self.count == 0:
            return np.zeros(self.dim, dtype=np.float64)
        return np.maximum(self.m2 / self.count, 0.0)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)


def thresholds(mean, std, k: float = 1.0):
    """Per-dimension bands (low, high) = mean -/+ k*std (GeRe, Sec. 3.2). Works on numpy arrays and on
    torch tensors alike; every threshold in the package comes from here."""
    return mean - k * std, mean + k * std


# Rows reduced at a time by `batch_statistics`; fixed, so the result does not depend on who computes it.
_ROWS_PER_CHUNK = 16384


def batch_statistics(rows: np.ndarray, dim: int) -> RunningStats:
    """float64 (count, mean, M2) of one batch's ``[rows, dim]``, reduced in fixed chunks, so any process
    computing the same batch gets the same bits."""
    stats = RunningStats(dim)
    for start in range(0, len(rows), _ROWS_PER_CHUNK):
        stats.update(rows[start : start + _ROWS_PER_CHUNK])
    return stats
