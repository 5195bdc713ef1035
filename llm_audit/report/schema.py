"""The report's columns and rows: one definition, read by the writer, the readers, the
HTML page, the README test and every code path that produces a row.

Why here: a row is built in three situations — a matrix analyzed, a matrix that could not
be read or analyzed, a task that died or timed out — and all three must give the same
columns with the same types, or a reader (a release gate) sees `[]` in one place and null
in another. `report_row` and `failure_row` are the only row builders.

Schema version 2 added `transposed`, `error_kind` (what failed: data, bug, task,
timeout), `trap_ratio` and `trap_ratios`; version-1 reports still read, with the new
columns null.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from ..source.plan import MatrixUnit
from ..spectral.analyze import empty_row
from ..spectral.columns import COLUMNS
from ..spectral.settings import AnalysisSettings

SCHEMA_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
# No float in a report is NaN, infinite or larger than this in size (readers refuse such a
# file: a reader rounding 1.8e308 for display would get infinity).
MAX_ABS_FLOAT = 1e300

# name -> (type, meaning), in file order around the analysis columns.
UNIT_COLUMNS: dict[str, tuple[str, str]] = {
    "matrix": (
        "str",
        "Unit id: the tensor name, with [expert] or a slice suffix where one tensor holds "
        "several matrices.",
    ),
    "tensor": ("str", "Name of the checkpoint tensor the matrix comes from."),
    "kind": ("str", "Role of the matrix (q_proj, expert_down, embedding, ...), from its name."),
    "layer": ("int", "Transformer block index, when the name has one."),
    "expert": ("int", "Expert index within an MoE tensor."),
    "source_dtype": (
        "str",
        "Storage dtype in the checkpoint (with its scaling, e.g. 'F8_E4M3 block 128x128 scaled').",
    ),
    "transposed": (
        "bool",
        "True when the checkpoint stores this matrix as [in, out] (GPT-2's Conv1D, stacked "
        "experts): trap_entries (row, col) are then (col, row) in the stored tensor.",
    ),
}
RUN_COLUMNS: dict[str, tuple[str, str]] = {
    "error": ("str", "The error message when status is 'error'."),
    "error_kind": (
        "str",
        "What failed when status is 'error': 'data' (the matrix's bytes or values are bad), "
        "'bug' (an unexpected exception; its traceback is in errors.log), 'task' (the worker "
        "died after its retries) or 'timeout'.",
    ),
    "seconds": ("float", "Time spent on this matrix."),
    "node": ("str", "Ray node that computed it (IP / node id)."),
}
REPORT_COLUMNS: dict[str, tuple[str, str]] = {**UNIT_COLUMNS, **COLUMNS, **RUN_COLUMNS}
ERROR_KINDS = ("data", "bug", "task", "timeout")

_ARROW = {
    "bool": pa.bool_(),
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "list<float>": pa.list_(pa.float64()),
    "list<entry>": pa.list_(
        pa.struct([("row", pa.int64()), ("col", pa.int64()), ("value", pa.float64())])
    ),
}
SCHEMA_METADATA = {b"llm_audit_schema": SCHEMA_VERSION.encode()}
LAYERS_SCHEMA = pa.schema(
    [
        pa.field(name, _ARROW[kind], nullable=name != "matrix")
        for name, (kind, _) in REPORT_COLUMNS.items()
    ],
    metadata=SCHEMA_METADATA,
)
SPECTRA_SCHEMA = pa.schema(
    [
        pa.field("matrix", pa.string(), nullable=False),
        pa.field("evals", pa.list_(pa.float64())),
        pa.field("rand_evals", pa.list_(pa.float64())),
    ],
    metadata=SCHEMA_METADATA,
)
# Columns that differ between two runs of the same audit (where and how long it ran).
RUN_DEPENDENT = ("seconds", "node", "backend")


def report_row(
    unit: MatrixUnit,
    analysis: Mapping[str, Any],
    *,
    seconds: float,
    error_kind: str | None = None,
    node: str | None = None,
) -> dict[str, Any]:
    """A layers row: `unit`'s plan columns, the analysis columns (every one present), the
    run columns; `evals` / `rand_evals` pass through for spectra.parquet.

    An analysis float that is NaN, infinite or beyond `MAX_ABS_FLOAT` is a bug in the
    maths, and a report holding it would be refused by every reader: such a column is
    left null and the row is an error of kind 'bug' naming it; the others are kept.
    """
    row: dict[str, Any] = {name: analysis.get(name) for name in COLUMNS}
    if row["N"] is None:  # a matrix refused before its analysis: the plan knows its shape
        row.update(N=max(unit.shape), M=min(unit.shape))
    bad = [name for name, (kind, _) in COLUMNS.items() if not _in_range(row[name], kind)]
    if bad:
        values = ", ".join(f"{name} = {row[name]}"[:80] for name in bad)
        for name in bad:
            row[name] = [] if COLUMNS[name][0] == "list<float>" else None
        row["status"] = "error"
        row["reason"] = f"the analysis gave {values}: a bug in llm-audit"
        error_kind = "bug"
    failed = row["status"] == "error"
    row.update(
        matrix=unit.id,
        tensor=unit.tensor,
        kind=unit.kind,
        layer=unit.layer,
        expert=unit.expert,
        source_dtype=unit.source_dtype,
        transposed=unit.transpose,
        error=row["reason"] if failed else None,
        error_kind=(error_kind or "data") if failed else None,
        seconds=float(seconds),
        node=node,
        evals=analysis.get("evals"),
        rand_evals=analysis.get("rand_evals"),
    )
    return row


def _in_range(value: Any, kind: str) -> bool:
    """Whether a `kind` column's value holds only floats a report may hold."""
    if value is None or kind not in ("float", "list<float>"):
        return True
    values = np.asarray(value if kind == "list<float>" else [value], dtype=np.float64)
    return bool(np.all(np.abs(values) <= MAX_ABS_FLOAT))  # NaN: False


def failure_row(
    unit: MatrixUnit,
    message: str,
    error_kind: str,
    settings: AnalysisSettings,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """The row of a matrix that produced no analysis: status=error, why, and what failed.
    Like every row refused before its ESD, it names no backend."""
    if error_kind not in ERROR_KINDS:
        raise ValueError(f"error_kind must be one of {ERROR_KINDS}, got {error_kind!r}")
    failed = empty_row(settings.seed, unit.id, None, settings.rand_route)
    failed.update(status="error", reason=message)
    return report_row(unit, failed, seconds=seconds, error_kind=error_kind)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order: columns an older version lacked are
    added as nulls (a version-1 report reads as version 2), others cast to their type."""
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def float_list(values: Any) -> list[float] | None:
    """An array of eigenvalues as a plain list for Arrow (None stays None)."""
    return None if values is None else np.asarray(values, dtype=np.float64).tolist()
