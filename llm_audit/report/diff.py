"""`llm-audit diff A B`: what changed, matrix by matrix, between two reports of one architecture.

Why: the questions are "what did fine-tuning (or 10k more steps) do to the spectra?" and
"where did new traps appear?", so rows are matched by matrix id, shapes must agree, and
new traps come first. Reports of different architectures are refused: comparing a
5760x2880 expert with a 2880x2880 one means nothing.
"""

from __future__ import annotations

from typing import Any

from ..errors import AuditError
from ..inputs import shown
from ..spectral.analyze import traps_per_shuffle
from .reader import Report

COMPARED = (
    "alpha",
    "rand_num_spikes",
    "num_spikes",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "trap_ratio",
)


def _traps(row: dict[str, Any]) -> int:
    return traps_per_shuffle(row["rand_num_spikes"], row["num_evals"])


def _delta(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else b - a


def diff_reports(a: Report, b: Report) -> list[dict[str, Any]]:
    """Rows of (matrix, kind, each compared column in A, in B and its change).

    Sorted: matrices that gained traps first (most gained first), then by |change in alpha|.
    """
    shapes_a = {r["matrix"]: (r["N"], r["M"]) for r in a.rows}
    shapes_b = {r["matrix"]: (r["N"], r["M"]) for r in b.rows}
    if shapes_a.keys() != shapes_b.keys():
        only_a = sorted(shapes_a.keys() - shapes_b.keys())
        only_b = sorted(shapes_b.keys() - shapes_a.keys())
        first = (only_a or only_b)[0]
        raise AuditError(
            f"different architectures: {len(only_a)} matrices only in {a.folder}, "
            f"{len(only_b)} only in {b.folder} (e.g. {shown(first)})"
        )
    for matrix, shape in shapes_a.items():
        if shapes_b[matrix] != shape and None not in shape and None not in shapes_b[matrix]:
            raise AuditError(
                f"different architectures: {shown(matrix)} is {shape[0]}x{shape[1]} in "
                f"{a.folder}, {shapes_b[matrix][0]}x{shapes_b[matrix][1]} in "
                f"{b.folder}"
            )
    by_b = {r["matrix"]: r for r in b.rows}
    out = []
    for ra in a.rows:
        rb = by_b[ra["matrix"]]
        row: dict[str, Any] = {
            "matrix": ra["matrix"],
            "kind": ra["kind"],
            "status_a": ra["status"],
            "status_b": rb["status"],
        }
        for col in COMPARED:
            row[f"{col}_a"], row[f"{col}_b"] = ra[col], rb[col]
            row[f"d_{col}"] = _delta(ra[col], rb[col])
        row["traps_a"], row["traps_b"] = _traps(ra), _traps(rb)
        row["new_traps"] = max(0, row["traps_b"] - row["traps_a"])
        out.append(row)
    out.sort(key=lambda r: (-r["new_traps"], -abs(r["d_alpha"] or 0.0)))
    return out
