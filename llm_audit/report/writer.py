"""The audit report folder: Arrow/Parquet tables plus JSON manifest and summary.

Why parts: results arrive one task at a time from a cluster, and a run may be killed at
any moment. Each finished task is written at once as its own Parquet part (to a temporary
name, then renamed: a part is complete or absent), so an interrupted run leaves a valid
partial report and `--resume` knows exactly which matrices are done. `finalize` merges
the parts, in plan order, into `layers.parquet` and `spectra.parquet` (atomically too).

Why the folder is classified before anything is written (`out_folder_state`): `--out`
names a folder a user typed, and a release job may point it at the wrong place. Only a
missing folder, an empty one, or an llm-audit report is accepted, and only the files a
report owns (`OWNED_FILES`, parts named as this writer names them, and their temporary
files) are ever removed; a symlink where a report keeps its files is refused, since
following it would write or delete elsewhere.

Schema (`llm_audit.report.schema`, its version in every file's metadata and the manifest):
- layers.parquet: one row per matrix, every column of `REPORT_COLUMNS`;
- spectra.parquet: `matrix, evals, rand_evals` (eigenvalues of W and of its shuffle).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import AuditError, ReportError
from ..files import write_atomic
from ..inputs import read_capped
from .reader import MAX_JSON_BYTES, table_problem
from .schema import LAYERS_SCHEMA, SCHEMA_METADATA, SPECTRA_SCHEMA, conform, float_list

OWNED_FILES = (
    "manifest.json",
    "summary.json",
    "layers.parquet",
    "spectra.parquet",
    "errors.log",
    "report.html",
)
PARTS = "parts"
_PART = re.compile(r"^(layers|spectra)-([0-9a-f]{32})\.parquet$")
# write_atomic's temporary names: ".NAME.HEX.tmp" (a write killed before its rename)
_TEMP = re.compile(r"^\.(.+)\.[0-9a-f]{32}\.tmp$")


def _owned_part(name: str) -> bool:
    temp = _TEMP.match(name)
    return bool(_PART.match(temp.group(1) if temp else name))


def _owned_file(name: str) -> bool:
    temp = _TEMP.match(name)
    return (temp.group(1) if temp else name) in OWNED_FILES


def is_report(folder: Path) -> bool:
    """Whether `folder` holds an llm-audit report (its manifest says so)."""
    try:
        manifest = json.loads(read_capped(folder / "manifest.json", MAX_JSON_BYTES))
    except (OSError, ValueError, AuditError):  # a FIFO or /dev/zero is no report's manifest
        return False
    return isinstance(manifest, dict) and manifest.get("tool") == "llm-audit"


def _refuse_links(folder: Path) -> None:
    paths = [folder / name for name in (*OWNED_FILES, PARTS)]
    if (folder / PARTS).is_dir() and not (folder / PARTS).is_symlink():
        paths += list((folder / PARTS).iterdir())
    for path in paths:
        if path.is_symlink():
            raise ReportError(f"{path}: a symlink inside a report folder; refusing to follow it")


def out_folder_state(folder: Path) -> str:
    """'missing', 'empty' or 'report'; anything else is refused (nothing is touched)."""
    if folder.is_symlink() and not folder.exists():
        raise ReportError(f"{folder}: a dangling symlink, not a report folder")
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        raise ReportError(f"{folder}: not a folder; --out takes a new, empty or report folder")
    if not any(folder.iterdir()):
        return "empty"
    if not is_report(folder):
        raise ReportError(
            f"{folder}: not empty and not an llm-audit report; refusing to write into it "
            "(choose a new or empty --out)"
        )
    _refuse_links(folder)
    return "report"


@contextmanager
def lock_report(folder: Path) -> Iterator[None]:
    """Hold a lock on `folder` (creating it) while a run writes it: a second audit into
    the same folder (`--overwrite` removing the first one's parts, or a `--resume`
    computing everything again) is refused instead. The lock is on the folder itself, so
    no file is left behind; where the file system has no such locks (some network
    mounts), the run goes on unlocked."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ReportError(
                f"{folder}: another llm-audit run is writing this report; wait for it to "
                "finish or choose another --out"
            ) from None
        except OSError:
            pass  # no locks here: unlocked, as before there were locks
        yield
    finally:
        os.close(fd)  # releases the lock


def remove_report(folder: Path) -> None:
    """Delete what the report in `folder` owns, and nothing else (other files stay)."""
    _refuse_links(folder)
    parts = folder / PARTS
    if parts.is_dir():
        for path in parts.iterdir():
            if _owned_part(path.name) and path.is_file():
                path.unlink()
        if not any(parts.iterdir()):
            parts.rmdir()
    for path in folder.iterdir():
        if _owned_file(path.name) and path.is_file():
            path.unlink()


def _read(path: Path, schema: pa.Schema) -> pa.Table | None:
    """A part or final table, or None when it is not one (empty, truncated, foreign, or
    holding values no audit writes: a resumed report would carry them into its summary)."""
    try:
        table = conform(pq.read_table(path), schema)
        problem = table_problem(table)
    except (OSError, pa.ArrowException, KeyError) as err:
        problem = type(err).__name__
    if problem is None:
        return table
    print(f"llm-audit: ignoring {path} ({problem}); its matrices are redone", file=sys.stderr)
    return None


class ReportWriter:
    """Parts as tasks finish; `finalize` merges them. One writer per report folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.parts = self.folder / PARTS
        self.parts.mkdir(parents=True, exist_ok=True)
        self.rows_added = 0  # rows this writer wrote (a run's own count, not the report's)

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
        # counted with the part that holds them: an interrupt (SIGTERM, Ctrl-C) between the
        # two would leave the report with rows its manifest says this run did not compute
        part = self.parts / f"layers-{name}.parquet"
        self.rows_added += len(rows)
        try:
            write_atomic(part, lambda t: pq.write_table(layers, t))
        except BaseException:
            if not part.exists():
                self.rows_added -= len(rows)
            raise

    def _sources(self) -> tuple[pa.Table, pa.Table]:
        """Every readable (layers, spectra) pair — parts, then the final files — stacked.

        A pair whose tables are unreadable or do not list the same matrices in the same
        order is left out: its matrices are not done, and are computed again."""
        pairs = sorted(
            (
                self.parts / f"layers-{m.group(2)}.parquet",
                self.parts / f"spectra-{m.group(2)}.parquet",
            )
            for m in map(_PART.match, (p.name for p in self.parts.iterdir()))
            if m and m.group(1) == "layers"
        )
        if (self.folder / "layers.parquet").exists():
            pairs.append((self.folder / "layers.parquet", self.folder / "spectra.parquet"))
        layers, spectra = [], []
        for layers_path, spectra_path in pairs:
            table = _read(layers_path, LAYERS_SCHEMA)
            eigen = _read(spectra_path, SPECTRA_SCHEMA) if table is not None else None
            if eigen is None or not table["matrix"].equals(eigen["matrix"]):
                continue
            layers.append(table)
            spectra.append(eigen)
        if not layers:
            return LAYERS_SCHEMA.empty_table(), SPECTRA_SCHEMA.empty_table()
        return pa.concat_tables(layers), pa.concat_tables(spectra)

    def done(self, retry_failed: bool = False) -> set[str]:
        """Matrix ids already in the report (final tables or parts); with `retry_failed`,
        only those with a row that is not an error."""
        layers, _ = self._sources()
        statuses = zip(layers["matrix"].to_pylist(), layers["status"].to_pylist(), strict=True)
        return {m for m, status in statuses if not (retry_failed and status == "error")}

    def finalize(self, order: list[str]) -> pa.Table:
        """Merge everything into layers.parquet and spectra.parquet in plan `order`: one
        row per matrix, a computed row before an error row (a retry that succeeded)."""
        rank = {matrix: i for i, matrix in enumerate(order)}
        layers, spectra = self._sources()
        matrices = layers["matrix"].to_pylist()
        failed = [status == "error" for status in layers["status"].to_pylist()]
        keep: dict[str, int] = {}
        for i, matrix in enumerate(matrices):  # a retried task may have written twice
            if matrix not in keep or (failed[keep[matrix]] and not failed[i]):
                keep[matrix] = i
        indices = sorted(keep.values(), key=lambda i: rank.get(matrices[i], len(rank)))
        taken = pa.array(indices, pa.int64())
        layers = layers.take(taken).replace_schema_metadata(SCHEMA_METADATA)
        spectra = spectra.take(taken).replace_schema_metadata(SCHEMA_METADATA)
        write_atomic(self.folder / "spectra.parquet", lambda t: pq.write_table(spectra, t))
        write_atomic(self.folder / "layers.parquet", lambda t: pq.write_table(layers, t))
        for part in self.parts.iterdir():  # our parts, and temp files of a killed write
            if _owned_part(part.name) and part.is_file():
                part.unlink()
        if not any(self.parts.iterdir()):
            self.parts.rmdir()
        return layers
