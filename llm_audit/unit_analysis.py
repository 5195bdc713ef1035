"""Analyze planned matrices of a checkpoint: in memory, or streamed in row chunks when large.

Why one module: whoever runs the work (the in-process demo, Ray workers) must turn units
into report rows the same way — the same reading, the same memory rule, the same extra
columns, the same handling of a matrix that cannot be read — so that where a unit ran
never changes what it reports. Same-shape units (a layer's experts) are analyzed as one
batch, which a GPU backend runs as one stack.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .analyze import analyze_batch, analyze_streamed
from .checkpoint import Checkpoint
from .columns import COLUMN_NAMES
from .errors import AuditError
from .plan import MatrixUnit

STREAM_ABOVE_BYTES = 512 * 2**20  # a float32 matrix larger than this is streamed
STREAM_ROWS = 16384


def streams(unit: MatrixUnit, stream_above_bytes: int = STREAM_ABOVE_BYTES) -> bool:
    """Whether `unit` is analyzed in row chunks: large, tall, and stored row-contiguous."""
    rows, cols = unit.shape
    return (
        rows * cols * 4 > stream_above_bytes and rows >= cols and unit.layout in ("dense", "rows")
    )


def _with_unit(row: dict[str, Any], unit: MatrixUnit, seconds: float) -> dict[str, Any]:
    row.update(
        matrix=unit.id,
        tensor=unit.tensor,
        kind=unit.kind,
        layer=unit.layer,
        expert=unit.expert,
        source_dtype=unit.source_dtype,
        seconds=seconds,
        error=row.get("reason") if row.get("status") == "error" else None,
    )
    return row


def _failed(unit: MatrixUnit, err: Exception, seed: int) -> dict[str, Any]:
    """The row of a unit that could not be read or analyzed: status=error and why."""
    message = str(err) if isinstance(err, AuditError) else f"{type(err).__name__}: {err}"
    row = dict.fromkeys(COLUMN_NAMES)
    row.update(
        status="error",
        reason=message,
        seed=seed,
        matrix_id=unit.id,
        trap_evals=[],
        trap_entries=[],
        warning="",
    )
    return row


def analyze_units(
    checkpoint: Checkpoint,
    units: Sequence[MatrixUnit],
    *,
    seed: int = 0,
    randomize: bool = True,
    backend: str | None = None,
    rand_route: str = "full",
    min_evals: int = 8,
    stream_above_bytes: int = STREAM_ABOVE_BYTES,
    spill_dir: str | None = None,
    batch_size: int | None = None,
    keep_spectra: bool = False,
) -> list[dict[str, Any]]:
    """Report rows of `units` (in order), with their plan columns, `seconds` and `error`.

    A unit that cannot be read or analyzed becomes a row with status=error; the others go on.
    """
    rows: dict[str, dict[str, Any]] = {}
    in_memory: list[MatrixUnit] = []
    for unit in units:
        start = time.perf_counter()
        try:
            if streams(unit, stream_above_bytes):
                row = dict(
                    analyze_streamed(
                        lambda u=unit: checkpoint.iter_rows(u, STREAM_ROWS),
                        unit.shape,
                        randomize=randomize,
                        seed=seed,
                        matrix_id=unit.id,
                        min_evals=min_evals,
                        spill_dir=spill_dir,
                        keep_spectra=keep_spectra,
                    )
                )
                rows[unit.id] = _with_unit(row, unit, time.perf_counter() - start)
            else:
                in_memory.append(unit)
        except Exception as err:  # noqa: BLE001 - one bad matrix must not stop the run
            rows[unit.id] = _with_unit(_failed(unit, err, seed), unit, time.perf_counter() - start)
    groups: dict[tuple[int, int], list[MatrixUnit]] = {}
    for unit in in_memory:
        groups.setdefault(unit.shape, []).append(unit)
    for group in groups.values():
        start = time.perf_counter()
        matrices, readable = [], []
        for unit in group:
            try:
                matrices.append(checkpoint.read_matrix(unit))
                readable.append(unit)
            except Exception as err:  # noqa: BLE001
                rows[unit.id] = _with_unit(_failed(unit, err, seed), unit, 0.0)
        if not readable:
            continue
        try:
            done = analyze_batch(
                matrices,
                randomize=randomize,
                seed=seed,
                backend=backend,
                matrix_ids=[u.id for u in readable],
                rand_route=rand_route,
                min_evals=min_evals,
                batch_size=batch_size,
                keep_spectra=keep_spectra,
            )
        except Exception as err:  # noqa: BLE001
            done = [_failed(u, err, seed) for u in readable]
        seconds = (time.perf_counter() - start) / len(readable)
        for unit, row in zip(readable, done, strict=True):
            rows[unit.id] = _with_unit(row, unit, seconds)
    return [rows[unit.id] for unit in units]
