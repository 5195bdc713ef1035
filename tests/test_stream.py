"""Streamed analysis of tall matrices: an exactly uniform out-of-core shuffle, and the same
numbers as the in-memory route."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import chisquare

from llm_audit import AnalysisSettings, analyze_matrix
from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.reference import resolve_model
from llm_audit.source.synth import SynthConfig, synth_gpt_oss
from llm_audit.spectral.analyze import analyze_streamed
from llm_audit.spectral.shuffle import BucketShuffle


def _shuffled(chunks, shape, rng, bucket_rows, spill_dir) -> np.ndarray:
    with BucketShuffle(shape, rng, bucket_rows=bucket_rows, spill_dir=spill_dir) as shuffle:
        for chunk in chunks:
            shuffle.add(chunk)
        return np.concatenate(list(shuffle.blocks()))


def _chunker(matrix: np.ndarray, rows: int):
    return lambda: (matrix[i : i + rows] for i in range(0, matrix.shape[0], rows))


def test_every_permutation_of_a_2x2_is_equally_likely(tmp_path):
    matrix = np.arange(4, dtype=np.float32).reshape(2, 2)
    rng = np.random.default_rng(0)
    index = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
    counts = np.zeros(24)
    for _ in range(4800):
        out = _shuffled(_chunker(matrix, 1)(), (2, 2), rng, 1, tmp_path)
        counts[index[tuple(int(v) for v in out.ravel())]] += 1
    assert chisquare(counts).pvalue > 1e-3


def test_each_entry_lands_uniformly_with_uneven_chunks_and_buckets(tmp_path):
    matrix = np.arange(12, dtype=np.float32).reshape(6, 2)
    rng = np.random.default_rng(1)
    where = np.zeros((12, 12))  # value x output position
    for _ in range(6000):
        out = _shuffled([matrix[:4], matrix[4:]], (6, 2), rng, 4, tmp_path).ravel()
        assert sorted(out.tolist()) == list(range(12))
        where[out.astype(int), np.arange(12)] += 1
    assert chisquare(where.ravel()).pvalue > 1e-3
    assert not list(tmp_path.iterdir())  # spill files are removed


def test_streamed_analysis_matches_in_memory():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((3000, 200)).astype(np.float32)
    w.ravel()[rng.choice(w.size, 3, replace=False)] = 80.0
    ours = analyze_streamed(
        _chunker(w, 700), w.shape, matrix_id="emb", rows_per_bucket=1024, keep_spectra=True
    )
    ref = analyze_matrix(w, matrix_id="emb")
    for col in (
        "alpha",
        "xmin",
        "D",
        "lambda_max",
        "norm",
        "sigma_mp",
        "bulk_max",
        "entry_kurtosis",
        "max_abs_entry",
    ):
        assert ours[col] == pytest.approx(ref[col], rel=1e-9), col
    assert ours["num_spikes"] == ref["num_spikes"]
    assert ours["trap_entries"] == ref["trap_entries"]
    planted = sorted(divmod(int(i), 200) for i in np.flatnonzero(w == 80.0))
    assert [(e["row"], e["col"]) for e in ours["trap_entries"]] == planted  # ties: row, col
    assert ours["rand_num_spikes"] == ref["rand_num_spikes"] == 3
    assert ours["rand_bulk_max"] == pytest.approx(ref["rand_bulk_max"], rel=0.02)
    assert ours["rand_evals"].sum() == pytest.approx(ref["norm"], rel=1e-5)  # same entries


def test_equal_entries_rank_by_row_then_column_on_both_routes():
    """|w| descending, then row, then column: one order on every CPU and on both routes,
    including ties cut at the boundary and equal |w| of opposite signs."""
    from llm_audit.spectral.entries import EntryAccumulator, summarize

    w = np.zeros((40, 8), np.float32)
    w[[3, 3, 17, 30, 39], [5, 1, 0, 7, 2]] = [-2.0, 2.0, 2.0, -2.0, 2.0]
    w[25, 4] = 3.0
    want = [(25, 4), (3, 1), (3, 5), (17, 0)]
    in_memory = summarize(w).top(4)
    acc = EntryAccumulator()
    for start in range(0, 40, 7):
        acc.add(w[start : start + 7])
    streamed = acc.summary().top(4)
    assert [(e["row"], e["col"]) for e in in_memory] == want
    assert streamed == in_memory


def test_streamed_bad_input():
    """Refused or skipped as the in-memory route refuses it, in the same words."""
    bad = np.ones((100, 10), np.float32)
    bad[50, 3], bad[60, 1], bad[70, 2] = np.inf, np.nan, -np.inf
    zeros = np.zeros((100, 10), np.float32)
    for matrix in (bad, zeros, np.ones((100, 4), np.float32)):
        streamed = analyze_streamed(_chunker(matrix, 30), matrix.shape)
        in_memory = analyze_matrix(matrix)
        assert (streamed["status"], streamed["reason"]) == (
            in_memory["status"],
            in_memory["reason"],
        )
    assert analyze_streamed(_chunker(bad, 30), bad.shape)["reason"] == (
        "matrix has 1 NaN and 2 Inf entries"
    )
    with pytest.raises(ValueError, match="rows >= columns"):
        analyze_streamed(_chunker(bad, 30), (10, 100))
    huge = np.random.default_rng(3).standard_normal((300, 20)).astype(np.float32)
    huge[7, 5] = 3e38  # its square leaves float32: an error row, not a crash
    row = analyze_streamed(_chunker(huge, 64), huge.shape)
    assert row["status"] == "error" and "3e+38" in row["reason"]
    huge[7, 5] = 1e20  # the shuffle's Gram goes float64: the in-memory route's numbers
    row = analyze_streamed(_chunker(huge, 64), huge.shape)
    assert row["status"] == "ok" and row["max_rand_eval"] == pytest.approx(1e40, rel=1e-6)
    assert row["lambda_max"] == analyze_matrix(huge)["lambda_max"]


def test_embedding_streamed_from_a_checkpoint(tmp_path):
    folder = synth_gpt_oss(tmp_path / "m", SynthConfig(layers=1, vocab=4096))
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    unit = next(u for u in checkpoint.plan(8).units if u.kind == "embedding")
    before = checkpoint.bytes_read
    streamed = analyze_streamed(
        lambda: checkpoint.iter_rows(unit, 1000), unit.shape, matrix_id=unit.id
    )
    assert checkpoint.bytes_read - before == unit.nbytes  # one pass feeds W and the shuffle
    ref = analyze_matrix(checkpoint.read_matrix(unit), matrix_id=unit.id)
    assert streamed["alpha"] == pytest.approx(ref["alpha"], rel=1e-9)
    assert streamed["rand_num_spikes"] == ref["rand_num_spikes"] == 0


def test_analyze_unit_streams_only_large_tall_units(tmp_path):
    from llm_audit.run.units import analyze_units, streams

    small = AnalysisSettings(memory_budget_mb=1, spill_dir=str(tmp_path))
    folder = synth_gpt_oss(tmp_path / "m", SynthConfig(layers=1, vocab=2048))
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    units = {u.kind: u for u in checkpoint.plan(8).units}
    embedding, expert = units["embedding"], units["expert_down"]
    assert streams(embedding, small) and not streams(expert, small)
    # 2048 x 256 float32 is far below the default 512 MB
    assert not streams(embedding, AnalysisSettings())
    (row,) = analyze_units(checkpoint, [embedding], small)
    assert row["matrix"] == embedding.id and row["kind"] == "embedding"
    assert row["status"] == "ok" and row["tensor"] == "model.embed_tokens.weight"
    (in_memory,) = analyze_units(checkpoint, [embedding], AnalysisSettings())
    assert row["alpha"] == pytest.approx(in_memory["alpha"], rel=1e-9)
