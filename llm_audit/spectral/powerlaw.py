"""HTSR power-law fit of an ESD tail, vectorized over every xmin candidate.

Why its own module: it is the definition of `alpha`, and it must give WeightWatcher
0.7.7's answer (its `WWFit`, the default since 0.7) exactly, only faster. WeightWatcher
loops over every candidate xmin and recomputes a sum and a KS maximum each time (O(M^2)
Python-level work); here suffix sums give every alpha at once and the KS maxima are taken
in blocks of candidates, so the cost is a few vectorized passes over an M x M triangle.

Conventions copied from WeightWatcher, on purpose:
- eigenvalues <= 1e-5 (`EVALS_THRESH`) are dropped before the fit;
- a candidate with alpha <= 1 gets D = 1, and the first smallest D wins;
- fewer than 20 eigenvalues use its small-N fit (bias-corrected alpha, at least 8 in the
  tail; see `_fit_small_n` for how xmin is really chosen).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EVALS_THRESH = 1e-5
SMALL_N_CUTOFF = 20
SMALL_N_K_MIN = 8
_BLOCK_ELEMENTS = 1 << 21  # candidates x tail entries per KS block (16 MiB of float64)


@dataclass(frozen=True)
class PowerLawFit:
    """Result of the fit; `num_pl_spikes` counts the tail in the full ESD."""

    alpha: float
    xmin: float
    D: float
    sigma: float
    num_pl_spikes: int


def fit_powerlaw(evals: np.ndarray) -> PowerLawFit | None:
    """Fit alpha to the ESD tail as WeightWatcher does; None when under 2 usable values,
    or when no candidate tail has an alpha above 1 (WeightWatcher would report the first
    candidate's, even alpha = 1 + n / 0 or a negative one: a flat spectrum, e.g. an
    orthogonal matrix, whose equal eigenvalues differ only by rounding), where no power
    law is defined.

    `evals` are the eigenvalues of W^T W (any order). The fit uses those above 1e-5.
    """
    evals = np.asarray(evals, dtype=np.float64)
    data = np.sort(evals[evals > EVALS_THRESH])
    if data.size < 2:
        return None
    if data.size < SMALL_N_CUTOFF:
        alphas, ds, best = _fit_small_n(data)
    else:
        alphas, ds = _alphas_and_ks(data, bias_corrected=False)
        best = int(np.argmin(ds))
    n_tail = data.size - best
    alpha = float(alphas[best])
    if not 1.0 < alpha < np.inf:  # no candidate was valid (all D = 1)
        return None
    xmin = float(data[best])
    return PowerLawFit(
        alpha=alpha,
        xmin=xmin,
        D=float(ds[best]),
        sigma=float((alpha - 1.0) / np.sqrt(n_tail)),
        num_pl_spikes=int(np.count_nonzero(evals >= xmin)),
    )


def _alphas_and_ks(data: np.ndarray, *, bias_corrected: bool) -> tuple[np.ndarray, np.ndarray]:
    """alpha and KS distance for every xmin candidate data[i], i < len(data) - 1.

    Sorted `data`; alpha_i = 1 + n_i / sum_{j>=i} ln(x_j / x_i) with n_i = len - i
    (n_i - 1 in the numerator when bias corrected); D_i = max_k |F_fit - k / n_i|.
    """
    size = data.size
    logs = np.log(data)
    suffix = np.cumsum(logs[::-1])[::-1]  # suffix[i] = sum(logs[i:])
    n = (size - np.arange(size - 1)).astype(np.float64)
    s = suffix[:-1] - n * logs[:-1]
    numer = n - 1.0 if bias_corrected else n
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + numer / s
    ds = np.ones(size - 1)
    valid = np.flatnonzero((alphas > 1.0) & np.isfinite(alphas))
    block = max(1, _BLOCK_ELEMENTS // size)
    offsets = np.arange(size)
    for start in range(0, valid.size, block):
        idx = valid[start : start + block]
        # rows: candidates i; columns: data index j (only j >= i is the tail)
        rel = np.maximum(logs[None, :] - logs[idx, None], 0.0)
        k = offsets[None, :] - idx[:, None]
        fitted = 1.0 - np.exp((1.0 - alphas[idx, None]) * rel)
        gap = np.abs(fitted - k / n[idx, None])
        gap[k < 0] = 0.0
        ds[idx] = gap.max(axis=1)
    return alphas, ds


def _fit_small_n(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """WeightWatcher's small-N fit as it really runs.

    `WWFit.fit_powerlaw_smallN` picks xmin by D - 0.868/sqrt(n), but `WWFit.__init__` then
    re-picks by the smallest D over all candidates, so what users get is: bias-corrected
    alpha, D counted only for tails of at least 8 with alpha > 1, smallest D wins.
    """
    alphas, ds = _alphas_and_ks(data, bias_corrected=True)
    n = data.size - np.arange(data.size - 1)
    ds = np.where(n >= SMALL_N_K_MIN, ds, 1.0)
    return alphas, ds, int(np.argmin(ds))
