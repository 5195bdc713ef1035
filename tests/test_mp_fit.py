"""MP fit: the KDE against scikit-learn's, bulk edges against the closed form, traps
against the rank-one perturbation formula."""

from __future__ import annotations

import numpy as np
import pytest

from llm_audit import analyze_matrix
from llm_audit.spectral.marchenko_pastur import fit_mp, linear_kde, mp_edge_from_entries


def test_linear_kde_equals_scikit_learn():
    from sklearn.neighbors import KernelDensity

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.gamma(2.0, 1.0, 700), [25.0, 40.0]])
    grid = np.linspace(0, x.max() + 0.5, 1000)
    ref = np.exp(
        KernelDensity(kernel="linear", bandwidth=0.1).fit(x[:, None]).score_samples(grid[:, None])
    )
    assert np.allclose(linear_kde(x, grid, 0.1), ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(3000, 1000), (2000, 2000), (4000, 500)])
def test_bulk_edges_of_gaussian_matrices_match_closed_form(shape):
    rng = np.random.default_rng(sum(shape))
    n, m = shape
    w = rng.standard_normal(shape)
    evals = np.sort(np.linalg.eigvalsh(w.T @ w))
    fit = fit_mp(evals, n, m)
    # entries of variance 1: lambda+- = n (1 +- sqrt(m/n))^2 in unrescaled units
    assert fit.bulk_max == pytest.approx(n * (1 + np.sqrt(m / n)) ** 2, rel=0.02)
    if n != m:
        assert fit.bulk_min == pytest.approx(n * (1 - np.sqrt(m / n)) ** 2, rel=0.02)
    assert fit.sigma_mp == pytest.approx(1.0, abs=0.02)
    assert fit.num_spikes == 0


def _one_trap_prediction(n: int, m: int, a: float) -> float:
    """Outlier eigenvalue of an n x m unit-variance matrix plus one entry of size a.

    Rank-one BBP result (Benaych-Georges & Nadakuditi): lambda = (n + a^2)(m + a^2) / a^2,
    valid for a^2 > sqrt(n m); shuffling only moves the entry, so it holds for the traps.
    """
    return (n + a * a) * (m + a * a) / (a * a)


@pytest.mark.parametrize("a", [50.0, 80.0])
def test_one_planted_entry_gives_exactly_one_trap_at_the_predicted_eigenvalue(a):
    rng = np.random.default_rng(int(a))
    n, m = 1024, 512
    w = rng.standard_normal((n, m)).astype(np.float32)
    w[100, 200] = a
    row = analyze_matrix(w, matrix_id="planted", seed=1)
    assert row["rand_num_spikes"] == 1
    assert row["trap_evals"][0] == pytest.approx(_one_trap_prediction(n, m, a), rel=0.03)
    assert row["trap_entries"] == [{"row": 100, "col": 200, "value": a}]


def test_a_clean_matrix_has_no_trap_at_any_seed():
    w = np.random.default_rng(5).standard_normal((1024, 512)).astype(np.float32)
    for seed in range(3):
        assert analyze_matrix(w, seed=seed)["rand_num_spikes"] == 0


def test_entry_based_edge_is_the_closed_form_and_ignores_planted_entries():
    rng = np.random.default_rng(2)
    n, m = 2000, 1000
    w = rng.standard_normal((n, m))
    w.ravel()[rng.choice(w.size, 4, replace=False)] = 90.0
    evals = np.linalg.eigvalsh(w.T @ w)
    squares = np.sort(w.ravel() ** 2)[::-1][:64]
    fit, outliers = mp_edge_from_entries(evals[-16:], squares, evals.sum(), n, m)
    assert outliers.size == 4
    assert fit.bulk_max == pytest.approx(n * (1 + np.sqrt(m / n)) ** 2, rel=0.01)
