"""Checkpoints → audits → one timeline, and the phases read off it.

Why through `run_audit`: the claim being validated is that *our pipeline* sees traps
appear at the collapse, so each checkpoint goes through exactly the code path a large
model does (plan, Ray tasks, report folder), seeded, and only the report is read back.

timeline.parquet: one row per checkpoint: `step`, `train_acc`, `test_acc`, `train_loss`,
`test_loss`, `l2_norm`, `abs_weight_entropy`, `activation_sparsity`,
`circuit_complexity`, `max_abs_weight`, `train_seconds`, then per audited matrix M
`alpha.M`, `traps.M` (rand_num_spikes: correlation traps), `spikes.M` (num_spikes), and
`mean_alpha`, `total_traps`. The file's metadata holds the run's settings (`run`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..files import write_atomic
from ..run.audit import run_audit
from ..run.config import AuditConfig


def layer_name(tensor: str) -> str:
    return tensor.removesuffix(".weight")


def audit_checkpoint(weights: Path, reports: Path, seed: int) -> dict[str, Any]:
    """Audit one checkpoint file (reusing a complete earlier report); its timeline columns."""
    report = reports / weights.stem
    manifest = report / "manifest.json"
    if not (manifest.exists() and json.loads(manifest.read_text()).get("status") == "complete"):
        shutil.rmtree(report, ignore_errors=True)
        run_audit(str(weights), report, AuditConfig(seed=seed), quiet=True)
    rows = pq.read_table(
        report / "layers.parquet", columns=["tensor", "alpha", "rand_num_spikes", "num_spikes"]
    ).to_pylist()
    cols: dict[str, Any] = {}
    for r in rows:
        name = layer_name(r["tensor"])
        cols[f"alpha.{name}"] = r["alpha"]
        cols[f"traps.{name}"] = r["rand_num_spikes"]
        cols[f"spikes.{name}"] = r["num_spikes"]
    alphas = [r["alpha"] for r in rows if r["alpha"] is not None]
    cols["mean_alpha"] = float(np.mean(alphas)) if alphas else None
    cols["total_traps"] = int(sum(r["rand_num_spikes"] or 0 for r in rows))
    return cols


def write_timeline(rows: list[dict[str, Any]], path: Path, run: dict[str, Any]) -> pa.Table:
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"run": json.dumps(run)})
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))
    return table


def layers_of(rows: list[dict[str, Any]]) -> list[str]:
    """Audited matrix names in the order they first appear."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k.startswith("alpha."):
                seen[k.removeprefix("alpha.")] = None
    return list(seen)


def phases(rows: list[dict[str, Any]], fall: float = 0.02) -> dict[str, Any]:
    """Phase boundaries read off the timeline (definitions in reports/README.md).

    - grok_start: first checkpoint with test accuracy within 5 points of its peak;
    - fall_start ("test accuracy starts to fall"): first checkpoint after the peak from
      which test accuracy stays more than `fall` below the peak to the end;
    - first_trap / persistent_trap: first checkpoint with traps > 0 / from which every
      later checkpoint has traps > 0.
    Phases: pre = [1, grok_start), grok = [grok_start, fall_start), anti = [fall_start, end].
    """
    rows = [r for r in rows if r["step"] >= 1]
    steps = np.array([r["step"] for r in rows])
    test = np.array([r["test_acc"] for r in rows])
    traps = np.array([r.get("total_traps") or 0 for r in rows])
    ipeak = int(np.argmax(test))
    peak = float(test[ipeak])
    grok_start = int(steps[np.argmax(test >= peak - 0.05)])
    below = test < peak - fall
    fall_start = None
    for i in range(ipeak + 1, len(rows)):
        if below[i:].all():
            fall_start = int(steps[i])
            break
    first_trap = int(steps[np.argmax(traps > 0)]) if (traps > 0).any() else None
    persistent = None
    for i in range(len(rows)):
        if (traps[i:] > 0).all():
            persistent = int(steps[i])
            break
    bounds = {"pre": (1, grok_start), "grok": (grok_start, fall_start or steps[-1] + 1)}
    if fall_start is not None:
        bounds["anti"] = (fall_start, int(steps[-1]) + 1)
    layers = layers_of(rows)
    table = {}
    for name, (lo, hi) in bounds.items():
        sel = [r for r in rows if lo <= r["step"] < hi]
        if not sel:
            continue
        stat = {
            "steps": [int(sel[0]["step"]), int(sel[-1]["step"])],
            "checkpoints": len(sel),
        }
        for key in ["train_acc", "test_acc"] + [
            f"{m}.{x}" for x in layers for m in ("alpha", "traps")
        ]:
            vals = np.array([r.get(key) for r in sel if r.get(key) is not None], float)
            if len(vals):
                stat[key] = [float(vals.mean()), float(vals.std())]
        table[name] = stat
    return {
        "peak_step": int(steps[ipeak]),
        "peak_test_acc": peak,
        "final_test_acc": float(test[-1]),
        "min_test_acc_after_peak": float(test[ipeak:].min()),
        "grok_start": grok_start,
        "fall_start": fall_start,
        "first_trap": first_trap,
        "persistent_trap": persistent,
        "phases": table,
    }


def _pm(stat: dict[str, Any], key: str, digits: int = 2) -> str:
    if key not in stat:
        return "-"
    mean, std = stat[key]
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def phases_markdown(found: dict[str, Any], layers: list[str]) -> str:
    """The per-phase table (mean ± std over the checkpoints of each phase) and the
    boundaries, as Markdown for reports/README.md."""
    head = ["phase", "steps", "checkpoints", "train acc", "test acc"]
    head += [f"alpha {x}" for x in layers] + [f"traps {x}" for x in layers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, stat in found["phases"].items():
        cells = [name, f"{stat['steps'][0]:,} to {stat['steps'][1]:,}", str(stat["checkpoints"])]
        cells += [_pm(stat, "train_acc", 3), _pm(stat, "test_acc", 3)]
        cells += [_pm(stat, f"alpha.{x}") for x in layers]
        cells += [_pm(stat, f"traps.{x}", 1) for x in layers]
        lines.append("| " + " | ".join(cells) + " |")

    def at(key: str) -> str:
        return "none" if found[key] is None else f"{found[key]:,}"

    lines += [
        "",
        f"Peak test accuracy {found['peak_test_acc']:.3f} at step {found['peak_step']:,}; "
        f"lowest after the peak {found['min_test_acc_after_peak']:.3f}; final "
        f"{found['final_test_acc']:.3f}. Grokking from step {at('grok_start')}; test accuracy "
        f"starts to fall at step {at('fall_start')}; first trap at step {at('first_trap')}; "
        f"traps at every checkpoint from step {at('persistent_trap')}.",
    ]
    return "\n".join(lines) + "\n"
