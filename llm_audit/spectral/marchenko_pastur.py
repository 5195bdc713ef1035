"""Marchenko-Pastur fit of an ESD: bulk edges, spikes and (on a shuffled matrix) traps.

Why its own module: `num_spikes` and the correlation-trap count `rand_num_spikes` are both
"eigenvalues beyond a fitted MP bulk edge", and that edge must be WeightWatcher 0.7.7's
(`mp_fit` / `fit_density_with_range` / `resid_mp`) for users to trust the counts:

1. rescale the eigenvalues so their mean is 1;
2. build a linear-kernel KDE (bandwidth 0.1) of the ESD on 1000 points in [0, max + 0.5]
   (of the square roots, against the quarter-circle law, when Q == 1);
3. scan sigma over [0.05, 2.0) x sigma0 in steps of 0.01 sigma0, sigma0 = sqrt(lambda_max) /
   (1 + 1/sqrt(Q)), minimizing the squared distance between the KDE and the MP density,
   then polish the best grid point with Nelder-Mead (`scipy.optimize.fmin`, as
   `scipy.optimize.brute` does by default);
4. bulk edge lambda+ = (sigma (1 + 1/sqrt(Q)))^2 plus a Tracy-Widom allowance sqrt(TW),
   TW = Q^-1/2 lambda+^(2/3) M^(-2/3); spikes are the eigenvalues above it.

WeightWatcher refits the KDE for each of the ~200 sigmas it tries, although the KDE does
not depend on sigma; here it is built once, and the whole sigma grid is scored as one
array operation. The Nelder-Mead polish then sees the same function values, so it takes
the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize

KDE_BANDWIDTH = 0.1
KDE_POINTS = 1000
DENSITY_FLOOR = 0.01  # WeightWatcher drops KDE points below this density before scoring
BAD_FIT_RESIDUAL = 1000.0


@dataclass(frozen=True)
class MPFit:
    """MP fit result; bulk edges in the caller's (unrescaled) eigenvalue units."""

    sigma_mp: float
    num_spikes: int
    mp_softrank: float
    bulk_max: float
    bulk_min: float
    edge_with_tw: float  # bulk_max + Tracy-Widom allowance, unrescaled: the spike cut


def linear_kde(samples: np.ndarray, grid: np.ndarray, bandwidth: float) -> np.ndarray:
    """Density of `samples` on `grid` with a linear (triangular) kernel.

    Equal to scikit-learn's `KernelDensity(kernel='linear')`, which WeightWatcher uses,
    computed exactly with sorted samples and prefix sums in O((n + g) log n).
    """
    x = np.sort(np.asarray(samples, dtype=np.float64))
    prefix = np.concatenate(([0.0], np.cumsum(x)))
    lo = np.searchsorted(x, grid - bandwidth, side="right")
    mid = np.searchsorted(x, grid, side="right")
    hi = np.searchsorted(x, grid + bandwidth, side="left")
    # sum over |g - x| < h of (1 - |g - x| / h), split at x <= g and x > g
    left_n, right_n = mid - lo, hi - mid
    left_sum = prefix[mid] - prefix[lo]
    right_sum = prefix[hi] - prefix[mid]
    total = (left_n + right_n) - (
        (grid * left_n - left_sum) + (right_sum - grid * right_n)
    ) / bandwidth
    return np.maximum(total, 0.0) / (x.size * bandwidth)


def _mp_density(x: np.ndarray, q: float, sigma: np.ndarray) -> np.ndarray:
    """MP density for each sigma (rows) at x (columns), zero outside the support."""
    sigma = sigma[:, None]
    y = 1.0 / q
    b = (sigma * (1.0 + np.sqrt(y))) ** 2
    a = (sigma * (1.0 - np.sqrt(y))) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        val = (1.0 / (2.0 * np.pi * sigma * sigma * x * y)) * np.sqrt((b - x) * (x - a))
    return np.nan_to_num(val)


def _quarter_circle(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """WeightWatcher's quarter-circle density (support fixed at [0, 2], scaled by sigma)."""
    with np.errstate(invalid="ignore"):
        val = (1.0 / (np.pi * sigma[:, None] ** 2)) * np.sqrt(4.0 - x[None, :] ** 2)
    return np.nan_to_num(val)


class _Residual:
    """Squared distance between the (fixed) KDE and the MP density, for many sigmas at once."""

    def __init__(self, to_fit: np.ndarray, q: float) -> None:
        xde = np.linspace(0.0, float(np.max(to_fit)) + 0.5, KDE_POINTS)
        yde = linear_kde(to_fit, xde, KDE_BANDWIDTH)
        keep = yde > DENSITY_FLOOR
        self.q = q
        self.x = xde[keep]
        self.y = yde[keep]
        self.peak_x = self.x[np.argmax(self.y)] if self.x.size else 0.0
        self.x_max = self.x.max() if self.x.size else 0.0

    def __call__(self, sigma: np.ndarray) -> np.ndarray:
        sigma = np.atleast_1d(np.asarray(sigma, dtype=np.float64)).ravel()
        if self.q == 1.0:
            return np.sum((_quarter_circle(self.x, sigma) - self.y) ** 2, axis=1)
        resid = np.sum((_mp_density(self.x, self.q, sigma) - self.y) ** 2, axis=1)
        y = 1.0 / self.q
        b = (sigma * (1.0 + np.sqrt(y))) ** 2
        a = (sigma * (1.0 - np.sqrt(y))) ** 2
        bad = (b < self.peak_x) | (b > self.x_max) | (a > self.peak_x)
        return np.where(bad, self.x.size * BAD_FIT_RESIDUAL**2, resid)


def fit_mp(evals: np.ndarray, n: int, m: int) -> MPFit:
    """Fit the MP law to `evals` (eigenvalues of an n x m matrix's Gram, n >= m).

    `evals` may pool several shuffles (more values than m); `m` enters only the
    Tracy-Widom allowance, as in WeightWatcher.
    """
    evals = np.asarray(evals, dtype=np.float64)
    q = n / m
    scale = evals.size / np.sum(evals)  # WeightWatcher's Wscale**2: mean eigenvalue -> 1
    rescaled = evals * scale
    lambda_max = float(np.max(rescaled))
    to_fit = np.sqrt(rescaled) if q == 1.0 else rescaled
    residual = _Residual(to_fit, q)

    sigma0 = np.sqrt(lambda_max) / (1.0 + 1.0 / np.sqrt(q))
    grid = np.mgrid[slice(0.05 * sigma0, 2.0 * sigma0, 0.01 * sigma0)]
    start = grid[np.argmin(residual(grid))]
    sigma = float(optimize.fmin(lambda s: float(residual(s)[0]), np.array([start]), disp=False)[0])

    bulk_max = (sigma * (1.0 + 1.0 / np.sqrt(q))) ** 2
    bulk_min = (sigma * (1.0 - 1.0 / np.sqrt(q))) ** 2
    tw = 1.0 / np.sqrt(q) * bulk_max ** (2.0 / 3.0) * m ** (-2.0 / 3.0)
    edge = bulk_max + np.sqrt(tw)
    return MPFit(
        sigma_mp=sigma,
        num_spikes=int(np.count_nonzero(rescaled > edge)),
        mp_softrank=bulk_max / lambda_max,
        bulk_max=bulk_max / scale,
        bulk_min=bulk_min / scale,
        edge_with_tw=edge / scale,
    )


def mp_edge_from_entries(
    top_evals: np.ndarray, top_squares: np.ndarray, total: float, n: int, m: int
) -> tuple[MPFit, np.ndarray]:
    """Bulk edge of a shuffled matrix from its top eigenvalues and its entries alone.

    Why: a shuffled matrix has exchangeable entries, so its bulk is MP with sigma^2 equal
    to the variance of the entries that are *not* behind an outlier, and each outlier is
    one large entry (shuffling scatters everything else). So: edge -> outliers above it
    -> drop that many largest squared entries (`top_squares`, descending) from the total
    -> new sigma^2 -> new edge, to a fixed point. It needs only the eigenvalues beyond the
    edge, which a top-k Lanczos solve provides. Returns the fit and the outliers (largest
    first). `total` is the sum of squared entries (= the trace of the Gram).
    """
    top = np.sort(np.asarray(top_evals, dtype=np.float64))[::-1]
    dropped = np.concatenate(([0.0], np.cumsum(top_squares)))
    q = n / m
    scale = m / total  # rescaling to mean eigenvalue 1, as in `fit_mp`
    rescaled = top * scale
    num_out = 0
    for _ in range(64):
        kept = min(num_out, dropped.size - 1)
        sigma2 = (total - dropped[kept]) / (n * m - kept) * n * scale
        bulk_max = sigma2 * (1.0 + 1.0 / np.sqrt(q)) ** 2
        tw = 1.0 / np.sqrt(q) * bulk_max ** (2.0 / 3.0) * m ** (-2.0 / 3.0)
        edge = bulk_max + np.sqrt(tw)
        new_out = int(np.count_nonzero(rescaled > edge))
        if new_out == num_out:
            break
        num_out = new_out
    sigma = float(np.sqrt(sigma2))
    fit = MPFit(
        sigma_mp=sigma,
        num_spikes=num_out,
        mp_softrank=bulk_max / float(rescaled[0]),
        bulk_max=bulk_max / scale,
        bulk_min=(sigma * (1.0 - 1.0 / np.sqrt(q))) ** 2 / scale,
        edge_with_tw=edge / scale,
    )
    return fit, top[:num_out]
