"""Seeded element shuffles: the randomized copy of W whose outlier eigenvalues are traps.

Why seeded per matrix: WeightWatcher shuffles with numpy's global, unseeded generator, so
two runs disagree on the trap count of a borderline matrix. Here each matrix gets its own
generator from (run seed, matrix id), so a report is reproducible whatever order, worker
or node computed it. The permutation is always drawn on the host with numpy's PCG64, so
CPU and GPU backends shuffle identically.
"""

from __future__ import annotations

import hashlib

import numpy as np


def shuffle_generator(seed: int, matrix_id: str) -> np.random.Generator:
    """Generator for one matrix's shuffles, fixed by the run seed and the matrix id."""
    digest = hashlib.blake2b(matrix_id.encode("utf-8"), digest_size=8).digest()
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int.from_bytes(digest, "little")]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def shuffled(matrix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of `matrix` with all its entries uniformly permuted (same shape)."""
    return rng.permutation(matrix.ravel()).reshape(matrix.shape)
