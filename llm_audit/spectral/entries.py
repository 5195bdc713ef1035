"""Statistics of a matrix's entries, beside its spectrum: kurtosis, max |w|, largest entries.

Why: a correlation trap is an outlier eigenvalue of the *shuffled* matrix, and what makes
one is a few entries far larger than the rest; heavy-tailed entries (large kurtosis) make
them with no correlation at all. So each row carries the entry kurtosis, the largest |w|,
and the largest entries themselves (row, column, value) to explain its traps. In memory
they come from the matrix at once; for a matrix streamed in row chunks (the 201088-row
embedding) `EntryAccumulator` merges per-chunk moments exactly (Chan/Pebay updates) and
keeps the running top entries, so both paths give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_TRAP_ENTRIES = 64


@dataclass(frozen=True)
class EntrySummary:
    """Entry columns of a row, and the `count` largest-|w| entries on demand."""

    kurtosis: float
    max_abs: float
    top: Callable[[int], list[dict[str, Any]]]

    def columns(self) -> dict[str, float]:
        return {"entry_kurtosis": self.kurtosis, "max_abs_entry": self.max_abs}


def _largest_abs_index(matrix: np.ndarray, count: int) -> np.ndarray:
    """Flat indices of the `count` largest |w|: |w| descending, then row, then column.

    A total order, so equal entries come out the same on every CPU (argpartition's tie
    order depends on its SIMD path) and in the streamed route (`EntryAccumulator`).
    """
    flat = np.abs(matrix.ravel())
    cut = flat[np.argpartition(flat, flat.size - count)[flat.size - count]]
    above = np.flatnonzero(flat > cut)  # ascending flat index = row, then column
    ties = np.flatnonzero(flat == cut)[: count - above.size]
    top = np.concatenate([above, ties])
    return top[np.lexsort((top, -flat[top]))]


def largest_abs(matrix: np.ndarray, count: int) -> np.ndarray:
    """The `count` largest |w| as float64, largest first."""
    return np.abs(matrix.ravel()[_largest_abs_index(matrix, count)].astype(np.float64))


def _entries(matrix: np.ndarray, count: int, row_offset: int = 0) -> list[dict[str, Any]]:
    count = min(count, MAX_TRAP_ENTRIES, matrix.size)
    if count <= 0:
        return []
    rows, cols = np.unravel_index(_largest_abs_index(matrix, count), matrix.shape)
    return [
        {"row": int(r) + row_offset, "col": int(c), "value": float(matrix[r, c])}
        for r, c in zip(rows, cols, strict=True)
    ]


def _rank(entry: dict[str, Any]) -> tuple[float, int, int]:
    """The order of `_largest_abs_index`: |w| descending, then row, then column."""
    return (-abs(entry["value"]), entry["row"], entry["col"])


def _moments(flat: np.ndarray) -> tuple[int, float, float, float, float]:
    """(n, mean, M2, M3, M4): sums of centred powers, in float64."""
    mean = float(flat.mean(dtype=np.float64))
    centered = flat.astype(np.float64) - mean
    squared = centered * centered  # not centered**4: numpy's general pow is 10x slower
    return (
        flat.size,
        mean,
        float(squared.sum()),
        float(np.dot(squared, centered)),
        float(np.dot(squared, squared)),
    )


def _kurtosis(n: int, m2: float, m4: float) -> float:
    return n * m4 / (m2 * m2) - 3.0 if m2 > 0 else 0.0


def summarize(matrix: np.ndarray) -> EntrySummary:
    """Entry statistics of an in-memory matrix; the top entries are found only if asked."""
    n, _, m2, _, m4 = _moments(matrix.ravel())
    max_abs = float(np.abs(matrix).max())
    return EntrySummary(_kurtosis(n, m2, m4), max_abs, lambda count: _entries(matrix, count))


class EntryAccumulator:
    """The same statistics over row chunks of one matrix, in order, in O(chunk) memory."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.m3, self.m4 = 0, 0.0, 0.0, 0.0, 0.0
        self.rows_seen = 0
        self.top: list[dict[str, Any]] = []

    def add(self, chunk: np.ndarray) -> None:
        nb, mean_b, m2b, m3b, m4b = _moments(chunk.ravel())
        na, n = self.n, self.n + nb
        delta = mean_b - self.mean
        m4 = (
            self.m4
            + m4b
            + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
            + 6 * delta**2 * (na * na * m2b + nb * nb * self.m2) / n**2
            + 4 * delta * (na * m3b - nb * self.m3) / n
        )
        m3 = (
            self.m3
            + m3b
            + delta**3 * na * nb * (na - nb) / n**2
            + 3 * delta * (na * m2b - nb * self.m2) / n
        )
        self.m2 += m2b + delta**2 * na * nb / n
        self.m3, self.m4, self.mean, self.n = m3, m4, self.mean + delta * nb / n, n
        merged = self.top + _entries(chunk, MAX_TRAP_ENTRIES, self.rows_seen)
        self.top = sorted(merged, key=_rank)[:MAX_TRAP_ENTRIES]
        self.rows_seen += chunk.shape[0]

    def summary(self) -> EntrySummary:
        top = list(self.top)
        max_abs = abs(top[0]["value"]) if top else 0.0
        return EntrySummary(_kurtosis(self.n, self.m2, self.m4), max_abs, lambda c: top[:c])
