"""The audit report folder: Arrow/Parquet tables plus JSON manifest and summary.

Why parts: results arrive one task at a time from a cluster, and a run may be killed at
any moment. Each finished task is written at once as its own Parquet part (to a temporary
name, then renamed: a part is complete or absent), so an interrupted run leaves a valid
partial report and `--resume` knows exactly which matrices are done. `finalize` merges
the parts, in plan order, into `layers.parquet` and `spectra.parquet` (atomically too).

Schema (`llm_audit.report.schema`, its version in every file's metadata and the manifest):
- layers.parquet: one row per matrix, every column of `REPORT_COLUMNS`;
- spectra.parquet: `matrix, evals, rand_evals` (eigenvalues of W and of its shuffle).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..files import write_atomic
from .schema import LAYERS_SCHEMA, SCHEMA_METADATA, SPECTRA_SCHEMA, conform, float_list


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
                    "evals": float_list(r.get("evals")),
                    "rand_evals": float_list(r.get("rand_evals")),
                }
                for r in rows
            ],
            schema=SPECTRA_SCHEMA,
        )
        # spectra first: a layers part present means its spectra part is too
        write_atomic(self.parts / f"spectra-{name}.parquet", lambda t: pq.write_table(spectra, t))
        write_atomic(self.parts / f"layers-{name}.parquet", lambda t: pq.write_table(layers, t))

    def _tables(self, prefix: str, final: str, schema: pa.Schema) -> pa.Table:
        files = sorted(self.parts.glob(f"{prefix}-*.parquet"))
        if (self.folder / final).exists():
            files.append(self.folder / final)
        tables = [conform(pq.read_table(path), schema) for path in files]
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
            table = table.take(pa.array(indices, pa.int64()))
            table = table.replace_schema_metadata(SCHEMA_METADATA)
            write_atomic(self.folder / final, lambda t, tb=table: pq.write_table(tb, t))
            merged[prefix] = table
        for part in self.parts.iterdir():  # parts, and temp files of a killed write
            part.unlink()
        self.parts.rmdir()
        return merged["layers"]
