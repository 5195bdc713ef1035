"""An audit driven in this process, without Ray: the same grouping into tasks and the same
task analysis as the Ray driver, one task after another.

Why: a lent GPU machine has torch, CuPy, safetensors and pyarrow but no Ray, and nothing
can be installed there; the device check (`benchmarks/device_check.py`) must still run
the audit's own code path over a plan, not a re-creation of it. It is also the reference
a Ray audit is compared with in the tests: where a unit ran must never change its row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..source.checkpoint import Checkpoint
from ..source.plan import MatrixUnit
from .config import AuditConfig
from .tasks import Task, add_task_stats, analyze_task, group_units


def audit_in_process(
    checkpoint: Checkpoint,
    units: list[MatrixUnit],
    config: AuditConfig,
    *,
    gpus: bool,
    on_task: Callable[[Task, float], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of `units` (plan order) and the run's figures, as `run_tasks` counts them.

    `gpus` groups the units as for a cluster with GPUs (same-tensor stacks, streamed units
    on their own); the one device is named "0" in `gpu_busy_s`. `on_task(task, seconds)`
    is called after each task.
    """
    settings = config.analysis()
    stats: dict[str, Any] = {"bytes_read": 0, "oom_halvings": 0}
    rows: dict[str, dict[str, Any]] = {}
    for task in group_units(units, config, gpus):
        start = time.perf_counter()
        done_rows, done = analyze_task(checkpoint, task, settings)
        done["gpus"] = ["0"] if task.gpu else []
        add_task_stats(stats, done)
        rows.update((unit.id, row) for unit, row in zip(task.units, done_rows, strict=True))
        if on_task:
            on_task(task, time.perf_counter() - start)
    return [rows[unit.id] for unit in units], stats
