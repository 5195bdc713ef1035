"""Trap ablation: a copy of W with the entries behind its correlation traps removed.

Why: the anti-grokking paper reads traps as a cause of the collapse, and WeightWatcher
users ask for `remove_traps`. Both need the same operation: take the entries a report row
names as behind the traps (`trap_entries`: the largest |w|, one per trap, in W's own
layout) and zero them, or clip them to the scale of the rest of the matrix. A claim that
traps matter is only tested against a control, so `ablate_random` zeroes the same number
of entries drawn at random (seeded) from the same matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

ABLATIONS = ("zero", "clip")


def trap_coordinates(row: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(row, col) of the entries behind `row`'s traps, in W's own layout."""
    return [(int(e["row"]), int(e["col"])) for e in row.get("trap_entries") or []]


def ablate_traps(matrix: np.ndarray, row: Mapping[str, Any], mode: str = "zero") -> np.ndarray:
    """A copy of `matrix` with its trap entries zeroed ("zero"), or each clipped to the
    largest |w| among the other entries, keeping its sign ("clip")."""
    if mode not in ABLATIONS:
        raise ValueError(f"mode must be one of {ABLATIONS}, got {mode!r}")
    out = np.array(matrix, copy=True)
    where = trap_coordinates(row)
    if not where:
        return out
    rows, cols = (np.array(axis) for axis in zip(*where, strict=True))
    if mode == "zero":
        out[rows, cols] = 0
        return out
    rest = np.abs(out)
    rest[rows, cols] = 0
    bound = rest.max()
    out[rows, cols] = np.clip(out[rows, cols], -bound, bound)
    return out


def ablate_random(matrix: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """The control: a copy of `matrix` with `count` entries, drawn uniformly without
    replacement, zeroed."""
    out = np.array(matrix, copy=True)
    flat = out.reshape(-1)
    flat[rng.choice(flat.size, size=min(count, flat.size), replace=False)] = 0
    return out
