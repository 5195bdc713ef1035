"""The vectorized power-law fit against a plain loop and against the `powerlaw` package."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from llm_audit.spectral.powerlaw import fit_powerlaw


def _loop_fit(evals: np.ndarray) -> tuple[float, float, float]:
    """The definition in shared/reference/htsr-metrics.md, one xmin at a time."""
    data = np.sort(evals[evals > 1e-5])
    best = (np.inf, 0.0, 0.0)
    for i in range(data.size - 1):
        tail = data[i:]
        n = tail.size
        alpha = 1 + n / np.sum(np.log(tail / data[i]))
        if alpha <= 1:
            continue
        d = np.max(np.abs(1 - (tail / data[i]) ** (1 - alpha) - np.arange(n) / n))
        if d < best[0]:
            best = (d, alpha, data[i])
    return best[1], best[2], best[0]


def _samples() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t_evals = np.linalg.svd(rng.standard_t(3, (600, 300)), compute_uv=False) ** 2
    g_evals = np.linalg.svd(rng.standard_normal((400, 200)), compute_uv=False) ** 2
    return [rng.pareto(1.5, 400) + 1.0, t_evals, g_evals]


@pytest.mark.parametrize("data", _samples(), ids=["pareto", "student_t_esd", "gaussian_esd"])
def test_matches_the_loop_definition(data):
    alpha, xmin, d = _loop_fit(data)
    fit = fit_powerlaw(data)
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)
    assert fit.xmin == xmin
    assert fit.D == pytest.approx(d, rel=1e-9)


@pytest.mark.parametrize("data", _samples(), ids=["pareto", "student_t_esd", "gaussian_esd"])
def test_matches_powerlaw_package_with_matching_settings(data):
    import powerlaw

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = powerlaw.Fit(
            data, discrete=False, verbose=False, parameter_ranges={"alpha": [1, None]}
        )
    fit = fit_powerlaw(data)
    assert fit.alpha == pytest.approx(ref.power_law.alpha, rel=1e-9)
    assert fit.xmin == pytest.approx(ref.xmin, rel=1e-12)
    assert fit.D == pytest.approx(ref.power_law.D, rel=1e-9)
    assert fit.sigma == pytest.approx(ref.power_law.sigma, rel=1e-9)


def test_recovers_a_known_exponent():
    rng = np.random.default_rng(1)
    data = (rng.pareto(1.0, 20000) + 1.0) * 3.0  # density exponent alpha = 2
    assert fit_powerlaw(data).alpha == pytest.approx(2.0, abs=0.05)


def test_too_few_values_give_no_fit():
    assert fit_powerlaw(np.array([1.0])) is None
    assert fit_powerlaw(np.array([1e-9, 2e-9, 3.0])) is None  # two dropped by the 1e-5 cut
