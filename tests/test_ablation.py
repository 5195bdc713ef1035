"""Trap ablation removes exactly the planted traps; the random control zeroes as many."""

from __future__ import annotations

import numpy as np
import pytest

from llm_audit import analyze_matrix
from llm_audit.spectral.ablation import ablate_random, ablate_traps


def _planted(seed: int = 4) -> tuple[np.ndarray, list[tuple[int, int]]]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((600, 300))
    where = [(17, 3), (250, 120), (599, 299)]
    for r, c in where:
        w[r, c] = 40.0 * (-1) ** r
    return w, where


def test_zeroing_the_trap_entries_removes_the_traps():
    w, where = _planted()
    row = analyze_matrix(w, matrix_id="w")
    assert row["rand_num_spikes"] == 3
    assert sorted((e["row"], e["col"]) for e in row["trap_entries"]) == where
    zeroed = ablate_traps(w, row)
    assert [zeroed[r, c] for r, c in where] == [0.0, 0.0, 0.0]
    assert np.count_nonzero(zeroed != w) == 3  # nothing else touched
    assert analyze_matrix(zeroed, matrix_id="w")["rand_num_spikes"] == 0
    assert w[17, 3] == -40.0  # the input is not modified


def test_clipping_keeps_signs_and_brings_entries_to_the_bulk():
    w, where = _planted()
    row = analyze_matrix(w, matrix_id="w")
    clipped = ablate_traps(w, row, mode="clip")
    rest = np.abs(w)
    for r, c in where:
        rest[r, c] = 0
    for r, c in where:
        assert abs(clipped[r, c]) == pytest.approx(rest.max())
        assert np.sign(clipped[r, c]) == np.sign(w[r, c])
    assert analyze_matrix(clipped, matrix_id="w")["rand_num_spikes"] == 0


def test_the_random_control_zeroes_the_same_number_of_entries():
    w, _ = _planted()
    control = ablate_random(w, 3, np.random.default_rng(0))
    assert np.count_nonzero(control != w) == 3 and np.count_nonzero(control == 0) == 3
    again = ablate_random(w, 3, np.random.default_rng(0))
    assert np.array_equal(control, again)  # seeded


def test_a_row_without_traps_changes_nothing():
    w = np.random.default_rng(1).standard_normal((300, 200))
    row = analyze_matrix(w, matrix_id="g")
    assert row["rand_num_spikes"] == 0
    assert np.array_equal(ablate_traps(w, row), w)
    with pytest.raises(ValueError, match="mode"):
        ablate_traps(w, row, mode="drop")
