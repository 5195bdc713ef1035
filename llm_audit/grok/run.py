"""`llm-audit grok`: one run folder from settings to timeline, plots and phases.

Run folder: run.json (settings, data source, tool version), checkpoints/ (weights per
checkpoint step, safetensors), audits/ (one audit report per checkpoint),
metrics.jsonl (one row per checkpoint, appended as they come), state.safetensors (the
resume point), timeline.parquet, phases.json, phases.md and timeline.png.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..audit import connect
from ..config import AuditConfig
from ..errors import AuditError
from ..report import write_json
from .plots import plot_timeline
from .settings import GrokConfig
from .tasks import build_task
from .timeline import audit_checkpoint, layers_of, phases, phases_markdown, write_timeline
from .train import read_metrics, train


def data_cache() -> Path:
    """Where MNIST is cached as .npz: $LLM_AUDIT_CACHE or ~/.cache/llm-audit."""
    root = os.environ.get("LLM_AUDIT_CACHE") or Path.home() / ".cache" / "llm-audit"
    return Path(root) / "mnist.npz"


def _check_same(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    for key in sorted(set(old) | set(new)):
        if key != "steps" and old.get(key) != new.get(key):  # a run may be extended
            raise AuditError(
                f"{out}: cannot resume with {key}={new.get(key)!r}; the run was started with "
                f"{key}={old.get(key)!r}"
            )


def run_grok(
    config: GrokConfig,
    out: str | Path,
    *,
    data: str | Path | None = None,
    resume: bool = False,
    threads: int = 1,
    device: str = "auto",
) -> dict[str, Any]:
    """Train, audit every checkpoint, write the timeline; the phases found.

    `device` "auto" trains on CUDA where torch sees it, else on the CPU.
    """
    out = Path(out)
    run_file = out / "run.json"
    if run_file.exists():
        if not resume:
            raise AuditError(f"{out} already holds a run: pass --resume, or choose another --out")
        _check_same(json.loads(run_file.read_text())["config"], config.to_dict(), out)
    elif resume:
        raise AuditError(f"{out}: nothing to resume (no run.json)")
    torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise AuditError("--device cuda: torch sees no CUDA device")
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
    out.mkdir(parents=True, exist_ok=True)
    write_json(run_file, run)
    import ray

    started = connect(None, AuditConfig(seed=config.seed))
    try:
        rows = train(
            task,
            config,
            out,
            lambda step, weights: audit_checkpoint(weights, out / "audits", config.seed),
            resume,
        )
    finally:
        if started:
            ray.shutdown()
    return summarize(out, rows, run)


def summarize(out: Path, rows: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    """timeline.parquet, phases.json, phases.md and timeline.png from the metrics rows."""
    write_timeline(rows, out / "timeline.parquet", run)
    found = phases(rows)
    write_json(out / "phases.json", found)
    (out / "phases.md").write_text(phases_markdown(found, layers_of(rows)))
    c = run["config"]
    title = (
        f"{c['task']}: init scale {c['init_scale']}, weight decay {c['weight_decay']}, "
        f"lr {c['lr']}, {c['dtype']}, seed {c['seed']}; data: {run['data_source']}; "
        f"{rows[-1]['step']:,} of {c['steps']:,} steps"
    )
    plot_timeline(rows, found, out / "timeline.png", title)
    return found


def summarize_run(out: str | Path) -> dict[str, Any]:
    """`summarize` a run folder as it is now: a run still going, or stopped part-way."""
    out = Path(out)
    try:
        run = json.loads((out / "run.json").read_text())
        rows = read_metrics(out / "metrics.jsonl")
    except (OSError, json.JSONDecodeError) as err:
        raise AuditError(f"{out}: not a grok run folder ({err})") from None
    if not rows:
        raise AuditError(f"{out}: no checkpoint done yet")
    return summarize(out, rows, run)
