"""Checkpoints → audits → one timeline, and the phases read off it.

Why through `run_audit`: the claim being validated is that *our pipeline* sees traps
appear at the collapse, so each checkpoint goes through exactly the code path a large
model does (plan, Ray tasks, report folder), seeded, and only the report is read back.
Why ablations: a trap that matters for the collapse should matter for the test accuracy,
so at each checkpoint every layer with traps is evaluated with its trap entries zeroed,
against the same number of random entries of that layer zeroed (the control).

timeline.parquet: one row per checkpoint: `step`, `train_acc`, `test_acc`, `train_loss`,
`test_loss`, `l2_norm`, `abs_weight_entropy`, `activation_sparsity`,
`circuit_complexity`, `max_abs_weight`, `train_seconds`, then per audited matrix M
`alpha.M`, `xmin.M` (where the power-law tail starts), `traps.M` (rand_num_spikes: the
count WeightWatcher gives, pooled over 5 shuffles below 100 eigenvalues),
`traps_per_shuffle.M` (that count per shuffle), `trap_ratio.M` (largest shuffled
eigenvalue over the shuffled bulk edge), `spikes.M` (num_spikes), `ablated_acc.M` (test
accuracy with M's trap entries zeroed) and `control_acc.M` (with as many random entries
of M zeroed; both null where M has no trap), and `mean_alpha`, `total_traps`. The file's
metadata holds the run's settings (`run`).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors import safe_open

from ..files import write_atomic
from ..run.audit import run_audit
from ..run.config import AuditConfig
from ..spectral.ablation import ablate_random, ablate_traps
from ..spectral.analyze import shuffle_replicas

ABLATED_ACC = "ablated_acc."  # + layer: test accuracy with its trap entries zeroed
CONTROL_ACC = "control_acc."  # + layer: with as many random entries of it zeroed
# test accuracy of the checkpoint's model with some of its matrices replaced
Accuracy = Callable[[Mapping[str, np.ndarray]], float]


def layer_name(tensor: str) -> str:
    return tensor.removesuffix(".weight")


def audit_columns(report: Path) -> dict[str, Any]:
    """The timeline columns one checkpoint's audit report gives (any schema version)."""
    names = ["tensor", "alpha", "xmin", "num_evals", "rand_num_spikes", "num_spikes"]
    rows = pq.read_table(report / "layers.parquet", columns=[*names, *_RATIO]).to_pylist()
    cols: dict[str, Any] = {}
    for r in rows:
        name = layer_name(r["tensor"])
        traps = r["rand_num_spikes"]
        cols[f"alpha.{name}"] = r["alpha"]
        cols[f"xmin.{name}"] = r["xmin"]
        cols[f"traps.{name}"] = traps
        cols[f"traps_per_shuffle.{name}"] = (
            None if traps is None else traps / shuffle_replicas(r["num_evals"])
        )
        cols[f"trap_ratio.{name}"] = trap_ratio(r)
        cols[f"spikes.{name}"] = r["num_spikes"]
    alphas = [r["alpha"] for r in rows if r["alpha"] is not None]
    cols["mean_alpha"] = float(np.mean(alphas)) if alphas else None
    cols["total_traps"] = int(sum(r["rand_num_spikes"] or 0 for r in rows))
    return cols


_RATIO = ("max_rand_eval", "rand_bulk_max")  # a version-1 report has no trap_ratio column


def trap_ratio(row: dict[str, Any]) -> float | None:
    """max_rand_eval / rand_bulk_max, the report's `trap_ratio`, from its two parts.

    Why not the report's own column: most committed grok audits are schema version 1,
    which has none (the report reader gives null there); where a report has it, the two
    are equal for every row of reports/grok-*."""
    top, edge = row.get("max_rand_eval"), row.get("rand_bulk_max")
    return None if top is None or not edge else top / edge


def ablation_columns(
    weights: Path, report: Path, accuracy: Accuracy, seed: int, step: int
) -> dict[str, Any]:
    """Test accuracy with each trapped layer's trap entries zeroed, and with as many
    random entries of that layer zeroed (seeded by run seed, step and layer)."""
    rows = pq.read_table(report / "layers.parquet", columns=["tensor", "trap_entries"])
    cols: dict[str, Any] = {}
    with safe_open(weights, "np") as fh:
        for r in rows.to_pylist():
            if not r["trap_entries"]:
                continue
            name = layer_name(r["tensor"])
            matrix = fh.get_tensor(r["tensor"])
            rng = np.random.default_rng([seed, step, zlib.crc32(name.encode())])
            cols[f"{ABLATED_ACC}{name}"] = accuracy({r["tensor"]: ablate_traps(matrix, r)})
            control = ablate_random(matrix, len(r["trap_entries"]), rng)
            cols[f"{CONTROL_ACC}{name}"] = accuracy({r["tensor"]: control})
    return cols


def audit_checkpoint(
    weights: Path, reports: Path, seed: int, step: int, accuracy: Accuracy
) -> dict[str, Any]:
    """Audit one checkpoint file (reusing a complete earlier report); its timeline columns
    and its ablations."""
    report = reports / weights.stem
    if not complete_audit(report):  # a report left unfinished is replaced, nothing else
        run_audit(str(weights), report, AuditConfig(seed=seed), overwrite=True, quiet=True)
    return audit_columns(report) | ablation_columns(weights, report, accuracy, seed, step)


def complete_audit(report: Path) -> bool:
    manifest = report / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("status") == "complete"


def refresh_audit_columns(rows: list[dict[str, Any]], reports: Path) -> list[dict[str, Any]]:
    """`rows` with their audit columns read again from the committed reports, so that a
    timeline written before a column existed gains it (ablations need the weights)."""
    out = []
    for row in rows:
        report = reports / f"step-{row['step']:09d}"
        out.append(row | audit_columns(report) if complete_audit(report) else row)
    return out


def write_timeline(rows: list[dict[str, Any]], path: Path, run: dict[str, Any]) -> pa.Table:
    """timeline.parquet: one row per checkpoint, a column for every key of any row (a
    layer's ablation columns start at its first trap; pyarrow's from_pylist would take
    the first row's keys only), null where a row lacks it."""
    keys = dict.fromkeys(k for r in rows for k in r)
    table = pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys})
    table = table.replace_schema_metadata({"run": json.dumps(run)})
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


STAT_PREFIXES = ("alpha", "traps", "traps_per_shuffle", "trap_ratio")
# The paper's own step windows for its phases (MLP on MNIST): init scale 8 (its main
# setting) and init scale 4 (App. I). Tables in those terms give means, medians and the
# value at each window's right edge (the last checkpoint in it).
PAPER_WINDOWS = {
    8.0: {"pre": (1, 100_000), "grok": (100_000, 1_000_001), "anti": (1_000_001, 10**7 + 1)},
    4.0: {"pre": (100, 50_000), "grok": (50_000, 500_000), "anti": (500_000, 10**7 + 1)},
}


def window_stats(
    rows: list[dict[str, Any]], bounds: Mapping[str, tuple[int, int]]
) -> dict[str, Any]:
    """Per window [lo, hi): its checkpoints, and for accuracies and each layer's alpha and
    traps [mean, std, median, value at the window's last checkpoint]."""
    layers = layers_of(rows)
    keys = ["train_acc", "test_acc"] + [f"{m}.{x}" for x in layers for m in STAT_PREFIXES]
    table = {}
    for name, (lo, hi) in bounds.items():
        sel = [r for r in rows if lo <= r["step"] < hi]
        if not sel:
            continue
        stat: dict[str, Any] = {
            "steps": [int(sel[0]["step"]), int(sel[-1]["step"])],
            "checkpoints": len(sel),
        }
        for key in keys:
            vals = np.array([r.get(key) for r in sel if r.get(key) is not None], float)
            if len(vals):
                last = sel[-1].get(key)
                stat[key] = [
                    float(vals.mean()),
                    float(vals.std()),
                    float(np.median(vals)),
                    None if last is None else float(last),
                ]
        table[name] = stat
    return table


# Anti-grokking established (issue #14's bound for the paper's main run): test accuracy at
# least COLLAPSE below its peak at COLLAPSE_CHECKPOINTS checkpoints in a row.
COLLAPSE, COLLAPSE_CHECKPOINTS = 0.30, 3


def phases(rows: list[dict[str, Any]], fall: float = 0.02) -> dict[str, Any]:
    """Phase boundaries read off the timeline (definitions in reports/README.md).

    - grok_start: first checkpoint with test accuracy within 5 points of its peak;
    - fall_start ("test accuracy starts to fall"): first checkpoint after the peak from
      which test accuracy stays more than `fall` below the peak to the end;
    - first_trap / persistent_trap: first checkpoint with traps > 0 / from which every
      later checkpoint has traps > 0;
    - collapse: the checkpoint at which test accuracy has been at least COLLAPSE below the
      peak for COLLAPSE_CHECKPOINTS checkpoints in a row (anti-grokking established).
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
    collapse, run = None, 0
    for i in range(ipeak + 1, len(rows)):
        run = run + 1 if peak - test[i] >= COLLAPSE - 1e-9 else 0  # accuracies: k/n
        if run == COLLAPSE_CHECKPOINTS:
            collapse = int(steps[i])
            break
    bounds = {"pre": (1, grok_start), "grok": (grok_start, fall_start or steps[-1] + 1)}
    if fall_start is not None:
        bounds["anti"] = (fall_start, int(steps[-1]) + 1)
    table = window_stats(rows, bounds)
    return {
        "peak_step": int(steps[ipeak]),
        "peak_test_acc": peak,
        "final_test_acc": float(test[-1]),
        "min_test_acc_after_peak": float(test[ipeak:].min()),
        "grok_start": grok_start,
        "fall_start": fall_start,
        "first_trap": first_trap,
        "persistent_trap": persistent,
        "collapse": collapse,
        "phases": table,
    }


def _cell(stat: dict[str, Any], key: str, digits: int = 2, median: bool = True) -> str:
    if key not in stat:
        return "-"
    mean, std, med, _ = stat[key]
    text = f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{text} ({med:.{digits}f})" if median else text


def _edge(stat: dict[str, Any], key: str, digits: int = 2) -> str:
    last = stat.get(key, [None] * 4)[3]
    return "-" if last is None else f"{last:.{digits}f}"


def _table(table: dict[str, Any], layers: list[str], cell: Any) -> list[str]:
    head = ["phase", "steps", "checkpoints", "train acc", "test acc"]
    head += [f"alpha {x}" for x in layers] + [f"traps/shuffle {x}" for x in layers]
    head += [f"trap ratio {x}" for x in layers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, stat in table.items():
        cells = [name, f"{stat['steps'][0]:,} to {stat['steps'][1]:,}", str(stat["checkpoints"])]
        cells += [cell(stat, "train_acc", 3), cell(stat, "test_acc", 3)]
        cells += [cell(stat, f"alpha.{x}", 2) for x in layers]
        cells += [cell(stat, f"traps_per_shuffle.{x}", 1) for x in layers]
        cells += [cell(stat, f"trap_ratio.{x}", 2) for x in layers]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def run_phases(rows: list[dict[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    """`phases`, plus `paper_windows`: the same statistics in the paper's own windows,
    for the MLP-on-MNIST settings it reports (init scale 8 and 4)."""
    found = phases(rows)
    windows = PAPER_WINDOWS.get(config.get("init_scale")) if config["task"] == "mlp-mnist" else None
    if windows:
        found["paper_windows"] = window_stats([r for r in rows if r["step"] >= 1], windows)
    return found


def phases_markdown(found: dict[str, Any], layers: list[str]) -> str:
    """The per-phase table (mean ± std, median in brackets, over the checkpoints of each
    phase) and the boundaries, as Markdown for reports/README.md; where `found` has
    `paper_windows`, its table of means and its table of right-edge values."""
    paper = found.get("paper_windows")
    lines = _table(found["phases"], layers, _cell)

    def at(key: str) -> str:
        return "none" if found[key] is None else f"{found[key]:,}"

    lines += [
        "",
        f"Peak test accuracy {found['peak_test_acc']:.3f} at step {found['peak_step']:,}; "
        f"lowest after the peak {found['min_test_acc_after_peak']:.3f}; final "
        f"{found['final_test_acc']:.3f}. Grokking from step {at('grok_start')}; test accuracy "
        f"starts to fall at step {at('fall_start')}; first trap at step {at('first_trap')}; "
        f"traps at every checkpoint from step {at('persistent_trap')}. Anti-grokking "
        f"established ({COLLAPSE * 100:.0f} points below the peak at {COLLAPSE_CHECKPOINTS} "
        f"checkpoints in a row): "
        + ("not reached." if found["collapse"] is None else f"at step {at('collapse')}."),
    ]
    if paper:
        lines += ["", "In the paper's windows (mean ± std, median in brackets):", ""]
        lines += _table(paper, layers, _cell)
        lines += ["", "In the paper's windows, the value at each window's right edge:", ""]
        lines += _table(paper, layers, _edge)
    return "\n".join(lines) + "\n"
