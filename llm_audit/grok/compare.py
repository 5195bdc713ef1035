"""Two runs side by side: from which checkpoint a measure keeps one above the other, and
how far apart twins (the same settings in another dtype or on another device) lie.

Why: the question the anti-grokking paper leaves open is whether traps warn of the
collapse earlier than the plain weight statistics do. Comparing a run that collapses with
its weight-decay control at the same checkpoints, each measure gets the first checkpoint
from which it stays on one side of the control's value until the last checkpoint the two
runs share ("separates from"); the earlier a measure separates, the earlier it could have
told the runs apart. A rule this blunt reads no threshold into the data, and the answer
holds only as far as both runs go: a later crossing moves it.

Twins, float32 against float64 (or CUDA against the CPU), differ only in rounding, but
training amplifies rounding: their weights may part while their phases do not. So for
twins each measure gets its largest and its median gap over the shared checkpoints, and
each run its phase landmarks on those checkpoints: whether the phases, the traps and the
collapse move with the number type is read off, not assumed.

The ablation effect of layer M is `ablated_acc.M - test_acc` (test accuracy lost by
zeroing M's trap entries, negative when it hurts); a layer without traps has effect 0,
since nothing is zeroed.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .settings import first_difference
from .timeline import ABLATED_ACC, layers_of, phases
from .train import ABLATED

# The weight statistics the traps are compared with, then test accuracy for reference.
BASE_MEASURES = ("l2_norm", "max_abs_weight", "test_acc")
LAYER_MEASURES = ("trap_ratio", "traps_per_shuffle", "ablation", "alpha")


def measure(row: dict[str, Any], key: str) -> float | None:
    """`key` of a timeline row; `ablation.M` is derived (module docstring)."""
    if key.startswith("ablation."):
        layer = key.removeprefix("ablation.")
        if row.get(f"alpha.{layer}") is None or not row.get(ABLATED):
            return None  # not audited, or written before ablations existed
        ablated = row.get(f"{ABLATED_ACC}{layer}")
        return 0.0 if ablated is None else ablated - row["test_acc"]
    value = row.get(key)
    return None if value is None else float(value)


def separation(
    main: list[dict[str, Any]], control: list[dict[str, Any]], keys: list[str]
) -> dict[str, dict[str, Any]]:
    """Per measure: `from` (the first shared checkpoint after which main - control keeps
    one sign to the last shared checkpoint; None if it does not end on one side), `side`
    ("higher"/"lower": main against control), the two values there and at the last shared
    checkpoint (`last`), over the checkpoints (step >= 1) where both have the measure."""
    shared = _shared(main, control)
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        pairs = _pairs(shared, key)
        if not pairs:
            continue
        signs = [(a > b) - (a < b) for _, a, b in pairs]
        last_sign, start = signs[-1], len(signs)
        while last_sign and start and signs[start - 1] == last_sign:
            start -= 1
        found = pairs[start] if last_sign else None
        out[key] = {
            "from": None if found is None else found[0],
            "side": {1: "higher", -1: "lower", 0: None}[last_sign],
            "at_from": None if found is None else [found[1], found[2]],
            "last": list(pairs[-1]),
        }
    return out


def _shared(
    main: list[dict[str, Any]], other: list[dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The two runs' rows of each checkpoint (step >= 1) both have, in step order."""
    by_step = {r["step"]: r for r in other}
    return [(r, by_step[r["step"]]) for r in main if r["step"] >= 1 and r["step"] in by_step]


def _pairs(
    shared: list[tuple[dict[str, Any], dict[str, Any]]], key: str
) -> list[tuple[int, float, float]]:
    """(step, main's value, the other's) of `key` where both runs have it."""
    return [
        (a["step"], x, y)
        for a, b in shared
        for x, y in [(measure(a, key), measure(b, key))]
        if x is not None and y is not None
    ]


def measure_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The measures compared (separation, divergence): BASE_MEASURES, then
    LAYER_MEASURES for each audited layer."""
    layers = layers_of(rows)
    return [*BASE_MEASURES, *(f"{m}.{x}" for m in LAYER_MEASURES for x in layers)]


def separation_markdown(found: dict[str, dict[str, Any]]) -> str:
    """`separation` as a Markdown table for reports/README.md."""
    lines = [
        "| measure | separates from step | main run vs control | values there (main / control) "
        "| last shared step | values there (main / control) |",
        "|---|---|---|---|---|---|",
    ]
    for key, s in found.items():
        start = "-" if s["from"] is None else f"{s['from']:,}"
        there = "-" if s["at_from"] is None else " / ".join(f"{v:.6g}" for v in s["at_from"])
        step, a, b = s["last"]
        lines.append(
            f"| {key} | {start} | {s['side'] or 'equal'} | {there} | {step:,} | {a:.6g} / {b:.6g} |"
        )
    return "\n".join(lines) + "\n"


# Where two runs of the same settings may part: the phases (phases()'s keys).
LANDMARKS = (
    "grok_start",
    "peak_step",
    "peak_test_acc",
    "fall_start",
    "first_trap",
    "persistent_trap",
    "collapse",
)
# What may differ between twins: the number type, how far each has gone (and, outside the
# config, the device).
TWIN_MAY_DIFFER = ("dtype", "steps")


def twin_mismatch(config: dict[str, Any], other: dict[str, Any]) -> str | None:
    """The first setting, other than TWIN_MAY_DIFFER, in which two run configs differ."""
    key = first_difference(config, other, TWIN_MAY_DIFFER)
    if key is None:
        return None
    return f"it has {key}={other.get(key)!r}, the run {key}={config.get(key)!r}"


def divergence(
    main: list[dict[str, Any]], twin: list[dict[str, Any]], keys: list[str]
) -> dict[str, Any]:
    """How far apart two runs of the same settings lie (float64 and float32, CPU and CUDA),
    over the checkpoints (step >= 1) both have: `landmarks` (each run's phase landmarks,
    [main, twin], found on those checkpoints only) and per measure `largest` (the
    checkpoint where |twin - main| is largest: [step, main, twin]; None where the two are
    equal throughout), `median_abs_diff` and `last` ([step, main, twin] at the last
    shared checkpoint)."""
    shared = _shared(main, twin)
    if not shared:
        return {"landmarks": {}, "measures": {}}
    found = [phases([pair[i] for pair in shared]) for i in (0, 1)]
    out: dict[str, Any] = {
        "landmarks": {k: [found[0][k], found[1][k]] for k in LANDMARKS},
        "measures": {},
    }
    for key in keys:
        pairs = _pairs(shared, key)
        if not pairs:
            continue
        gaps = [abs(y - x) for _, x, y in pairs]
        widest = max(range(len(gaps)), key=gaps.__getitem__)
        out["measures"][key] = {
            "largest": list(pairs[widest]) if gaps[widest] else None,
            "median_abs_diff": float(np.median(gaps)),
            "last": list(pairs[-1]),
        }
    return out


def divergence_markdown(found: dict[str, Any]) -> str:
    """`divergence` as two Markdown tables: the landmarks, then the measures."""

    def cell(value: Any) -> str:
        if value is None:
            return "none"
        return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"

    lines = ["| landmark | main run | twin |", "|---|---|---|"]
    lines += [f"| {k} | {cell(a)} | {cell(b)} |" for k, (a, b) in found["landmarks"].items()]
    lines += [
        "",
        "| measure | largest difference at step | values there (main / twin) "
        "| median difference | last shared step | values there (main / twin) |",
        "|---|---|---|---|---|---|",
    ]
    for key, m in found["measures"].items():
        widest = "equal throughout | -"
        if m["largest"] is not None:
            step, a, b = m["largest"]
            widest = f"{step:,} | {a:.6g} / {b:.6g}"
        last, c, d = m["last"]
        lines.append(
            f"| {key} | {widest} | {m['median_abs_diff']:.3g} | {last:,} | {c:.6g} / {d:.6g} |"
        )
    return "\n".join(lines) + "\n"
