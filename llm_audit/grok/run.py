"""`llm-audit grok`: one run folder from settings to timeline, plots and phases.

Run folder: run.json (settings, data source, tool version), checkpoints/ (weights per
checkpoint step, safetensors), audits/ (one audit report per checkpoint),
metrics.jsonl (one row per checkpoint, appended as they come), state.safetensors (the
resume point), timeline.parquet, phases.json, phases.md and timeline.png; with
--init-from, init.safetensors (the state the run started from).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import AuditError
from ..files import write_atomic, write_json
from ..inputs import read_capped
from ..run.cluster import connect, shutdown_local
from .plots import plot_timeline
from .settings import GrokConfig, check_threads, first_difference
from .tasks import build_task
from .timeline import (
    audit_checkpoint,
    layers_of,
    phases_markdown,
    refresh_audit_columns,
    run_phases,
    write_timeline,
)
from .train import read_metrics, state_step, train


def data_cache() -> Path:
    """Where MNIST is cached as .npz: $LLM_AUDIT_CACHE or ~/.cache/llm-audit."""
    root = os.environ.get("LLM_AUDIT_CACHE") or Path.home() / ".cache" / "llm-audit"
    return Path(root) / "mnist.npz"


def _check_same(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    key = first_difference(old, new, ("steps",))  # a run may be extended
    if key is not None:
        raise AuditError(
            f"{out}: cannot resume with {key}={new.get(key)!r}; the run was started with "
            f"{key}={old.get(key)!r}"
        )


INIT_STATE = "init.safetensors"
FLUSHED_FROM = "denormals_flushed_from_step"  # run.json: the step --flush-denormals began
MAX_RUN_JSON_BYTES = 2**20  # a run's settings: about 1 KB
# What a run started from another run's state must share with it: the model's shape and
# dtype, and the seed, which fixes the training/test split and the batches.
_SAME_MODEL_AND_DATA = ("task", "seed", "dtype", "n_train", "width", "p", "train_fraction")


def _run_json(path: Path, flag: str = "") -> dict[str, Any]:
    """A run folder's run.json, checked to be an object with a `config` object: the folder
    may be anyone's (`--resume` into the wrong one, `--init-from`)."""
    try:
        run = json.loads(read_capped(path, MAX_RUN_JSON_BYTES))
        if not isinstance(run, dict) or not isinstance(run.get("config"), dict):
            raise TypeError("no 'config' object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise AuditError(
            f"{flag}{path.parent}: not a grok run folder ({path.name}: {err})"
        ) from None
    return run


def _init_source(source: Path, config: GrokConfig, out: Path) -> dict[str, Any]:
    """Copy `source`'s resume state into `out` (init.safetensors: the run folder stays
    self-contained even if `source` goes on); what run.json records of the source."""
    other = _run_json(source / "run.json", "--init-from ")["config"]
    for key in _SAME_MODEL_AND_DATA:
        if other.get(key) != getattr(config, key):
            raise AuditError(
                f"--init-from {source}: it has {key}={other.get(key)!r}, this run "
                f"{key}={getattr(config, key)!r}; they must be equal"
            )
    try:
        data = (source / "state.safetensors").read_bytes()
    except OSError as err:
        raise AuditError(f"--init-from {source}: no checkpoint to start from ({err})") from None
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / INIT_STATE, lambda tmp: tmp.write_bytes(data))
    try:
        step = state_step(out / INIT_STATE)
    except AuditError as err:
        raise AuditError(f"--init-from {source}: unreadable state.safetensors ({err})") from None
    return {
        "run": str(source),
        "step": step,
        "state_sha256": hashlib.sha256(data).hexdigest(),
        "config": other,
    }


def _flushed_from(out: Path, old: dict[str, Any], flush: bool) -> int | None:
    """The step from which the run trained with denormals flushed (run.json keeps it once
    set): the resumed state's step when this session is the first to flush."""
    if FLUSHED_FROM in old:
        return int(old[FLUSHED_FROM])
    if not flush:
        return None
    state = out / "state.safetensors"
    return state_step(state) if state.exists() else 0


def run_grok(
    config: GrokConfig,
    out: str | Path,
    *,
    data: str | Path | None = None,
    resume: bool = False,
    threads: int = 1,
    device: str = "auto",
    init_from: str | Path | None = None,
    flush_denormals: bool = False,
) -> dict[str, Any]:
    """Train, audit every checkpoint, write the timeline; the phases found.

    `device` "auto" trains on CUDA where torch sees it, else on the CPU. `init_from`
    (a run folder) starts from that run's saved state, weights and optimizer moments,
    instead of a fresh initialization: how a grokked model is trained on under other
    settings (e.g. without weight decay).

    `flush_denormals` trains with the CPU's denormal (subnormal) numbers read and written
    as zero. Late in a float64 run without weight decay most of Adam's moments are
    subnormal (below 2.2e-308), and the CPU's slow path for them made the init-8 run 2.7x
    slower on one machine (1.08x on an AMD EPYC: it depends on the CPU). Since Adam
    divides by sqrt(v) + eps with eps = 1e-8, an update made of them is below the last bit
    of any weight over ~1e-290, so the weights stay the same bit for bit (a test shows it;
    reports/README.md gives the measurement on the committed run). The setting is the
    calling thread's (torch's other threads keep theirs), so it needs threads=1.
    run.json records the step from which a run used it.
    """
    check_threads(threads)
    out = Path(out)
    run_file = out / "run.json"
    origin, old = None, {}
    if run_file.exists():
        if not resume:
            raise AuditError(f"{out} already holds a run: pass --resume, or choose another --out")
        if init_from is not None:
            raise AuditError("--init-from starts a run; --resume continues one: pass one of them")
        old = _run_json(run_file)
        _check_same(old["config"], config.to_dict(), out)
        origin = old.get("init_from")
    elif resume:
        raise AuditError(f"{out}: nothing to resume (no run.json)")
    elif init_from is not None:
        origin = _init_source(Path(init_from), config, out)
    torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise AuditError("--device cuda: torch sees no CUDA device")
    if flush_denormals and device != "cpu":
        raise AuditError("--flush-denormals sets the CPU's arithmetic: train with --device cpu")
    if flush_denormals and threads != 1:  # torch's threads keep their own setting
        raise AuditError(
            "--flush-denormals sets the calling thread's arithmetic: train with --threads 1"
        )
    # before run.json records it; setting the default (off) is how torch says it can
    if flush_denormals and not torch.set_flush_denormal(False):
        raise AuditError("--flush-denormals: this CPU cannot flush denormal numbers")
    task = build_task(config, data, data_cache()).to(torch.device(device))
    run = {
        "tool": "llm-audit",
        "tool_version": __version__,
        "config": config.to_dict(),
        "data_source": task.data_source,
        "train_examples": len(task.train_x),
        "test_examples": len(task.test_x),
        "torch": torch.__version__,
        "device": device,
    }
    if origin is not None:
        run["init_from"] = origin
    flushed_from = _flushed_from(out, old, flush_denormals)
    if flushed_from is not None:
        run[FLUSHED_FROM] = flushed_from
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_file, run)
    torch.set_flush_denormal(flush_denormals)
    started = connect(None)
    try:
        rows = train(
            task,
            config,
            out,
            lambda step, weights, accuracy: audit_checkpoint(
                weights, out / "audits", config.seed, step, accuracy
            ),
            resume,
            out / INIT_STATE if origin and not resume else None,
        )
    finally:
        torch.set_flush_denormal(False)
        if started:
            shutdown_local()
    return summarize(out, rows, run)


def summarize(out: Path, rows: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """timeline.parquet, phases.json, phases.md and timeline.png from the metrics rows
    (their audit columns read again from the run's audit reports)."""
    rows = refresh_audit_columns(rows, out / "audits")
    write_timeline(rows, out / "timeline.parquet", run)
    found = run_phases(rows, run["config"])
    write_json(out / "phases.json", found)
    (out / "phases.md").write_text(phases_markdown(found, layers_of(rows)))
    c = run["config"]
    title = (
        f"{c['task']}: init scale {c['init_scale']}, weight decay {c['weight_decay']}, "
        f"lr {c['lr']}, {c['dtype']}, seed {c['seed']}; data: {run['data_source']}; "
        f"{rows[-1]['step']:,} of {c['steps']:,} steps"
    )
    if origin := run.get("init_from"):
        title += f"; started from {Path(origin['run']).name} at its step {origin['step']:,}"
    plot_timeline(rows, found, out / "timeline.png", title)
    return found


def read_run(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A run folder's run.json and metrics rows, checked: it may be anyone's folder (what
    --summary-only summarizes, a run still going or stopped part-way, --control, --twin)."""
    try:
        run = json.loads(read_capped(out / "run.json", MAX_RUN_JSON_BYTES))
        rows = read_metrics(out / "metrics.jsonl")
        if not isinstance(run, dict) or not all(isinstance(r["step"], int) for r in rows):
            raise TypeError("run.json is not an object or a metrics row has no integer step")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise AuditError(f"{out}: not a grok run folder ({err})") from None
    if not rows:
        raise AuditError(f"{out}: no checkpoint done yet")
    return run, rows
