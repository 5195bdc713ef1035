"""analyze_matrix: routes, backends, seeds, batches and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_audit import COLUMN_NAMES, analyze_batch, analyze_matrix
from llm_audit.errors import AuditError, BackendError
from llm_audit.spectral.backends import NumpyBackend, TorchBackend, select_backend


def _wide_range_matrix() -> np.ndarray:
    """2048 x 1024 with singular values spanning 1e4 (eigenvalues spanning 1e8)."""
    rng = np.random.default_rng(4)
    left, _ = np.linalg.qr(rng.standard_normal((2048, 1024)))
    right, _ = np.linalg.qr(rng.standard_normal((1024, 1024)))
    return ((left * np.logspace(2, -2, 1024)) @ right.T).astype(np.float32)


def _svd64(w: np.ndarray) -> np.ndarray:
    return np.sort(np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2)


@pytest.mark.parametrize("backend", [NumpyBackend(), TorchBackend("cpu")], ids=["numpy", "torch"])
def test_route_accuracy_against_float64_svd(backend):
    """Float64 Gram + eigvalsh: every eigenvalue to 1e-9 of lambda_max, and those above
    1e-6 lambda_max to 1e-4 relative; singular values squared: 1e-10 relative."""
    w = _wide_range_matrix()
    ref = _svd64(w)
    gram = backend.esd(w[None])[0]
    assert np.max(np.abs(gram - ref)) / ref[-1] < 1e-9
    big = ref > 1e-6 * ref[-1]
    assert np.max(np.abs(gram[big] - ref[big]) / ref[big]) < 1e-4
    svd = backend.svd_esd(w[None])[0]
    assert np.max(np.abs(svd - ref) / ref) < 1e-10


def test_a_float32_gram_would_not_be_accurate_enough():
    """Why we upcast first: a float32 Gram loses the small end of a wide spectrum."""
    w = _wide_range_matrix()
    ref = _svd64(w)
    f32 = np.sort(np.linalg.eigvalsh(w.T @ w).astype(np.float64))
    assert np.mean(np.abs(f32 - ref) / ref > 0.01) > 0.05


def test_columns_and_types():
    w = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
    row = analyze_matrix(w, matrix_id="x", seed=3)
    assert tuple(row) == COLUMN_NAMES
    assert row["status"] == "ok" and row["reason"] == ""
    assert (row["N"], row["M"], row["Q"], row["num_evals"]) == (300, 200, 1.5, 200)
    assert row["seed"] == 3 and row["matrix_id"] == "x"
    nulls = [k for k, v in row.items() if v is None]
    assert nulls == []
    assert row["norm"] == pytest.approx(float(np.sum(w.astype(np.float64) ** 2)), rel=1e-9)


def test_transposed_matrix_gives_the_same_metrics():
    w = np.random.default_rng(1).standard_normal((200, 500)).astype(np.float32)
    a = analyze_matrix(w, matrix_id="m")
    b = analyze_matrix(np.ascontiguousarray(w.T), matrix_id="m")
    assert (a["N"], a["M"]) == (500, 200)
    for col in ("alpha", "lambda_max", "sigma_mp", "num_spikes"):
        assert a[col] == pytest.approx(b[col], rel=1e-9)


def test_seeds_are_per_matrix_and_reproducible():
    w = np.random.default_rng(2).standard_t(3, (400, 300)).astype(np.float32)
    a = analyze_matrix(w, seed=5, matrix_id="layer.0", keep_spectra=True)
    b = analyze_matrix(w, seed=5, matrix_id="layer.0", keep_spectra=True)
    c = analyze_matrix(w, seed=5, matrix_id="layer.1", keep_spectra=True)
    d = analyze_matrix(w, seed=6, matrix_id="layer.0", keep_spectra=True)
    assert np.array_equal(a["rand_evals"], b["rand_evals"])
    assert a["rand_num_spikes"] == b["rand_num_spikes"]
    assert not np.array_equal(a["rand_evals"], c["rand_evals"])
    assert not np.array_equal(a["rand_evals"], d["rand_evals"])


def test_batch_equals_one_at_a_time_and_keeps_order():
    rng = np.random.default_rng(3)
    mats = [rng.standard_normal((256, 128)).astype(np.float32) for _ in range(3)]
    mats.insert(1, rng.standard_normal((128, 64)).astype(np.float32))
    ids = [f"e{i}" for i in range(4)]
    batched = analyze_batch(mats, matrix_ids=ids, seed=9, batch_size=4)
    for matrix, matrix_id, row in zip(mats, ids, batched, strict=True):
        single = analyze_matrix(matrix, matrix_id=matrix_id, seed=9)
        assert row["matrix_id"] == matrix_id
        for col in ("alpha", "lambda_max", "rand_num_spikes", "rand_bulk_max", "max_rand_eval"):
            assert row[col] == pytest.approx(single[col], rel=1e-9), col


def test_torch_inputs_of_any_float_dtype():
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(0))
    ref = analyze_matrix(w.to(torch.bfloat16).float(), matrix_id="t")
    for dtype in (torch.bfloat16, torch.float16):
        row = analyze_matrix(w.to(dtype), matrix_id="t")
        assert row["status"] == "ok"
        assert row["alpha"] == pytest.approx(
            ref["alpha"], rel=1e-2 if dtype == torch.float16 else 1e-9
        )
    assert analyze_matrix(w.double(), matrix_id="t")["status"] == "ok"
    assert analyze_matrix(w.numpy().astype(np.float16))["status"] == "ok"


def test_torch_backend_agrees_with_numpy():
    w = np.random.default_rng(6).standard_normal((512, 256)).astype(np.float32)
    a = analyze_matrix(w, backend="numpy", matrix_id="b")
    b = analyze_matrix(w, backend="torch", matrix_id="b")
    assert b["backend"] == "torch"
    for col in ("alpha", "xmin", "sigma_mp"):
        assert a[col] == pytest.approx(b[col], rel=1e-8), col
    for col in ("rand_bulk_max", "max_rand_eval"):  # float32 eigensolve of the shuffle
        assert a[col] == pytest.approx(b[col], rel=1e-5), col
    assert a["rand_num_spikes"] == b["rand_num_spikes"]


def test_backend_selection(monkeypatch):
    assert select_backend("numpy").name == "numpy"
    monkeypatch.setenv("LLM_AUDIT_BACKEND", "torch")
    assert select_backend().name == "torch"
    if not torch.cuda.is_available():
        monkeypatch.delenv("LLM_AUDIT_BACKEND")
        assert select_backend().name in ("numpy", "cupy")
        with pytest.raises(BackendError, match="no CUDA"):
            select_backend("cuda")
    with pytest.raises(BackendError, match="unknown backend"):
        select_backend("tpu")


def test_topk_route_reproduces_the_full_route_on_clear_cases():
    rng = np.random.default_rng(8)
    clean = rng.standard_normal((1024, 512)).astype(np.float32)
    planted = clean.copy()
    planted.ravel()[rng.choice(planted.size, 12, replace=False)] = 60.0
    for w, traps in ((clean, 0), (planted, 12)):
        full = analyze_matrix(w, matrix_id="k")
        topk = analyze_matrix(w, matrix_id="k", rand_route="topk")
        # two planted entries shuffled into one row or column make one trap, not two
        assert full["rand_num_spikes"] == topk["rand_num_spikes"]
        assert traps - 2 <= full["rand_num_spikes"] <= traps
        assert topk["rand_bulk_max"] == pytest.approx(full["rand_bulk_max"], rel=0.03)
        assert topk["max_rand_eval"] == pytest.approx(full["max_rand_eval"], rel=1e-5)
        assert topk["rand_route"] == "topk" and topk["rand_distance"] is None
    with pytest.raises(AuditError, match="rand_route"):
        analyze_matrix(clean, rand_route="fast")


BAD = {
    "all_zeros": (np.zeros((64, 32), np.float32), "skipped", "all entries are zero"),
    "constant": (np.full((64, 32), 0.5, np.float32), "skipped", "only 1 eigenvalues"),
    "rank_2": (np.ones((64, 2), np.float32) @ np.eye(2, 32, dtype=np.float32), "skipped", "only"),
    "nan": (np.where(np.eye(64, 32) > 0, np.nan, 1.0).astype(np.float32), "error", "32 NaN"),
    "inf": (np.where(np.eye(64, 32) > 0, np.inf, 1.0).astype(np.float32), "error", "32 Inf"),
    "row_vector": (np.ones((1, 100), np.float32), "skipped", "1 eigenvalues, fewer than 8"),
    "seven_evals": (np.ones((100, 7), np.float32), "skipped", "7 eigenvalues, fewer than 8"),
    # full rank, but WeightWatcher's 1e-5 cutoff is absolute: the reason names the scale
    "tiny_scale": (np.eye(64, 32, dtype=np.float32) * 1e-4, "skipped", "largest |w| 0.0001"),
    # F32 and BF16 hold 3e38, whose square (an eigenvalue) float32 cannot
    "too_large": (np.where(np.eye(64, 32) > 0, 3e38, 1.0).astype(np.float32), "error", "3e+38"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_matrices_get_a_status_not_an_exception(name):
    matrix, status, reason = BAD[name]
    row = analyze_matrix(matrix, matrix_id=name)
    assert row["status"] == status
    assert reason in row["reason"]
    assert (row["N"], row["M"]) == (max(matrix.shape), min(matrix.shape))  # as WeightWatcher
    for key, value in row.items():  # nothing NaN: uncomputable columns are None
        if isinstance(value, float):
            assert np.isfinite(value), key


def test_bad_matrices_do_not_stop_a_batch():
    good = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    rows = analyze_batch([BAD["nan"][0], good, BAD["all_zeros"][0]])
    assert [r["status"] for r in rows] == ["error", "ok", "skipped"]


def test_wrong_types_raise():
    with pytest.raises(TypeError, match="floating"):
        analyze_matrix(np.ones((10, 10), dtype=np.int64))
    with pytest.raises(ValueError, match="2-D"):
        analyze_matrix(np.ones((2, 10, 10), dtype=np.float32))


def test_trap_ratio_of_a_gaussian_matrix_is_about_one_or_less():
    rng = np.random.default_rng(11)
    for shape in ((1200, 600), (800, 800)):
        row = analyze_matrix(rng.standard_normal(shape), matrix_id=str(shape))
        assert row["rand_num_spikes"] == 0 and row["trap_ratios"] == []
        assert row["trap_ratio"] == pytest.approx(1.0, abs=0.05)
        assert row["trap_ratio"] == row["max_rand_eval"] / row["rand_bulk_max"]


@pytest.mark.parametrize("a", [60.0, 100.0])
def test_one_planted_entry_gives_the_closed_form_trap(a):
    """One entry a in an N x M matrix of unit-variance entries: its shuffled copy has an
    outlier at (N + a^2)(M + a^2) / a^2, and trap_ratio is that over the MP edge
    (sqrt(N) + sqrt(M))^2 of the unit-variance bulk."""
    n, m = 2000, 1000
    w = np.random.default_rng(12).standard_normal((n, m))
    w[123, 456] = a
    row = analyze_matrix(w, matrix_id="planted")
    outlier = (n + a * a) * (m + a * a) / (a * a)
    edge = (np.sqrt(n) + np.sqrt(m)) ** 2
    assert row["rand_num_spikes"] == 1
    assert row["trap_evals"][0] == pytest.approx(outlier, rel=0.03)
    assert row["trap_ratio"] == pytest.approx(outlier / edge, rel=0.03)
    assert row["trap_ratios"] == [pytest.approx(row["trap_evals"][0] / row["rand_bulk_max"])]
    assert (row["trap_entries"][0]["row"], row["trap_entries"][0]["col"]) == (123, 456)


def test_a_huge_entry_is_analyzed_in_float64():
    """An entry of 1e20 (BF16 and F32 hold it): its square overflows the float32 Gram the
    shuffled ESD is usually computed in, so that ESD goes the float64 way. The float32
    matrix then gives exactly its float64 copy's row, with the trap on that entry."""
    w = np.random.default_rng(5).standard_normal((256, 128)).astype(np.float32)
    w[17, 3] = 1e20
    row = analyze_matrix(w, matrix_id="huge")
    assert row == analyze_matrix(w.astype(np.float64), matrix_id="huge")
    assert row["status"] == "ok" and row["lambda_max"] == pytest.approx(1e40, rel=1e-6)
    assert row["rand_num_spikes"] == 1 and row["max_rand_eval"] == pytest.approx(1e40, rel=1e-6)
    assert (row["trap_entries"][0]["row"], row["trap_entries"][0]["col"]) == (17, 3)
    assert all(np.isfinite(v) for v in row.values() if isinstance(v, float))


def test_a_flat_spectrum_gives_finite_columns_or_none():
    """An orthogonal matrix (RWKV's init) has every eigenvalue equal up to rounding: the
    power-law fit gives alpha ~ 1e6 and lambda^alpha overflows (gain 2) or underflows
    (gain 0.5); log_alpha_norm = log10(sum lambda^alpha) is computed in log space, so it
    is finite and within log10 M of alpha log10 lambda_max. Exactly equal eigenvalues
    give alpha = 1 + n / 0: no power law, so no alpha."""
    torch.manual_seed(0)
    for gain in (2.0, 0.5):
        w = torch.nn.init.orthogonal_(torch.empty(64, 32), gain=gain)
        row = analyze_matrix(w, matrix_id=str(gain))
        assert row["status"] == "ok" and 1e4 < row["alpha"] < 1e300
        top = row["alpha"] * np.log10(row["lambda_max"])
        assert top - 1e-6 * abs(top) <= row["log_alpha_norm"] <= top + np.log10(32) + 1e-6
    exact = 2.0 * np.eye(64, 32)
    row = analyze_matrix(exact)
    assert row["status"] == "ok" and row["lambda_max"] == 4.0
    assert row["alpha"] is row["log_alpha_norm"] is row["xmin"] is None
    assert row["num_spikes"] is not None and row["trap_ratio"] is not None


def test_rand_distance_is_scipys_and_never_nan():
    """js_distance is scipy's jensenshannon, except where round-off makes its divergence
    a hair below 0: spectra equal but for the last bit gave NaN there half the time."""
    from scipy.spatial.distance import jensenshannon

    from llm_audit.spectral.analyze import js_distance

    rng = np.random.default_rng(0)
    for _ in range(200):
        p, q = rng.random(9) * 3, rng.random(9) * 3
        assert js_distance(p, q) == pytest.approx(jensenshannon(p, q), rel=1e-12)
        twin = p * (1 + rng.standard_normal(9) * 1e-16)
        assert 0 <= js_distance(p, twin) < 1e-7
