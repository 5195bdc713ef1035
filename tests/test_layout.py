"""The package's shape: stages that import only downward, one row schema, one row builder.

Why a test: the layering is what lets a reader see the pipeline in `ls -R llm_audit`
and lets the maths be tested without Ray; one convenient import in the wrong direction
undoes it silently. These tests read every module's imports with `ast`, so they fail the
moment such an import is written, whether or not it is ever executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from llm_audit.errors import AuditError
from llm_audit.report.reader import _finite
from llm_audit.report.schema import (
    ERROR_KINDS,
    LAYERS_SCHEMA,
    REPORT_COLUMNS,
    failure_row,
    report_row,
)
from llm_audit.run.units import analyze_units
from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.reference import resolve_model
from llm_audit.source.synth import SynthConfig, synth_gpt_oss
from llm_audit.spectral.analyze import analyze_matrix
from llm_audit.spectral.settings import AnalysisSettings

PACKAGE = Path(__file__).resolve().parent.parent / "llm_audit"
STAGES = ("source", "spectral", "run", "report", "grok")
# what each stage may import from the package besides itself (top-level modules by name)
ALLOWED = {
    "source": {"errors", "inputs"},
    "spectral": {"errors"},
    "report": {"errors", "files", "inputs", "source", "spectral", "__init__"},
    "run": {"errors", "files", "inputs", "source", "spectral", "report", "__init__"},
    "grok": {"errors", "files", "inputs", "source", "spectral", "report", "run", "__init__"},
}


def _imports(path: Path) -> set[str]:
    """First component under llm_audit of every package import in `path`."""
    return _imports_of(path.read_text(), list(path.relative_to(PACKAGE).parts[:-1]))


def _imports_of(source: str, package: list[str]) -> set[str]:
    """The same for `source`, a module of `package` (its folders under llm_audit)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                if not target:  # `from .. import __version__`
                    target = ["__init__"]
            elif node.module and node.module.split(".")[0] == "llm_audit":
                target = node.module.split(".")[1:] or ["__init__"]
            else:
                continue
            found.add(target[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "llm_audit":
                    found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_imports_only_downward(stage):
    bad = {}
    for path in sorted((PACKAGE / stage).rglob("*.py")):
        wrong = _imports(path) - ALLOWED[stage] - {stage}
        if wrong:
            bad[str(path.relative_to(PACKAGE))] = sorted(wrong)
    assert bad == {}


def test_the_layering_test_catches_an_upward_import():
    probe = "from ..run.audit import run_audit\nimport llm_audit.report.writer\nfrom . import x\n"
    assert _imports_of(probe, ["spectral"]) - ALLOWED["spectral"] == {"run", "report", "spectral"}


def test_top_level_is_small():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 6, modules
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(
        STAGES
    )


def test_every_column_has_a_type_and_a_meaning():
    assert list(REPORT_COLUMNS) == LAYERS_SCHEMA.names
    for name, (kind, meaning) in REPORT_COLUMNS.items():
        assert kind and meaning.endswith((".", ")")), name


def _python_types(row: dict) -> dict[str, str]:
    return {name: type(row[name]).__name__ for name in REPORT_COLUMNS}


def test_every_failure_path_gives_rows_of_one_shape(tmp_path):
    """Bad data, an unreadable tensor, a crashed task, a bug, a timeout: the same columns,
    every one present, with the same Python types, and each row fits the Arrow schema."""
    folder = synth_gpt_oss(tmp_path / "m", SynthConfig(layers=1, experts=2, vocab=256))
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    units = checkpoint.plan(8).units
    unit = units[0]
    bad = np.ones((64, 32), np.float32)
    bad[3, 4] = np.nan
    data = report_row(unit, analyze_matrix(bad, matrix_id=unit.id), seconds=0.5)

    class Unreadable:  # the checkpoint reader refusing one tensor's bytes
        def read_matrix(self, unit):
            raise AuditError(f"{unit.tensor}: truncated")

    (unreadable,) = analyze_units(Unreadable(), [unit], AnalysisSettings())  # type: ignore[arg-type]
    driver = [failure_row(unit, "why", kind, AnalysisSettings(), 1.0) for kind in ERROR_KINDS]
    rows = [data, unreadable, *driver]
    assert data["error_kind"] == unreadable["error_kind"] == "data"
    assert "NaN" in data["error"] and "truncated" in unreadable["error"]
    shapes = {tuple(sorted(_python_types(r).items())) for r in rows}
    assert len(shapes) == 1, [_python_types(r) for r in rows]
    assert all(set(REPORT_COLUMNS) <= set(r) for r in rows)
    assert all((r["N"], r["M"]) == (max(unit.shape), min(unit.shape)) for r in rows[1:])
    table = pa.Table.from_pylist([{n: r[n] for n in REPORT_COLUMNS} for r in rows], LAYERS_SCHEMA)
    assert table["status"].to_pylist() == ["error"] * len(rows)


def test_a_row_never_holds_a_float_its_readers_refuse(tmp_path):
    """A maths bug giving inf or NaN must not make the whole report unreadable: the row
    becomes an error of kind 'bug' naming the column, and keeps everything else."""
    folder = synth_gpt_oss(tmp_path / "m", SynthConfig(layers=1, experts=2, vocab=256))
    unit = open_checkpoint(resolve_model(str(folder))).plan(8).units[0]
    good = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    analysis = dict(analyze_matrix(good, matrix_id=unit.id))
    analysis.update(log_alpha_norm=float("inf"), trap_ratios=[2.0, float("nan")])
    row = report_row(unit, analysis, seconds=0.5)
    assert (row["status"], row["error_kind"]) == ("error", "bug")
    assert "log_alpha_norm = inf" in row["error"] and "trap_ratios" in row["error"]
    assert row["log_alpha_norm"] is None and row["trap_ratios"] == []
    assert row["alpha"] == analysis["alpha"] and row["lambda_max"] == analysis["lambda_max"]
    table = pa.Table.from_pylist([{n: row[n] for n in REPORT_COLUMNS}], LAYERS_SCHEMA)
    assert all(_finite(table[name]) for name in REPORT_COLUMNS)
    clean = report_row(unit, analyze_matrix(good, matrix_id=unit.id), seconds=0.5)
    assert clean["status"] == "ok" and clean["error_kind"] is None
