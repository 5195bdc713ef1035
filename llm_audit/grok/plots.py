"""The timeline against step on a log axis: accuracy, alpha, traps, trap strength, the
ablations and the other measures.

Why one figure of panels sharing the step axis: the question is what moves when, so the
phase boundaries (dashed lines) must line up across all signals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .timeline import ABLATED_ACC, CONTROL_ACC, layers_of

MEASURES = ("l2_norm", "abs_weight_entropy", "activation_sparsity", "circuit_complexity")


def plot_timeline(
    rows: list[dict[str, Any]], phase_info: dict[str, Any], path: Path, title: str
) -> None:
    """Write the six-panel PNG to `path` (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["step"] >= 1]
    step = np.array([r["step"] for r in rows])
    fig, axes = plt.subplots(6, 1, figsize=(9, 17), sharex=True)
    layers = layers_of(rows)

    def series(key: str) -> list[Any]:
        return [r.get(key) for r in rows]

    ax = axes[0]
    ax.plot(step, [r["train_acc"] for r in rows], label="train accuracy")
    ax.plot(step, [r["test_acc"] for r in rows], label="test accuracy")
    ax.set_ylabel("accuracy")
    ax = axes[1]
    for layer in layers:
        ax.plot(step, series(f"alpha.{layer}"), label=f"alpha {layer}")
    ax.plot(step, [r.get("mean_alpha") for r in rows], "k--", label="mean alpha")
    ax.axhline(2.0, color="grey", lw=0.8)
    ax.set_ylim(0, 12)  # WeightWatcher-style fits of a near-Gaussian ESD can give alpha > 20
    ax.set_ylabel("alpha (clipped at 12)")
    ax = axes[2]
    for layer in layers:
        ax.plot(step, series(f"traps_per_shuffle.{layer}"), label=f"traps {layer}")
    ax.set_ylabel("correlation traps\n(per shuffle)")
    ax = axes[3]
    for layer in layers:
        ax.plot(step, series(f"trap_ratio.{layer}"), label=f"trap ratio {layer}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("largest shuffled eigenvalue\n/ shuffled bulk edge")
    ax = axes[4]
    ax.plot(step, series("test_acc"), "k", lw=1.5, label="test accuracy")
    for layer in layers:
        ablated = series(f"{ABLATED_ACC}{layer}")
        (line,) = ax.plot(step, ablated, "o", ms=3, label=f"{layer} traps 0")
        control = series(f"{CONTROL_ACC}{layer}")
        ax.plot(step, control, "x", ms=3, color=line.get_color(), label=f"{layer} random 0")
    ax.set_ylabel("test accuracy,\nentries zeroed")
    ax = axes[5]
    for key in MEASURES:
        v = np.array([r[key] for r in rows], float)
        span = np.ptp(v) or 1.0
        ax.plot(step, (v - v.min()) / span, label=key.replace("_", " "))
    ax.set_ylabel("measure (min-max scaled)")
    ax.set_xlabel("step")
    marks = {"grok_start": ("green", "--"), "fall_start": ("red", "--"), "first_trap": ("red", ":")}
    for ax in axes:
        ax.set_xscale("log")
        for key, (color, style) in marks.items():
            if phase_info.get(key):
                label = key.replace("_", " ") if ax is axes[0] else None
                ax.axvline(phase_info[key], color=color, ls=style, lw=0.9, label=label)
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
