"""The audit report folder: Arrow/Parquet tables plus JSON manifest and summary.

Why parts: results arrive one task at a time from a cluster, and a run may be killed at
any moment. Each finished task is written at once as its own Parquet part (to a temporary
name, then renamed: a part is complete or absent), so an interrupted run leaves a valid
partial report and `--resume` knows exactly which matrices are done. `finalize` merges
the parts, in plan order, into `layers.parquet` and `spectra.parquet` (atomically too).

Schema (version `SCHEMA_VERSION`, in every file's metadata and in the manifest):
- layers.parquet: one row per matrix: `matrix, tensor, kind, layer, expert, source_dtype`,
  every `analyze_matrix` column (llm_audit.columns), and `error, seconds, node`;
- spectra.parquet: `matrix, evals, rand_evals` (eigenvalues of W and of its shuffle).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .columns import COLUMNS

SCHEMA_VERSION = "1"
_ARROW = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "list<float>": pa.list_(pa.float64()),
    "list<entry>": pa.list_(
        pa.struct([("row", pa.int64()), ("col", pa.int64()), ("value", pa.float64())])
    ),
}
UNIT_FIELDS = [
    pa.field("matrix", pa.string(), nullable=False),
    pa.field("tensor", pa.string()),
    pa.field("kind", pa.string()),
    pa.field("layer", pa.int64()),
    pa.field("expert", pa.int64()),
    pa.field("source_dtype", pa.string()),
]
RUN_FIELDS = [
    pa.field("error", pa.string()),
    pa.field("seconds", pa.float64()),
    pa.field("node", pa.string()),
]
_META = {b"llm_audit_schema": SCHEMA_VERSION.encode()}
LAYERS_SCHEMA = pa.schema(
    UNIT_FIELDS + [pa.field(n, _ARROW[t]) for n, (t, _) in COLUMNS.items()] + RUN_FIELDS,
    metadata=_META,
)
SPECTRA_SCHEMA = pa.schema(
    [
        pa.field("matrix", pa.string(), nullable=False),
        pa.field("evals", pa.list_(pa.float64())),
        pa.field("rand_evals", pa.list_(pa.float64())),
    ],
    metadata=_META,
)
# Columns that differ between two runs of the same audit (where and how long it ran).
RUN_DEPENDENT = ("seconds", "node", "backend")


def write_atomic(path: Path, write: Any) -> None:
    """Call `write(tmp_path)`, then rename onto `path`: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def _list(values: Any) -> list[float] | None:
    return None if values is None else np.asarray(values, dtype=np.float64).tolist()


class ReportWriter:
    """Parts as tasks finish; `finalize` merges them. One writer per report folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.parts = self.folder / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)

    def add(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Write one task's rows (each with `evals` / `rand_evals` arrays, possibly None)."""
        self.parts.mkdir(exist_ok=True)
        rows = list(rows)
        if not rows:
            return
        name = uuid.uuid4().hex
        layers = pa.Table.from_pylist(
            [{f.name: row.get(f.name) for f in LAYERS_SCHEMA} for row in rows],
            schema=LAYERS_SCHEMA,
        )
        spectra = pa.Table.from_pylist(
            [
                {
                    "matrix": r["matrix"],
                    "evals": _list(r.get("evals")),
                    "rand_evals": _list(r.get("rand_evals")),
                }
                for r in rows
            ],
            schema=SPECTRA_SCHEMA,
        )
        # spectra first: a layers part present means its spectra part is too
        write_atomic(self.parts / f"spectra-{name}.parquet", lambda t: pq.write_table(spectra, t))
        write_atomic(self.parts / f"layers-{name}.parquet", lambda t: pq.write_table(layers, t))

    def _tables(self, prefix: str, final: str, schema: pa.Schema) -> pa.Table:
        tables = [
            pq.read_table(p, schema=schema) for p in sorted(self.parts.glob(f"{prefix}-*.parquet"))
        ]
        if (self.folder / final).exists():
            tables.append(pq.read_table(self.folder / final, schema=schema))
        return pa.concat_tables(tables) if tables else schema.empty_table()

    def done(self) -> set[str]:
        """Matrix ids already in the report (final tables or parts)."""
        return set(self._tables("layers", "layers.parquet", LAYERS_SCHEMA)["matrix"].to_pylist())

    def finalize(self, order: list[str]) -> pa.Table:
        """Merge everything into layers.parquet and spectra.parquet in plan `order`."""
        rank = {matrix: i for i, matrix in enumerate(order)}
        merged = {}
        for prefix, final, schema in (
            ("layers", "layers.parquet", LAYERS_SCHEMA),
            ("spectra", "spectra.parquet", SPECTRA_SCHEMA),
        ):
            table = self._tables(prefix, final, schema)
            matrices = table["matrix"].to_pylist()
            keep: dict[str, int] = {}
            for i, matrix in enumerate(matrices):  # a retried task may have written twice
                keep.setdefault(matrix, i)
            indices = sorted(keep.values(), key=lambda i: rank.get(matrices[i], len(rank)))
            table = table.take(pa.array(indices, pa.int64())).replace_schema_metadata(_META)
            write_atomic(self.folder / final, lambda t, tb=table: pq.write_table(tb, t))
            merged[prefix] = table
        for part in self.parts.iterdir():  # parts, and temp files of a killed write
            part.unlink()
        self.parts.rmdir()
        return merged["layers"]
