"""Analyze planned matrices of a checkpoint: in memory, or streamed in row chunks when large.

Why one module: whoever runs the work (a Ray worker, an in-process driver) must turn
units into report rows the same way — the same reading, the same memory rule, the same
row builder, the same handling of a matrix that cannot be read — so that where a unit ran
never changes what it reports. Same-shape units (a layer's experts) are analyzed as one
batch, which a GPU backend runs as one stack.

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
from ..spectral.settings import AnalysisSettings

STREAM_ROWS = 16384  # rows per chunk read from a streamed matrix


def streams(unit: MatrixUnit, settings: AnalysisSettings) -> bool:
    """Whether `unit` is analyzed in row chunks: large, tall, and stored row-contiguous."""
    rows, cols = unit.shape
    return (
        rows * cols * 4 > settings.stream_above_bytes
        and rows >= cols
        and unit.layout in ("dense", "rows")
    )


def analyze_units(
    checkpoint: Checkpoint,
    units: Sequence[MatrixUnit],
    settings: AnalysisSettings,
    *,
    keep_spectra: bool = False,
) -> list[dict[str, Any]]:
    """Report rows of `units`, in order (`llm_audit.report.schema.report_row`)."""
    rows: dict[str, dict[str, Any]] = {}
    groups: dict[tuple[int, int], list[MatrixUnit]] = {}
    for unit in units:
        if not streams(unit, settings):
            groups.setdefault(unit.shape, []).append(unit)
            continue
        start = time.perf_counter()
        try:
            analysis = analyze_streamed(
                lambda u=unit: checkpoint.iter_rows(u, STREAM_ROWS),
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
    for group in groups.values():
        start = time.perf_counter()
        matrices, readable = [], []
        for unit in group:
            try:
                matrices.append(checkpoint.read_matrix(unit))
                readable.append(unit)
            except AuditError as err:
                rows[unit.id] = failure_row(unit, str(err), "data", settings)
        if not readable:
            continue
        done = analyze_batch(
            matrices,
            matrix_ids=[u.id for u in readable],
            settings=settings,
            keep_spectra=keep_spectra,
        )
        seconds = (time.perf_counter() - start) / len(readable)
        for unit, analysis in zip(readable, done, strict=True):
            rows[unit.id] = report_row(unit, analysis, seconds=seconds)
    return [rows[unit.id] for unit in units]
