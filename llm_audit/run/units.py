"""Analyze planned matrices of a checkpoint: in memory, or streamed in row chunks when large.

Why one module: whoever runs the work (a Ray worker, an in-process driver) must turn
units into report rows the same way — the same reading, the same memory rule, the same
row builder, the same handling of a matrix that cannot be read — so that where a unit ran
never changes what it reports. Same-shape units (a layer's experts) are analyzed as one
batch, which a GPU backend runs as one stack.

Device memory: a batch that runs out of GPU memory is not a failure of its matrices. The
batch is halved, the caching allocators' pools released, and the rest of the group goes
on at the smaller size; only a matrix that does not fit even alone is an `error` row
(error_kind "task": where it ran failed, not its data). Each halving is counted in
`stats["oom_halvings"]`, and the backend's busy seconds in `stats["device_s"]`.

Errors: a matrix whose bytes or values are bad (an `AuditError` from the reader, NaN
entries from the analysis) becomes an `error` row and the rest go on. Anything else is a
bug: it propagates, with its traceback, to whoever runs the task (`llm_audit.run.audit`
keeps it in the report's errors.log).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from ..errors import AuditError
from ..report.schema import failure_row, report_row
from ..source.checkpoint import Checkpoint
from ..source.plan import MatrixUnit
from ..spectral.analyze import analyze_batch, analyze_streamed
from ..spectral.backends import (
    ROW_CHUNK,
    Backend,
    is_out_of_memory,
    release_memory,
    select_backend,
)
from ..spectral.settings import AnalysisSettings


def streams(unit: MatrixUnit, settings: AnalysisSettings) -> bool:
    """Whether `unit` is analyzed in row chunks: large, tall, stored row-contiguous, and
    its own matrix (not rebuilt from a weight norm's halves)."""
    rows, cols = unit.shape
    return (
        rows * cols * 4 > settings.stream_above_bytes
        and rows >= cols
        and unit.layout in ("dense", "rows")
        and not unit.transpose
        and unit.norm_tensor is None  # |v| is over all of v
    )


def _analyze_group(
    units: list[MatrixUnit],
    matrices: list[Any],
    settings: AnalysisSettings,
    backend: Backend,
    batch: int,
    keep_spectra: bool,
    stats: dict[str, float],
) -> list[dict[str, Any]]:
    """Rows of same-shape `units`, `batch` at a time, halving the batch on out-of-memory."""
    rows: list[dict[str, Any]] = []
    while len(rows) < len(units):
        part = slice(len(rows), len(rows) + batch)
        start = time.perf_counter()
        try:
            done = analyze_batch(
                matrices[part],
                matrix_ids=[u.id for u in units[part]],
                settings=settings,
                backend=backend,
                batch_size=batch,
                keep_spectra=keep_spectra,
            )
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            release_memory()
            if batch > 1:
                batch //= 2
                stats["oom_halvings"] = stats.get("oom_halvings", 0) + 1
                continue
            message = f"out of device memory for this one matrix: {str(err).splitlines()[0]}"
            rows.append(failure_row(units[len(rows)], message, "task", settings))
            continue
        seconds = (time.perf_counter() - start) / len(done)
        rows += [report_row(u, a, seconds=seconds) for u, a in zip(units[part], done, strict=True)]
    return rows


def analyze_units(
    checkpoint: Checkpoint,
    units: Sequence[MatrixUnit],
    settings: AnalysisSettings,
    *,
    keep_spectra: bool = False,
    batch_size: int | None = None,
    stats: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Report rows of `units`, in order (`llm_audit.report.schema.report_row`).

    `batch_size` caps a stack of same-shape matrices (default: the backend's,
    `AnalysisSettings.batch_size`); `stats`, when given, gains "oom_halvings" and
    "device_s" (see the module docstring).
    """
    stats = {} if stats is None else stats
    rows: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[int, int], list[MatrixUnit]] = {}
    for unit in units:
        if not streams(unit, settings):
            groups.setdefault(unit.shape, []).append(unit)
            continue
        start = time.perf_counter()
        try:
            analysis = analyze_streamed(
                lambda u=unit: checkpoint.iter_rows(u, ROW_CHUNK),
                unit.shape,
                matrix_id=unit.id,
                settings=settings,
                keep_spectra=keep_spectra,
            )
        except AuditError as err:  # unreadable bytes: this matrix fails, the run goes on
            seconds = time.perf_counter() - start
            rows[unit.id] = failure_row(unit, str(err), "data", settings, seconds)
            continue
        rows[unit.id] = report_row(unit, analysis, seconds=time.perf_counter() - start)
    if groups:  # streamed units run on the host: a task of only those never opens a device
        backend = select_backend(settings.backend)
        busy = backend.busy_s
        batch = batch_size or settings.batch_size(backend.name)
    for group in groups.values():
        start = time.perf_counter()
        matrices, readable = [], []
        for unit in group:
            try:
                matrices.append(checkpoint.read_matrix(unit))
                readable.append(unit)
            except AuditError as err:
                rows[unit.id] = failure_row(unit, str(err), "data", settings)
        read_s = (time.perf_counter() - start) / max(1, len(readable))
        done = _analyze_group(readable, matrices, settings, backend, batch, keep_spectra, stats)
        for unit, row in zip(readable, done, strict=True):
            row["seconds"] += read_s  # each matrix's share of the group's reading
            rows[unit.id] = row
    if groups:
        stats["device_s"] = stats.get("device_s", 0.0) + backend.busy_s - busy
    return [rows[unit.id] for unit in units]
