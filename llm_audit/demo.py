"""Deterministic demo matrices with known answers, audited by `llm-audit demo`.

Why: until the checkpoint pipeline exists, `make demo` must still show the main signal on
something whose truth is known: planted large entries must come back as correlation traps
(and as the trap entries, at their planted positions), while a clean random matrix, a
low-rank signal and a power-law spectrum must show none.
"""

from __future__ import annotations

import numpy as np

DEMO_SEED = 20260101


def demo_matrices(seed: int = DEMO_SEED) -> dict[str, np.ndarray]:
    """Named float32 matrices, the same on every machine for a given seed."""
    rng = np.random.default_rng(seed)
    n, m = 1024, 512
    gaussian = rng.standard_normal((n, m)).astype(np.float32)

    planted = rng.standard_normal((n, m)).astype(np.float32)
    where = rng.choice(planted.size, size=5, replace=False)
    planted.ravel()[where] = rng.choice([-1.0, 1.0], size=5) * 80.0

    u = rng.standard_normal((n, 4))
    v = rng.standard_normal((4, m))
    low_rank = (rng.standard_normal((n, m)) + 0.15 * u @ v).astype(np.float32)

    left, _ = np.linalg.qr(rng.standard_normal((n, m)))
    right, _ = np.linalg.qr(rng.standard_normal((m, m)))
    power_law = ((left * np.arange(1, m + 1) ** -0.75) @ right.T).astype(np.float32)

    heavy = rng.standard_t(2.5, size=(n, m)).astype(np.float32)
    broken = gaussian.copy()
    broken[3, 7] = np.nan
    return {
        "gaussian": gaussian,
        "planted_5_traps": planted,
        "low_rank_signal": low_rank,
        "power_law_spectrum": power_law,
        "student_t_entries": heavy,
        "has_nan": broken,
    }
