"""`llm-audit audit`: a whole checkpoint audited by Ray tasks into a report folder.

Why tasks and not Ray Data: each unit's status, retries, GPU batching by shape and
resume-by-matrix must be under our control, and results must land in the report as they
arrive. Measured here, Ray Data's from_items/map/write_parquet took 3.95 s and wrote 64
files for 64 items against 0.33 s for tasks + `ray.wait` + pyarrow, and has no natural
partial resume (shared/reference/ray-and-compute.md). So: the driver plans from headers
only, submits tasks (names and offsets, never weights; each worker reads its own bytes
from the checkpoint path), keeps a bounded number in flight, and writes each finished
task as a report part (`llm_audit.report`).

Cluster: with `--address` or `$RAY_ADDRESS` (what `ray job submit` sets) it joins that
cluster, and first checks that every node sees the checkpoint files at the same path
with the same headers; otherwise it starts a local Ray sized to this machine.
Faults: a task whose worker dies is re-run by Ray (`max_retries`); a matrix that cannot
be read or analyzed is a row with status=error; a task that still fails, or runs past
`task_timeout_s`, gives error rows for its matrices. Ctrl-C finalizes a partial report.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import Checkpoint, open_checkpoint
from .config import AuditConfig
from .errors import AuditError
from .model_ref import ResolvedModel, resolve_model
from .plan import MatrixUnit
from .progress import stderr_progress
from .report import SCHEMA_VERSION, ReportWriter, write_json
from .unit_analysis import analyze_units

OBJECT_STORE_BYTES = 256 * 2**20
FAULT_ENV = "LLM_AUDIT_FAULT_KILL_ONCE"  # test hook: "UNIT_ID|MARKER": die once on that unit


@dataclass(frozen=True)
class AuditResult:
    """What the CLI reports: where, how many, and whether anything failed."""

    out: Path
    matrices: int
    failed: int
    summary: dict[str, Any]


def _select(units: list[MatrixUnit], config: AuditConfig) -> list[MatrixUnit]:
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    return [
        u
        for u in units
        if (not include or any(p.search(u.id) for p in include))
        and not any(p.search(u.id) for p in exclude)
    ]


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


def _inject_fault(units: list[MatrixUnit]) -> None:
    """Kill this worker once when asked to, so tests can prove tasks are retried."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    unit_id, _, marker = spec.partition("|")
    if any(u.id == unit_id for u in units) and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)


def run_task(
    model: ResolvedModel, units: list[MatrixUnit], settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], int]:
    """Body of one Ray task: read and analyze `units` on this worker; rows and bytes read."""
    import ray

    _inject_fault(units)
    checkpoint = _worker_checkpoint(model)
    before = checkpoint.bytes_read
    rows = analyze_units(checkpoint, units, keep_spectra=True, **settings)
    context = ray.get_runtime_context()
    node = f"{ray.util.get_node_ip_address()}/{context.get_node_id()[:12]}"
    for row in rows:
        row["node"] = node
    return rows, checkpoint.bytes_read - before


def check_files(files: list[tuple[str, int, str]]) -> tuple[str, list[str]]:
    """Body of the per-node check: which checkpoint files this node lacks or sees differently."""
    import ray

    from .safetensors_header import read_header

    problems = []
    for path, size, digest in files:
        try:
            header = read_header(path)
        except AuditError as err:
            problems.append(str(err))
            continue
        if header.file_size != size or header.header_sha256 != digest:
            problems.append(f"{path}: differs from the driver's copy")
    return ray.get_runtime_context().get_node_id(), problems


def connect(address: str | None, config: AuditConfig) -> bool:
    """Join the given (or $RAY_ADDRESS) cluster, or start a local one; True if started.

    Where Ray is already initialized (a caller auditing many checkpoints in one session,
    as `llm-audit grok` does), it is used as it is, and left running.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    # "local": a new cluster of our own. Without it ray.init() attaches to whatever local
    # cluster was started last (another audit, a grok run), and our sizing is refused.
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=OBJECT_STORE_BYTES,
    )
    return True


def _check_nodes(checkpoint: Checkpoint) -> None:
    """Every alive node must read the same checkpoint files at the same paths."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    files = [(str(p), h.file_size, h.header_sha256) for p, h in checkpoint.headers.items()]
    remote = ray.remote(num_cpus=0)(check_files)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(files)
        for n in nodes
    ]
    for node, (node_id, problems) in zip(nodes, ray.get(refs, timeout=300), strict=True):
        if problems:
            name = node.get("NodeManagerAddress", node_id)
            raise AuditError(
                f"node {name} ({node_id[:12]}) cannot read the checkpoint at the "
                f"same path: {problems[0]}"
            )


def _error_rows(units: list[MatrixUnit], message: str, seed: int) -> list[dict[str, Any]]:
    return [
        {
            "matrix": u.id,
            "tensor": u.tensor,
            "kind": u.kind,
            "layer": u.layer,
            "expert": u.expert,
            "source_dtype": u.source_dtype,
            "status": "error",
            "reason": message,
            "error": message,
            "seed": seed,
            "matrix_id": u.id,
        }
        for u in units
    ]


def _summary(table: Any, planned: int) -> dict[str, Any]:
    rows = table.select(["kind", "status", "alpha", "rand_num_spikes", "warning"]).to_pylist()
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        if r["alpha"] is not None:
            by_kind.setdefault(r["kind"], []).append(r["alpha"])
    traps = [r["rand_num_spikes"] or 0 for r in rows]
    warnings: dict[str, int] = {}
    for r in rows:
        if r["warning"]:
            warnings[r["warning"]] = warnings.get(r["warning"], 0) + 1
    return {
        "matrices_planned": planned,
        "matrices_in_report": len(rows),
        "audited": sum(r["status"] == "ok" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "failed": sum(r["status"] == "error" for r in rows),
        "matrices_with_traps": sum(t > 0 for t in traps),
        "total_traps": sum(traps),
        "mean_alpha_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "warnings": warnings,
    }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_audit(
    reference: str,
    out: str | Path,
    config: AuditConfig,
    *,
    revision: str | None = None,
    address: str | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> AuditResult:
    """Audit `reference` into report folder `out` (see the module docstring)."""
    started, t0 = _now(), time.perf_counter()
    out = Path(out)
    if (out / "manifest.json").exists() and not resume:
        raise AuditError(
            f"{out} already holds a report: pass --resume to complete it, or choose another --out"
        )
    model = resolve_model(reference, revision)
    checkpoint = open_checkpoint(model)
    units = _select(checkpoint.plan(min_evals=config.min_evals).units, config)
    timings = {"plan_s": round(time.perf_counter() - t0, 3)}
    writer = ReportWriter(out)
    done = writer.done() if resume else set()
    todo = [u for u in units if u.id not in done]
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": "llm-audit",
        "tool_version": __version__,
        "model": {
            "reference": reference,
            "path": str(model.root),
            "repo_id": model.repo_id,
            "revision": model.revision,
            "files": [
                {"name": p.name, "bytes": h.file_size, "header_sha256": h.header_sha256}
                for p, h in checkpoint.headers.items()
            ],
        },
        "config": config.to_dict(),
        "seed": config.seed,
        "status": "running",
        "started": started,
        "driver": socket.gethostname(),
        "resumed_from": len(done),
    }
    write_json(out / "manifest.json", manifest)

    import ray

    stats = {"bytes_read": 0, "bytes_on_disk": checkpoint.bytes_on_disk()}
    t1 = time.perf_counter()
    started_local = connect(address, config)
    timings["connect_s"] = round(time.perf_counter() - t1, 3)
    status = "failed"
    try:
        manifest["cluster"] = {
            "address": "local" if started_local else "joined",
            "resources": ray.cluster_resources(),
        }
        if not started_local:
            _check_nodes(checkpoint)
        t2 = time.perf_counter()
        status = _run_tasks(model, todo, config, writer, quiet, stats)
        timings["compute_s"] = round(time.perf_counter() - t2, 3)
    except KeyboardInterrupt:
        status = "interrupted"
        print("llm-audit: interrupted; writing the partial report", file=sys.stderr)
    finally:
        if started_local:
            ray.shutdown()
        t3 = time.perf_counter()
        table = writer.finalize([u.id for u in units])
        timings["finalize_s"] = round(time.perf_counter() - t3, 3)
        summary = _summary(table, len(units))
        if status == "complete" and summary["matrices_in_report"] < len(units):
            status = "partial"
        write_json(out / "summary.json", summary)
        manifest.update(
            status=status,
            finished=_now(),
            backends=sorted({b for b in table["backend"].to_pylist() if b}),
            timings=timings,
            io=stats,
            seconds=round(time.perf_counter() - t0, 3),
            computed_this_run=len(todo),
        )
        write_json(out / "manifest.json", manifest)
    if status == "interrupted":
        raise KeyboardInterrupt
    return AuditResult(out, summary["matrices_in_report"], summary["failed"], summary)


def _run_tasks(
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
    settings = {
        "seed": config.seed,
        "randomize": config.randomize,
        "backend": None if config.backend == "auto" else config.backend,
        "rand_route": config.rand_route,
        "min_evals": config.min_evals,
        "stream_above_bytes": config.memory_budget_mb * 2**20,
        "spill_dir": config.spill_dir,
        "batch_size": config.gpu_batch_size if gpus else 1,
    }
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
            except Exception as err:  # noqa: BLE001 - a task that failed after its retries
                message = f"task failed: {type(err).__name__}: {str(err).splitlines()[0]}"
                rows = _error_rows(units, message, config.seed)
            writer.add(rows)
            finished += len(units)
        now = time.monotonic()
        for ref, (units, since) in list(pending.items()):
            if now - since > config.task_timeout_s:
                ray.cancel(ref, force=True)
                del pending[ref]
                writer.add(
                    _error_rows(units, f"task ran past {config.task_timeout_s:g} s", config.seed)
                )
                finished += len(units)
        if progress:
            progress(finished, len(todo))
    return "complete"
