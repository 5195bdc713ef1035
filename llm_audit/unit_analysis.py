"""Analyze one planned matrix of a checkpoint: in memory, or streamed in row chunks when large.

Why one function: whoever runs the work (the in-process demo now, Ray workers later) must
turn a unit into a report row the same way — the same reading, the same memory rule, the
same extra columns — so that where a unit ran never changes what it reports.
"""

from __future__ import annotations

from typing import Any

from .analyze import analyze_batch, analyze_streamed
from .checkpoint import Checkpoint
from .plan import MatrixUnit

STREAM_ABOVE_BYTES = 512 * 2**20  # a float32 matrix larger than this is streamed
STREAM_ROWS = 16384


def streams(unit: MatrixUnit, stream_above_bytes: int = STREAM_ABOVE_BYTES) -> bool:
    """Whether `unit` is analyzed in row chunks: large, tall, and stored row-contiguous."""
    rows, cols = unit.shape
    return (
        rows * cols * 4 > stream_above_bytes and rows >= cols and unit.layout in ("dense", "rows")
    )


def analyze_unit(
    checkpoint: Checkpoint,
    unit: MatrixUnit,
    *,
    seed: int = 0,
    backend: str | None = None,
    rand_route: str = "full",
    stream_above_bytes: int = STREAM_ABOVE_BYTES,
    spill_dir: str | None = None,
) -> dict[str, Any]:
    """The report row of `unit`, with its plan columns (matrix, kind, layer, expert, ...)."""
    if streams(unit, stream_above_bytes):
        row = dict(
            analyze_streamed(
                lambda: checkpoint.iter_rows(unit, STREAM_ROWS),
                unit.shape,
                seed=seed,
                matrix_id=unit.id,
                spill_dir=spill_dir,
            )
        )
    else:
        (row,) = analyze_batch(
            [checkpoint.read_matrix(unit)],
            seed=seed,
            matrix_ids=[unit.id],
            backend=backend,
            rand_route=rand_route,
        )
    row.update(
        matrix=unit.id,
        tensor=unit.tensor,
        kind=unit.kind,
        layer=unit.layer,
        expert=unit.expert,
        source_dtype=unit.source_dtype,
    )
    return row
