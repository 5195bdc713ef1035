"""Reading a report folder back: for `report show`, `check`, `diff` and `report html`.

Why its own module, and why it checks so much: a report folder may come from someone
else (a CI artifact, a colleague's share), so it is untrusted input, and every reader must
refuse the same things the same way — with one line, before anything is used. Checked
first, from metadata only: the manifest's and summary's fields and types (no NaN, no
deep nesting, a size cap), the Parquet files' column types against the schema, and their
row counts against `MAX_ROWS` (from the Parquet footer, before a row is decoded: a 37 KB
file can hold 2 million rows). Then the rows: matrix names present and unique, statuses
known. Strings in a report are printed through `format.printable`, never raw.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import ReportError
from ..inputs import check_regular, first_line, is_count, read_capped, shown
from .schema import LAYERS_SCHEMA, MAX_ABS_FLOAT, READABLE_VERSIONS, SPECTRA_SCHEMA, conform
from .summary import row_counts

# The largest MoE checkpoints have under 100,000 matrices (Kimi K2: 384 experts x 3 x 61).
MAX_ROWS = 500_000
MAX_JSON_BYTES = 16 * 2**20
MAX_UNCOMPRESSED_BYTES = 4 * 2**30  # layers.parquet decoded (spectra are read in batches)
STATUSES = ("ok", "skipped", "error")
# Columns that schema version 2 added: a version-1 report lacks them.
ADDED_IN_2 = ("transposed", "error_kind", "trap_ratio", "trap_ratios")
_COUNTS = (
    "matrices_planned",
    "matrices_in_report",
    "audited",
    "skipped",
    "failed",
    "matrices_with_traps",
    "total_traps",
)


@dataclass(frozen=True)
class Report:
    """A finished report: its rows (plan order), manifest and summary."""

    folder: Path
    rows: list[dict[str, Any]]
    manifest: dict[str, Any]
    summary: dict[str, Any]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def read_json(path: Path) -> dict[str, Any]:
    """A report's JSON file (manifest, summary): a capped regular file, finite numbers,
    an object; else a one-line ReportError."""
    try:
        raw = read_capped(path, MAX_JSON_BYTES)
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except FileNotFoundError:
        raise ReportError(f"{path.parent}: not a report folder (no {path.name})") from None
    except (OSError, ValueError, RecursionError) as err:
        reason = first_line(err)
        raise ReportError(f"{path}: unreadable ({reason})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: not a JSON object")
    return data


def _field(path: Path, data: dict[str, Any], key: str, ok: Any, expected: str) -> None:
    if key not in data:
        raise ReportError(f"{path}: no {key!r}")
    if not ok(data[key]):
        raise ReportError(f"{path}: {key} must be {expected}, got {shown(data[key])}")


def _check_manifest(path: Path, m: dict[str, Any]) -> None:
    _field(
        path,
        m,
        "schema_version",
        lambda v: v in READABLE_VERSIONS,
        "one of " + ", ".join(map(repr, READABLE_VERSIONS)),
    )
    _field(path, m, "status", lambda v: isinstance(v, str), "a string")
    _field(path, m, "model", lambda v: isinstance(v, dict), "an object")
    _field(path, m["model"], "reference", lambda v: isinstance(v, str), "a string")
    for key, ok, expected in (
        ("seed", lambda v: v is None or is_count(v), "a non-negative integer"),
        ("tool_version", lambda v: isinstance(v, str), "a string"),
        ("finished", lambda v: isinstance(v, str), "a string"),
        ("config", lambda v: isinstance(v, dict), "an object"),
    ):
        if key in m:
            _field(path, m, key, ok, expected)


def _check_summary(path: Path, s: dict[str, Any]) -> None:
    for key in _COUNTS:
        _field(path, s, key, is_count, "a non-negative integer")
    for key in ("not_planned", "weights_not_planned"):
        if key in s:  # reports written before they were added lack them
            _field(
                path,
                s,
                key,
                lambda v: isinstance(v, dict) and all(is_count(x) for x in v.values()),
                "an object of reasons to counts",
            )
    _field(
        path,
        s,
        "mean_alpha_by_kind",
        lambda v: (
            isinstance(v, dict)
            and all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                for x in v.values()
            )
        ),
        "an object of kinds to numbers",
    )


def _parquet(path: Path, schema: pa.Schema, required: list[str], version: str) -> pq.ParquetFile:
    """`path` opened, its footer checked against `schema`, the manifest's schema `version`
    and the caps; no row read."""
    try:
        check_regular(path)  # a FIFO would hang Arrow's reader
        handle = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        reason = first_line(err)
        raise ReportError(f"{path}: not a readable Parquet file ({reason})") from None
    meta = handle.metadata
    if meta.num_rows > MAX_ROWS:
        raise ReportError(f"{path}: {meta.num_rows} rows, more than {MAX_ROWS} (refused)")
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if path.name == "layers.parquet" and size > MAX_UNCOMPRESSED_BYTES:
        raise ReportError(f"{path}: {size} bytes decoded, more than {MAX_UNCOMPRESSED_BYTES}")
    try:
        found = handle.schema_arrow
    except (OSError, pa.ArrowException) as err:
        raise ReportError(f"{path}: unreadable schema ({type(err).__name__})") from None
    written = (found.metadata or {}).get(b"llm_audit_schema")
    if written is not None and written != version.encode():
        raise ReportError(
            f"{path}: written as schema version {shown(written.decode(errors='replace'))}, "
            f"but manifest.json says {version!r}"
        )
    twice = sorted({name for name in found.names if found.names.count(name) > 1})
    if twice:
        raise ReportError(f"{path}: column {shown(twice[0])} appears more than once")
    for name in required:
        if name not in found.names:
            raise ReportError(f"{path}: no column {name!r}")
    for f in schema:
        if f.name in found.names and found.field(f.name).type != f.type:
            raise ReportError(
                f"{path}: column {f.name!r} is {found.field(f.name).type}, expected {f.type}"
            )
    return handle


def _items(column: pa.ChunkedArray | pa.Array) -> list[pa.Array] | None:
    """The values inside a list column (each field of a list of structs: trap_entries'
    row, col and value), or None for a column that is not a list."""
    if not pa.types.is_list(column.type):
        return None
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    items = pc.list_flatten(column)
    if pa.types.is_struct(items.type):
        return [items] + [pc.struct_field(items, [i]) for i in range(items.type.num_fields)]
    return [items]


def _finite(column: pa.ChunkedArray | pa.Array) -> bool:
    """Whether every float in `column` (a float column, or the floats inside a list
    column) is finite and at most `MAX_ABS_FLOAT` in size, as `report_row` makes every
    row; a null column value means "not computed", but a null *inside* a list is refused
    (a spectrum or a trap entry with a hole is no row we write)."""
    parts = _items(column)
    if parts is not None and any(part.null_count for part in parts):
        return False
    for part in parts if parts is not None else [column]:
        if pa.types.is_floating(part.type):
            inside = pc.less_equal(pc.abs(part.fill_null(0.0)), MAX_ABS_FLOAT)  # NaN: false
            if pc.all(inside).as_py() is False:
                return False
    return True


def _non_negative(column: pa.ChunkedArray) -> bool:
    """Whether every integer in `column` (an int column, or trap_entries' row and col) is
    at least 0: each is a count or an index, and a negative trap count would cancel real
    traps in a gate's sums."""
    parts = _items(column) or [column]
    return all(
        pc.min(part).as_py() is None or pc.min(part).as_py() >= 0
        for part in parts
        if pa.types.is_integer(part.type)
    )


def table_problem(table: pa.Table | pa.RecordBatch) -> str | None:
    """What makes `table` (rows of layers.parquet or spectra.parquet) no table this tool
    writes — NaN, out-of-range floats, holes in a list, negative counts — or None. The
    reader refuses such a report; the writer redoes such a part on --resume."""
    for name in table.column_names:
        if not _finite(table.column(name)):
            return f"column {name!r} holds NaN, out-of-range values or nulls in a list"
        if not _non_negative(table.column(name)):
            return f"column {name!r} holds negative counts or indices"
    return None


def check_spectra(batch: pa.RecordBatch, path: Path) -> None:
    """Refuse a batch of spectra.parquet holding NaN or out-of-range eigenvalues (readers
    that stream the spectra call this on each batch)."""
    for name in ("evals", "rand_evals"):
        if not _finite(batch.column(name)):
            raise ReportError(f"{path}: {name} holds NaN, null or out-of-range values")


def load_report(folder: str | Path) -> Report:
    """Load `folder`'s layers.parquet, manifest.json and summary.json, checked."""
    folder = Path(folder)
    manifest = read_json(folder / "manifest.json")
    _check_manifest(folder / "manifest.json", manifest)
    layers = folder / "layers.parquet"
    if not layers.is_file():
        raise ReportError(
            f"{folder}: no layers.parquet (a run still going, or killed before "
            "its first result? --resume completes it)"
        )
    summary = read_json(folder / "summary.json")
    _check_summary(folder / "summary.json", summary)
    added = ADDED_IN_2 if manifest["schema_version"] == "1" else ()
    version = manifest["schema_version"]
    required = [f.name for f in LAYERS_SCHEMA if f.name not in added]
    handle = _parquet(layers, LAYERS_SCHEMA, required, version)
    if (folder / "spectra.parquet").exists():
        _parquet(folder / "spectra.parquet", SPECTRA_SCHEMA, SPECTRA_SCHEMA.names, version)
    try:
        table = conform(handle.read(), LAYERS_SCHEMA)
    except (OSError, pa.ArrowException) as err:
        reason = first_line(err)
        raise ReportError(f"{layers}: unreadable rows ({reason})") from None
    if (problem := table_problem(table)) is not None:  # floats: null where not computed
        raise ReportError(f"{layers}: {problem}")
    rows = table.to_pylist()
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row["matrix"] is None or row["matrix"] in seen:
            raise ReportError(f"{layers}: row {i}: matrix is missing or repeated")
        if row["status"] not in STATUSES:
            raise ReportError(
                f"{layers}: row {i}: status {shown(row['status'])} is not one of "
                f"{', '.join(STATUSES)}"
            )
        seen.add(row["matrix"])
    # the counts shown are the rows', not summary.json's copy of them (report.summary)
    return Report(folder, rows, manifest, summary | row_counts(rows))
