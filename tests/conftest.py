"""Shared fixtures: the parity matrices of issue #2 and a quiet WeightWatcher."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

# Ray's logger keeps the stderr it found at import; imported first inside a test, that is the
# test's capture, closed later ("Logging error: I/O operation on closed file").
import ray  # noqa: F401  isort: skip


@dataclass(frozen=True)
class Case:
    """A parity matrix, its float64 SVD eigenvalues and the trap count it must give."""

    name: str
    matrix: np.ndarray
    evals: np.ndarray
    traps: str  # "zero", "some" or "at_least_20"


def _svd_evals(matrix: np.ndarray) -> np.ndarray:
    sv = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    return np.sort(sv * sv)


def _parity_matrices() -> list[tuple[str, np.ndarray, str]]:
    rng = np.random.default_rng(2026)
    planted = rng.standard_normal((1024, 1024))
    where = rng.choice(planted.size, size=20, replace=False)
    planted.ravel()[where] = rng.choice([-1.0, 1.0], size=20) * 60.0
    u, v = rng.standard_normal(1024), rng.standard_normal(512)
    rank1 = rng.standard_normal((1024, 512)) + 0.2 * np.outer(u, v)
    left, _ = np.linalg.qr(rng.standard_normal((1024, 512)))
    right, _ = np.linalg.qr(rng.standard_normal((512, 512)))
    power_law = (left * (100.0 * np.arange(1, 513) ** -0.8)) @ right.T
    return [
        ("gaussian_2880x512", rng.standard_normal((2880, 512)), "zero"),
        ("gaussian_1024sq", rng.standard_normal((1024, 1024)), "zero"),
        ("student_t_1024sq", rng.standard_t(2.5, size=(1024, 1024)), "some"),
        ("planted_20", planted, "at_least_20"),
        ("rank1_plus_noise", rank1, "zero"),
        ("power_law_svals", power_law, "any"),
        ("small_200x64", rng.standard_normal((200, 64)), "zero"),
    ]


@pytest.fixture(scope="session")
def parity_cases() -> list[Case]:
    """The matrices on which we must match WeightWatcher (float32, as weights are stored)."""
    cases = []
    for name, matrix, traps in _parity_matrices():
        m32 = matrix.astype(np.float32)
        cases.append(Case(name, m32, _svd_evals(m32), traps))
    return cases


@pytest.fixture(scope="session")
def watcher():
    """A WeightWatcher 0.7.7 instance with its logging and prints silenced."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import weightwatcher as ww

        instance = ww.WeightWatcher()
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    return instance


@contextlib.contextmanager
def quiet():
    """Silence WeightWatcher's prints and warnings inside a block."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def bundled_report(tmp_path_factory):
    """A real report folder: the bundled demo model audited once per session (about 10 s)."""
    from llm_audit.run.audit import run_audit
    from llm_audit.run.config import AuditConfig
    from llm_audit.source.synth import write_bundled_model

    base = tmp_path_factory.mktemp("bundled")
    run_audit(str(write_bundled_model(base / "model")), base / "report", AuditConfig(), quiet=True)
    return base / "report"


def write_rows(folder, rows) -> None:
    """layers.parquet and spectra.parquet of `rows`, as the real ReportWriter builds them,
    but unchecked: `finalize` would leave out (and redo) rows no audit writes, the NaN and
    the holes these tests craft on purpose."""
    from llm_audit.report.writer import ReportWriter

    writer = ReportWriter(folder)
    writer.add(rows)
    for part in writer.parts.iterdir():
        part.rename(folder / f"{part.name.split('-')[0]}.parquet")
    writer.parts.rmdir()


def _rewrite_report(src, dst, edit, model=None):
    """Copy report `src` to `dst` through ReportWriter; `edit(row)` may change each row
    (evals and rand_evals included); `model` replaces the manifest's model reference."""
    import json

    import pyarrow.parquet as pq

    rows = pq.read_table(src / "layers.parquet").to_pylist()
    spectra = pq.read_table(src / "spectra.parquet").to_pylist()
    for row, spectrum in zip(rows, spectra, strict=True):
        row.update(evals=spectrum["evals"], rand_evals=spectrum["rand_evals"])
        edit(row)
    write_rows(dst, rows)
    manifest = json.loads((src / "manifest.json").read_text())
    if model is not None:
        manifest["model"]["reference"] = model
    (dst / "manifest.json").write_text(json.dumps(manifest))
    (dst / "summary.json").write_text((src / "summary.json").read_text())
    return dst


@pytest.fixture(scope="session")
def rewrite_report():
    """`rewrite_report(src, dst, edit, model=None)`: a modified copy of a report folder."""
    return _rewrite_report


HOSTILE_RENAMES = {
    # a trapped attention matrix, and a trapped expert whose kind is hostile too
    "model.layers.1.self_attn.o_proj.weight": ("model.layers.1.<script>alert(1)</script>", None),
    "model.layers.0.mlp.experts.gate_up_proj[2]": (
        '"><img src=x onerror=alert(1)>',
        "<img src=x onerror=alert(2)>",
    ),
}


@pytest.fixture(scope="session")
def hostile_report(bundled_report, tmp_path_factory):
    """The bundled report with tensor, matrix, kind and model names that are HTML/JS."""

    def rename(row):
        if row["matrix"] in HOSTILE_RENAMES:
            name, kind = HOSTILE_RENAMES[row["matrix"]]
            row.update(matrix=name, tensor=name, matrix_id=name)
            if kind is not None:
                row["kind"] = kind

    dst = tmp_path_factory.mktemp("hostile") / "report"
    return _rewrite_report(bundled_report, dst, rename, model="<script>alert(3)</script>")
