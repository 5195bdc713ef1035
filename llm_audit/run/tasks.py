"""The audit's Ray tasks: units grouped into tasks, submitted with back-pressure, each
finished task written to the report at once.

Why tasks and not Ray Data: see `llm_audit.run.audit`. A task carries names and offsets,
never weights: each worker reads its own bytes from the checkpoint path. A task whose
worker dies is re-run by Ray (`max_retries`); one that still fails, or runs past
`task_timeout_s`, gives error rows for its matrices; one whose analysis raised (a bug)
gives error rows and leaves its whole traceback in the report's errors.log.
"""

from __future__ import annotations

import re
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..report.schema import failure_row
from ..report.writer import ReportWriter
from ..source.checkpoint import Checkpoint, open_checkpoint
from ..source.plan import MatrixUnit
from ..source.reference import ResolvedModel
from ..spectral.settings import AnalysisSettings
from .config import AuditConfig
from .progress import stderr_progress
from .units import analyze_units

ERRORS_LOG = "errors.log"  # the full traceback of every bug, beside the report
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the task name in its tracebacks


def _tasks(units: list[MatrixUnit], config: AuditConfig, gpus: bool) -> list[list[MatrixUnit]]:
    """One unit per CPU task; on GPUs, same-tensor units (a layer's experts) batched."""
    if not gpus:
        return [[u] for u in units]
    tasks: list[list[MatrixUnit]] = []
    by_tensor: dict[str, list[MatrixUnit]] = {}
    for unit in units:
        by_tensor.setdefault(unit.tensor, []).append(unit)
    for group in by_tensor.values():
        for i in range(0, len(group), config.gpu_batch_size):
            tasks.append(group[i : i + config.gpu_batch_size])
    return tasks


_CHECKPOINTS: dict[tuple[str, ...], Checkpoint] = {}


def _worker_checkpoint(model: ResolvedModel) -> Checkpoint:
    """Headers are parsed once per worker process, not once per task."""
    key = tuple(str(p) for p in model.files)
    if key not in _CHECKPOINTS:
        _CHECKPOINTS.clear()
        _CHECKPOINTS[key] = open_checkpoint(model)
    return _CHECKPOINTS[key]


def run_task(
    model: ResolvedModel, units: list[MatrixUnit], settings: AnalysisSettings
) -> tuple[list[dict[str, Any]], int]:
    """Body of one Ray task: read and analyze `units` on this worker; rows and bytes read."""
    import ray

    checkpoint = _worker_checkpoint(model)
    before = checkpoint.bytes_read
    rows = analyze_units(checkpoint, units, settings, keep_spectra=True)
    context = ray.get_runtime_context()
    node = f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:12]}"
    for row in rows:
        row["node"] = node
    return rows, checkpoint.bytes_read - before


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _bug_rows(
    folder: Path, units: list[MatrixUnit], err: Exception, config: AuditConfig
) -> list[dict[str, Any]]:
    """Error rows for a task whose analysis raised; its full traceback goes to errors.log."""
    cause = getattr(err, "cause", None) or err
    with (folder / ERRORS_LOG).open("a") as log:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        log.write(f"== {now} bug in the task for {', '.join(u.id for u in units)}\n")
        trace = getattr(err, "traceback_str", "") or str(err)
        log.write(_ANSI.sub("", trace).rstrip() + "\n\n")
    message = f"bug: {type(cause).__name__}: {_first_line(cause)} (traceback in {ERRORS_LOG})"
    return [failure_row(u, message, "bug", config) for u in units]


def run_tasks(
    model: ResolvedModel,
    todo: list[MatrixUnit],
    config: AuditConfig,
    writer: ReportWriter,
    quiet: bool,
    stats: dict[str, int],
) -> str:
    """Submit with back-pressure, write each finished task; 'complete' when all returned."""
    import ray

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0) > 0
    options: dict[str, Any] = {"num_cpus": config.cpus_per_task, "max_retries": config.max_retries}
    if gpus:
        options["num_gpus"] = config.gpus_per_task
    slots = max(1, int(resources.get("CPU", 1) // config.cpus_per_task))
    if gpus:
        slots = max(1, int(resources["GPU"] // config.gpus_per_task))
    in_flight = config.max_in_flight or 2 * slots
    settings = config.analysis()
    task = ray.remote(run_task).options(**options)
    model_ref = ray.put(model)
    queue = deque(_tasks(todo, config, gpus))
    pending: dict[Any, tuple[list[MatrixUnit], float]] = {}
    progress = None if quiet else stderr_progress("audit")
    finished = 0
    while queue or pending:
        while queue and len(pending) < in_flight:
            units = queue.popleft()
            pending[task.remote(model_ref, units, settings)] = (units, time.monotonic())
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
        for ref in ready:
            units, _ = pending.pop(ref)
            try:
                rows, nbytes = ray.get(ref)
                stats["bytes_read"] += nbytes
            except ray.exceptions.RayTaskError as err:  # the analysis raised: a bug
                rows = _bug_rows(writer.folder, units, err, config)
            except ray.exceptions.RayError as err:  # the worker died, after its retries
                message = f"task failed: {type(err).__name__}: {_first_line(err)}"
                rows = [failure_row(u, message, "task", config) for u in units]
            writer.add(rows)
            finished += len(units)
        now = time.monotonic()
        for ref, (units, since) in list(pending.items()):
            if now - since > config.task_timeout_s:
                ray.cancel(ref, force=True)
                del pending[ref]
                message = f"task ran past {config.task_timeout_s:g} s"
                writer.add([failure_row(u, message, "timeout", config) for u in units])
                finished += len(units)
        if progress:
            progress(finished, len(todo))
    return "complete"
