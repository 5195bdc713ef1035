"""Parity with WeightWatcher 0.7.7 on the issue's matrices, given the same eigenvalues.

WeightWatcher's fits are run on *our* eigenvalues (and on our shuffled matrix's
eigenvalues, i.e. the same permutation), so any difference is a difference in the
definitions, not in the SVD or the random draw. A last test runs WeightWatcher's own
`analyze` end to end on a small model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_audit import analyze_matrix
from llm_audit.spectral.marchenko_pastur import fit_mp
from llm_audit.spectral.powerlaw import fit_powerlaw
from llm_audit.spectral.shuffle import shuffle_generator, shuffled

from .conftest import quiet

RTOL = 1e-6
PL_COLUMNS = ("alpha", "xmin", "D", "sigma")
NORM_COLUMNS = ("lambda_max", "log_norm", "stable_rank", "alpha_weighted", "log_alpha_norm")


class _Layer:
    """The few attributes of a WWLayer that `apply_norm_metrics` reads."""

    def __init__(self, evals: np.ndarray, alpha: float, n: int) -> None:
        self.layer_id, self.plot_id, self.name = 0, 0, "parity"
        self.evals, self.alpha, self.N = evals, alpha, n
        self.columns: dict[str, float] = {}

    def add_column(self, name: str, value: float) -> None:
        self.columns[name] = value


def _ww_mp(watcher, evals: np.ndarray, n: int, m: int) -> dict[str, float]:
    with quiet():
        spikes, sigma_mp, softrank, bulk_min, bulk_max, _ = watcher.mp_fit(
            evals, n, m, 1, "", 0, 0, False, False, "", "b", 0.5, True, evals
        )
    return {
        "num_spikes": spikes,
        "sigma_mp": sigma_mp,
        "mp_softrank": softrank,
        "bulk_min": bulk_min,
        "bulk_max": bulk_max,
    }


@pytest.fixture(scope="module")
def analyzed(parity_cases):
    return {
        c.name: analyze_matrix(c.matrix, matrix_id=c.name, seed=7, keep_spectra=True)
        for c in parity_cases
    }


def test_gram_eigenvalues_match_float64_svd(parity_cases, analyzed):
    for case in parity_cases:
        ours = analyzed[case.name]["evals"]
        err = np.abs(ours - case.evals) / case.evals[-1]
        assert err.max() < 1e-12, case.name


def test_powerlaw_and_norm_columns_match(watcher, parity_cases, analyzed):
    for case in parity_cases:
        row = analyzed[case.name]
        evals = row["evals"]
        with quiet():
            alpha, _, xmin, _, d, sigma, num_pl, *_, warning = watcher.fit_powerlaw(
                evals, plot=False
            )
        ref = {"alpha": alpha, "xmin": xmin, "D": d, "sigma": sigma}
        for col in PL_COLUMNS:
            assert row[col] == pytest.approx(ref[col], rel=RTOL), (case.name, col)
        assert row["num_pl_spikes"] == num_pl, case.name
        assert row["warning"] == warning, case.name
        layer = _Layer(evals, alpha, row["N"])
        watcher.apply_norm_metrics(layer)
        ref_norm = dict(layer.columns, lambda_max=float(np.max(evals)))
        for col in NORM_COLUMNS:
            assert row[col] == pytest.approx(ref_norm[col], rel=RTOL), (case.name, col)
        assert row["norm"] == pytest.approx(ref_norm["norm"], rel=RTOL)
        assert row["log_spectral_norm"] == pytest.approx(ref_norm["log_spectral_norm"], rel=RTOL)


def test_mp_fit_columns_match(watcher, parity_cases, analyzed):
    for case in parity_cases:
        row = analyzed[case.name]
        ref = _ww_mp(watcher, row["evals"], row["N"], row["M"])
        assert row["num_spikes"] == ref["num_spikes"], case.name
        for col in ("sigma_mp", "mp_softrank", "bulk_max", "bulk_min"):
            assert row[col] == pytest.approx(ref[col], rel=RTOL, abs=1e-12), (case.name, col)


def test_traps_match_on_the_same_permutation(watcher, parity_cases, analyzed):
    for case in parity_cases:
        row = analyzed[case.name]
        ref = _ww_mp(watcher, row["rand_evals"], row["N"], row["M"])
        assert row["rand_num_spikes"] == ref["num_spikes"], case.name
        assert row["rand_sigma_mp"] == pytest.approx(ref["sigma_mp"], rel=RTOL)
        assert row["rand_bulk_max"] == pytest.approx(ref["bulk_max"], rel=RTOL)
        assert row["rand_mp_softrank"] == pytest.approx(ref["mp_softrank"], rel=RTOL)


def _planted_spread_after_shuffle(matrix: np.ndarray, matrix_id: str) -> bool:
    """True when the shuffle put no two planted entries in one row or column.

    Two planted entries that share a row or column make one rank-one trap, not two, so
    "at least 20" is only unambiguous for a shuffle that spreads them; seed 7 does.
    """
    shuf = shuffled(matrix, shuffle_generator(7, matrix_id))
    rows, cols = np.nonzero(np.abs(shuf) == 60.0)
    return rows.size == 20 and len(set(rows)) == 20 and len(set(cols)) == 20


def test_trap_counts_where_the_answer_is_unambiguous(parity_cases, analyzed):
    for case in parity_cases:
        traps = analyzed[case.name]["rand_num_spikes"]
        if case.traps == "at_least_20":
            assert _planted_spread_after_shuffle(case.matrix, case.name)
        if case.traps == "zero":
            assert traps == 0, case.name
        elif case.traps == "some":
            assert traps > 0, case.name
        elif case.traps == "at_least_20":
            assert traps >= 20, case.name


def test_small_n_fit_matches_weightwatcher(watcher):
    """Fewer than 20 eigenvalues take WeightWatcher's small-N (bias-corrected) path."""
    rng = np.random.default_rng(3)
    for seed in range(5):
        evals = np.sort(np.linalg.svd(rng.standard_normal((50 + seed, 12)), compute_uv=False) ** 2)
        with quiet():
            alpha, _, xmin, _, d, sigma, num_pl, *_ = watcher.fit_powerlaw(evals, plot=False)
        fit = fit_powerlaw(evals)
        assert fit.alpha == pytest.approx(alpha, rel=RTOL)
        assert (fit.xmin, fit.num_pl_spikes) == (xmin, num_pl)
        assert fit.D == pytest.approx(d, rel=RTOL)
        assert fit.sigma == pytest.approx(sigma, rel=RTOL)


def test_end_to_end_against_weightwatcher_analyze(watcher):
    """WeightWatcher's own SVD and pipeline on a small model: same columns, same traps."""
    import weightwatcher as ww

    rng = np.random.default_rng(11)
    clean = rng.standard_normal((400, 300)).astype(np.float32)
    trapped = rng.standard_normal((400, 300)).astype(np.float32)
    trapped.ravel()[rng.choice(trapped.size, 6, replace=False)] = 50.0
    model = torch.nn.Sequential(torch.nn.Linear(300, 400), torch.nn.Linear(300, 400))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(clean))
        model[1].weight.copy_(torch.from_numpy(trapped))
    np.random.seed(0)
    with quiet():
        details = ww.WeightWatcher(model=model).analyze(randomize=True, mp_fit=True)
    assert len(details) == 2
    for (_, ref), matrix, traps in zip(details.iterrows(), (clean, trapped), (0, 6), strict=True):
        row = analyze_matrix(matrix, matrix_id=str(traps))
        for col in (*PL_COLUMNS, *NORM_COLUMNS, "sigma_mp"):
            assert row[col] == pytest.approx(ref[col], rel=RTOL), col
        for col in ("num_pl_spikes", "num_spikes", "num_evals", "N", "M"):
            assert row[col] == ref[col], col
        assert row["rand_num_spikes"] == ref["rand_num_spikes"] == traps


def test_shuffled_spectrum_is_exact_enough(parity_cases, analyzed):
    """The shuffled ESD's float32 Gram and eigensolve: within 3e-5 lambda_max of a float64
    SVD of the same shuffle(s) (1e-5 seen), and the same trap count and edge from it."""
    for case in parity_cases:
        row = analyzed[case.name]
        rng = shuffle_generator(7, case.name)
        replicas = 5 if row["M"] < 100 else 1
        ref = np.sort(
            np.concatenate(
                [
                    np.linalg.svd(shuffled(case.matrix, rng).astype(np.float64), compute_uv=False)
                    ** 2
                    for _ in range(replicas)
                ]
            )
        )
        assert np.max(np.abs(row["rand_evals"] - ref)) / ref[-1] < 3e-5, case.name
        ref_fit = fit_mp(ref, row["N"], row["M"])
        assert row["rand_num_spikes"] == ref_fit.num_spikes, case.name
        assert row["rand_bulk_max"] == pytest.approx(ref_fit.bulk_max, rel=1e-4), case.name
