"""`llm-audit audit`: a whole checkpoint audited by Ray tasks into a report folder.

Why tasks and not Ray Data: each unit's status, retries, GPU batching by shape and
resume-by-matrix must be under our control, and results must land in the report as they
arrive. Measured here, Ray Data's from_items/map/write_parquet took 3.95 s and wrote 64
files for 64 items against 0.33 s for tasks + `ray.wait` + pyarrow, and has no natural
partial resume. So: the driver plans from headers
only, submits tasks (names and offsets, never weights; each worker reads its own bytes
from the checkpoint path), keeps a bounded number in flight, and writes each finished
task as a report part (`llm_audit.report`).

Cluster: with `--address` or `$RAY_ADDRESS` (what `ray job submit` sets) it joins that
cluster, and first checks that every node sees the checkpoint files at the same path
with the same headers; otherwise it starts a local Ray sized to this machine.
Faults: a task whose worker dies is re-run by Ray (`max_retries`); a matrix that cannot
be read or analyzed is a row with status=error; a task that still fails, or runs past
`task_timeout_s`, gives error rows for its matrices. Ctrl-C or SIGTERM finalizes a
partial report (a second one while it is written is ignored). One run writes a report
folder at a time (`lock_report`).

Why `--resume` compares before it writes: a report that is half one model (or seed) and
half another, labelled `complete`, would pass a release gate it should fail. The old
manifest's model files (bytes and header hash), seed and every config key that decides
which matrices or which numbers (`RESUME_KEYS`) must equal the new run's, or nothing is
touched. Keys that only place the work (backend, CPUs per task, retries, timeouts, memory
budget, spill folder) may differ: they change at most the last bits of an eigenvalue.
"""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import AuditError, UsageError
from ..files import write_json
from ..inputs import shown
from ..report.reader import read_json
from ..report.schema import SCHEMA_VERSION
from ..report.summary import row_counts
from ..report.writer import ReportWriter, lock_report, out_folder_state, remove_report
from ..source.checkpoint import Checkpoint, open_checkpoint
from ..source.plan import MatrixUnit, Plan
from ..source.reference import ResolvedModel, resolve_model
from .cluster import check_nodes, connect, shutdown_local
from .config import AuditConfig
from .tasks import run_tasks


@dataclass(frozen=True)
class AuditResult:
    """What the CLI reports: where, how many, whether anything failed, and the run's
    status ("complete", or "partial" when matrices are missing from the report)."""

    out: Path
    matrices: int
    failed: int
    summary: dict[str, Any]
    status: str = "complete"


def _select(units: list[MatrixUnit], config: AuditConfig) -> list[MatrixUnit]:
    include = [re.compile(p) for p in config.include]
    exclude = [re.compile(p) for p in config.exclude]
    return [
        u
        for u in units
        if (not include or any(p.search(u.id) for p in include))
        and not any(p.search(u.id) for p in exclude)
    ]


def _summary(table: Any, planned: int, plan: Plan) -> dict[str, Any]:
    columns = ["kind", "status", "error_kind", "alpha", "rand_num_spikes", "num_evals", "warning"]
    return {
        "matrices_planned": planned,
        # tensors (or expert slices) the plan does not audit, by reason, and among them
        # the weights left out (formats not read, unknown layouts, too small), not the
        # vectors and the parts read with their weights; `llm-audit plan MODEL` lists each
        "not_planned": plan.skipped_reasons(),
        "weights_not_planned": plan.skipped_reasons(weights_only=True),
        **row_counts(table.select(columns).to_pylist()),
    }


SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 2**16


def data_sample_sha256(path: Path, data_start: int, file_size: int) -> str:
    """SHA-256 of 64 blocks of 64 KiB spread evenly over a file's data area (all of it
    when smaller): two checkpoints of one architecture share their headers, not their
    weights, and 4 MB of reads tell them apart where hashing 65 GB would take minutes."""
    digest = hashlib.sha256()
    span = file_size - data_start
    with path.open("rb") as fh:
        if span <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            fh.seek(data_start)
            digest.update(fh.read(span))
        else:
            step = (span - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                fh.seek(data_start + i * step)
                digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


RESUME_KEYS = ("seed", "randomize", "rand_route", "min_evals", "include", "exclude", "kinds")


def model_files(checkpoint: Checkpoint) -> list[dict[str, Any]]:
    """The model's files as a manifest fingerprints them: name, size, header and data
    SHA-256 (what `--resume` and `ablate` compare before they use a report), and the
    modification time (what `--resume` also compares: a sample cannot see every byte)."""
    return [
        {
            "name": path.name,
            "bytes": header.file_size,
            "header_sha256": header.header_sha256,
            "data_sample_sha256": data_sample_sha256(path, header.data_start, header.file_size),
            "modified_ns": path.stat().st_mtime_ns,
        }
        for path, header in checkpoint.headers.items()
    ]


def _modified(out: Path, old: Mapping[str, Any], files: list[dict[str, Any]]) -> None:
    """Refuse to resume when a model file was modified since the report began: a change
    of a few bytes (5 trap entries zeroed, or put back) keeps size, header and, most
    likely, the sampled blocks; the rows computed before would not be of these weights."""
    model = old.get("model")
    recorded = model.get("files") if isinstance(model, dict) else None
    when = {f.get("name"): f.get("modified_ns") for f in recorded or [] if isinstance(f, dict)}
    for file in files:
        before = when.get(file["name"])
        if before is not None and before != file["modified_ns"]:  # None: an older report
            raise AuditError(
                f"{out}: {file['name']} was modified after this report was begun (same size "
                "and header, new modification time): the matrices computed before may not be "
                "its weights; refusing to resume (start a new report with another --out)"
            )


def _fingerprints(files: Any) -> list[tuple[str, ...]] | None:
    if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
        return None
    keys = ("bytes", "header_sha256", "data_sample_sha256")
    return sorted((shown(f.get("name")), *(shown(f.get(k)) for k in keys)) for f in files)


def file_mismatch(manifest: Mapping[str, Any], files: list[dict[str, Any]]) -> str | None:
    """None if `manifest` (untrusted) records exactly these model `files`; else "" when it
    records no data fingerprints (an older llm-audit), or the name of a file that differs."""
    model = manifest.get("model")
    recorded = _fingerprints(model.get("files") if isinstance(model, dict) else None)
    current = _fingerprints(files)
    if recorded == current:
        return None
    if recorded is None or any(f[3] == "None" for f in recorded):
        return ""
    changed = sorted(set(recorded) ^ set(current or []))
    return changed[0][0] if changed else "the file list"


def check_resumable(out: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Refuse, in one line naming the difference, to resume report `out` (manifest `old`)
    with a run whose manifest would be `new`: other model files, seed or config."""
    if old.get("schema_version") != new["schema_version"]:
        raise AuditError(
            f"{out}: cannot resume a report of schema {shown(old.get('schema_version'))} "
            f"with llm-audit's schema {new['schema_version']}"
        )
    name = file_mismatch(old, new["model"]["files"])
    if name == "":
        raise AuditError(
            f"{out}: manifest.json does not fingerprint its model files (a report of an "
            "older llm-audit?); cannot resume it, start a new one"
        )
    if name is not None:
        raise AuditError(
            f"{out}: the report is of another model: {name} differs (size, header or "
            "data SHA-256); refusing to resume"
        )
    _modified(out, old, new["model"]["files"])
    old_config = old.get("config")
    if not isinstance(old_config, dict):
        raise AuditError(f"{out}: manifest.json has no config; cannot resume")
    for key in RESUME_KEYS:
        before = old.get("seed") if key == "seed" else old_config.get(key)
        after = new["config"][key]
        if before != after:
            raise AuditError(
                f"{out}: the report was computed with {key}={shown(before)}, this run has "
                f"{key}={shown(after)}; refusing to resume (use another --out)"
            )


def _refuse_ray_job_relative(out: Path) -> None:
    """Under `ray job submit --working-dir`, the job runs in Ray's temporary copy of that
    folder, which Ray deletes: a relative --out would put the report there."""
    if not out.is_absolute() and "_ray_pkg_" in str(Path.cwd()):
        raise UsageError(
            f"--out {out} is relative, and this job runs in Ray's temporary copy of its "
            f"working dir ({Path.cwd()}), which Ray deletes: give an absolute --out"
        )


def _check_task_fits(config: AuditConfig) -> None:
    """A task asking for more CPUs than any node has would wait forever, silently."""
    import ray

    cpus = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if config.cpus_per_task > cpus:
        raise AuditError(
            f"cpus_per_task {config.cpus_per_task:g} is more than any node of this cluster "
            f"has ({cpus:g}): no task could ever start"
        )


def _prepare_out(out: Path, resume: bool, overwrite: bool, manifest: dict[str, Any]) -> int:
    """Check `--out` before anything is written; returns how the folder starts: 0 fresh."""
    state = out_folder_state(out)
    if state != "report":
        return 0
    if overwrite:
        remove_report(out)
        return 0
    if not resume:
        raise AuditError(
            f"{out} already holds a report: pass --resume to complete it, --overwrite to "
            "replace it, or choose another --out"
        )
    old = read_json(out / "manifest.json")
    check_resumable(out, old, manifest)
    return 1


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
    retry_failed: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> AuditResult:
    """Audit `reference` into report folder `out` (see the module docstring).

    `out` must be missing, empty, or a report: completed with `resume` (its error rows
    computed again with `retry_failed`), replaced with `overwrite`; anything else is
    refused before a file is written."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    if retry_failed and not resume:
        raise UsageError("--retry-failed goes with --resume")
    started, t0 = _now(), time.perf_counter()
    out = Path(out)
    _refuse_ray_job_relative(out)
    out_folder_state(out)  # refuse a foreign folder before the model is even opened
    model = resolve_model(reference, revision)
    checkpoint = open_checkpoint(model)
    plan = checkpoint.plan(config.min_evals, config.kind_rules())
    units = _select(plan.units, config)
    if plan.units and not units:
        raise AuditError(
            f"include/exclude leave none of the {len(plan.units)} planned matrices to audit "
            "(`llm-audit plan MODEL --format json` lists their ids)"
        )
    timings = {"plan_s": round(time.perf_counter() - t0, 3)}
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": "llm-audit",
        "tool_version": __version__,
        "model": {
            "reference": reference,
            "path": str(model.root),
            "repo_id": model.repo_id,
            "revision": model.revision,
            "files": model_files(checkpoint),
        },
        "config": config.to_dict(),
        "seed": config.seed,
        "status": "running",
        "started": started,
        "driver": socket.gethostname(),
    }
    with lock_report(out):
        resuming = _prepare_out(out, resume, overwrite, manifest)
        writer = ReportWriter(out)
        done = writer.done(retry_failed) if resuming else set()
        todo = [u for u in units if u.id not in done]
        manifest["resumed_from"] = len(done)
        write_json(out / "manifest.json", manifest)
        summary, status = _run(checkpoint, model, todo, units, plan, config, writer, manifest,
                               address, quiet, timings, t0)  # fmt: skip
    if status == "interrupted":
        raise KeyboardInterrupt
    return AuditResult(out, summary["matrices_in_report"], summary["failed"], summary, status)


def _run(
    checkpoint: Checkpoint,
    model: ResolvedModel,
    todo: list[MatrixUnit],
    units: list[MatrixUnit],
    plan: Plan,
    config: AuditConfig,
    writer: ReportWriter,
    manifest: dict[str, Any],
    address: str | None,
    quiet: bool,
    timings: dict[str, float],
    t0: float,
) -> tuple[dict[str, Any], str]:
    """Connect, run the tasks, and finalize the report whatever happens; (summary, status)."""
    import ray

    out = writer.folder
    stats = {"bytes_read": 0, "bytes_on_disk": checkpoint.bytes_on_disk()}
    status, started_local = "failed", False
    handlers = _Handlers()
    sigterm = signal.getsignal(signal.SIGTERM)  # before Ray sets its own, which aborts
    try:
        t1 = time.perf_counter()
        started_local = connect(address)
        timings["connect_s"] = round(time.perf_counter() - t1, 3)
        if sigterm in (None, signal.SIG_DFL):  # nobody else handles it
            handlers.set(signal.SIGTERM, _interrupt)
        manifest["cluster"] = {
            "address": "local" if started_local else "joined",
            "resources": ray.cluster_resources(),
        }
        _check_task_fits(config)
        if not started_local:
            check_nodes(checkpoint)
        t2 = time.perf_counter()
        status = run_tasks(model, todo, config, writer, quiet, stats)
        timings["compute_s"] = round(time.perf_counter() - t2, 3)
    except KeyboardInterrupt:
        status = "interrupted"
        print("llm-audit: interrupted; writing the partial report", file=sys.stderr)
    finally:
        # a second Ctrl-C (or a SIGTERM) now would leave the report unwritten: ignored
        # for the seconds the partial report takes
        handlers.set(signal.SIGINT, signal.SIG_IGN, only_over=signal.default_int_handler)
        handlers.set(signal.SIGTERM, signal.SIG_IGN, only_over=_interrupt)
        if started_local:
            shutdown_local()
        t3 = time.perf_counter()
        table = writer.finalize([u.id for u in units])
        timings["finalize_s"] = round(time.perf_counter() - t3, 3)
        summary = _summary(table, len(units), plan)
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
            computed_this_run=writer.rows_added,  # finished here, not merely scheduled
        )
        write_json(out / "manifest.json", manifest)
        handlers.restore()
    return summary, status


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (timeout, a cancelled CI job, `ray job stop`) as Ctrl-C


class _Handlers:
    """Signal handlers set for a while and put back. Only in the main thread, where Python
    allows them (an API caller may run an audit in another thread); a caller with a
    handler of its own keeps it (`llm-audit grok` stops its loop gracefully on the first
    signal)."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}

    def set(self, signum: int, handler: Any, only_over: Any = None) -> None:
        """Set `handler` for `signum` (only where the current one is `only_over`, if given)."""
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signum)
        if only_over is None or current is only_over:
            signal.signal(signum, handler)
            self.previous.setdefault(signum, signal.SIG_DFL if current is None else current)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()
