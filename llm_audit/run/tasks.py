"""The audit's Ray tasks: units grouped into tasks, submitted with back-pressure, each
finished task written to the report at once.

Why tasks and not Ray Data: see `llm_audit.run.audit`. A task carries names and offsets,
never weights: each worker reads its own bytes from the checkpoint path. A task whose
worker dies is re-run by Ray (`max_retries`); one that still fails, or runs past
`task_timeout_s`, gives error rows for its matrices; one whose analysis raised (a bug)
gives error rows and leaves its whole traceback in the report's errors.log.

On a cluster with GPUs: a task holds `gpus_per_task` of a GPU (0.25: four tasks share one,
so one task's host work — reading, MXFP4 decoding, shuffles, fits — overlaps another's
device work) and `cpus_per_task` cores (Ray sets the task's OMP_NUM_THREADS from it). A
layer's experts go as one task of up to `gpu_batch_size` units, analyzed as one stack. A
streamed unit (an embedding, an lm_head) is analyzed on the host whatever the backend, so
it goes as a CPU-only task and never holds a GPU slot. Workers are reused (Ray recycles a
worker after each task only for `num_gpus` given in the decorator, which would start a
new process and CUDA context per task); instead each GPU task hands its allocators'
cached blocks back when it ends (`llm_audit.spectral.backends.release_memory`). Each task
returns its device seconds, which the driver sums per GPU into `stats["gpu_busy_s"]`.
"""

from __future__ import annotations

import re
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..report.schema import failure_row
from ..report.writer import ReportWriter
from ..source.checkpoint import Checkpoint, open_checkpoint
from ..source.plan import MatrixUnit
from ..source.reference import ResolvedModel
from ..spectral.backends import release_memory
from ..spectral.settings import AnalysisSettings
from .config import AuditConfig
from .progress import stderr_progress
from .units import analyze_units, streams

ERRORS_LOG = "errors.log"  # the full traceback of every bug, beside the report
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the task name in its tracebacks


@dataclass(frozen=True)
class Task:
    """Units analyzed together by one worker; `gpu`: whether the task holds a GPU slot."""

    units: list[MatrixUnit]
    gpu: bool


def group_units(units: list[MatrixUnit], config: AuditConfig, gpus: bool) -> list[Task]:
    """One unit per task on CPUs. With GPUs: streamed units first, one per CPU-only task
    (the longest tasks start first), then same-tensor units (a layer's experts) in GPU
    tasks of up to `gpu_batch_size`."""
    if not gpus:
        return [Task([u], False) for u in units]
    host = [Task([u], False) for u in units if streams(u, config)]
    by_tensor: dict[str, list[MatrixUnit]] = {}
    for unit in units:
        if not streams(unit, config):
            by_tensor.setdefault(unit.tensor, []).append(unit)
    size = config.gpu_batch_size
    device = [
        Task(group[i : i + size], True)
        for group in by_tensor.values()
        for i in range(0, len(group), size)
    ]
    return host + device


_CHECKPOINTS: dict[tuple[str, ...], Checkpoint] = {}


def _worker_checkpoint(model: ResolvedModel) -> Checkpoint:
    """Headers are parsed once per worker process, not once per task."""
    key = tuple(str(p) for p in model.files)
    if key not in _CHECKPOINTS:
        _CHECKPOINTS.clear()
        _CHECKPOINTS[key] = open_checkpoint(model)
    return _CHECKPOINTS[key]


def analyze_task(
    checkpoint: Checkpoint, task: Task, settings: AnalysisSettings
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """A task's rows and what it did: bytes read, device seconds, out-of-memory halvings.
    The same for a Ray worker (`run_task`) and the in-process driver (`llm_audit.run.local`)."""
    before = checkpoint.bytes_read
    done: dict[str, Any] = {}
    batch = settings.gpu_batch_size if task.gpu else None
    try:
        rows = analyze_units(
            checkpoint, task.units, settings, keep_spectra=True, batch_size=batch, stats=done
        )
    finally:
        if task.gpu:
            release_memory()
    done["bytes_read"] = checkpoint.bytes_read - before
    return rows, done


def run_task(
    model: ResolvedModel, task: Task, settings: AnalysisSettings
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Body of one Ray task: `analyze_task` on this worker, each row naming its node and
    the figures naming the GPUs the task held."""
    import ray

    rows, done = analyze_task(_worker_checkpoint(model), task, settings)
    context = ray.get_runtime_context()
    node = f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:12]}"
    for row in rows:
        row["node"] = node
    done["gpus"] = [f"{node}/{gpu}" for gpu in ray.get_gpu_ids()] if task.gpu else []
    return rows, done


def add_task_stats(stats: dict[str, Any], done: dict[str, Any]) -> None:
    """Add one task's figures to the run's: bytes, halvings, busy seconds per GPU."""
    stats["bytes_read"] = stats.get("bytes_read", 0) + done["bytes_read"]
    stats["oom_halvings"] = stats.get("oom_halvings", 0) + done.get("oom_halvings", 0)
    for gpu in done["gpus"]:
        busy = stats.setdefault("gpu_busy_s", {})
        busy[gpu] = round(busy.get(gpu, 0.0) + done.get("device_s", 0.0) / len(done["gpus"]), 3)


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
    stats: dict[str, Any],
) -> str:
    """Submit with back-pressure, write each finished task; 'complete' when all returned.

    `stats` gains "bytes_read", "oom_halvings" and, on GPUs, "gpu_busy_s": the device
    seconds of the tasks each GPU ran ("node-ip/node-id/gpu-id" -> s)."""
    import ray

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0) > 0
    host_options = {
        "num_cpus": config.cpus_per_task,
        "num_gpus": 0,
        "max_retries": config.max_retries,
    }
    slots = max(1, int(resources.get("CPU", 1) // config.cpus_per_task))
    if gpus:
        slots = max(1, int(resources["GPU"] // config.gpus_per_task))
    in_flight = config.max_in_flight or 2 * slots
    settings = config.analysis()
    remote = ray.remote(run_task)
    on_host = remote.options(**host_options)
    on_gpu = remote.options(**(host_options | {"num_gpus": config.gpus_per_task}))
    model_ref = ray.put(model)
    queue = deque(group_units(todo, config, gpus))
    pending: dict[Any, tuple[list[MatrixUnit], float]] = {}
    progress = None if quiet else stderr_progress("audit")
    finished = 0
    while queue or pending:
        while queue and len(pending) < in_flight:
            task = queue.popleft()
            ref = (on_gpu if task.gpu else on_host).remote(model_ref, task, settings)
            pending[ref] = (task.units, time.monotonic())
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
        for ref in ready:
            units, _ = pending.pop(ref)
            try:
                rows, done = ray.get(ref)
                add_task_stats(stats, done)
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
