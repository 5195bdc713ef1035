"""summary.json's counts, from a report's rows: one definition for the audit that writes
them and for every reader.

Why readers recompute them: a report folder may come from someone else, and summary.json
is a copy of what the rows say. `report show` and the HTML page printed its counts as
they were, so a summary edited to `total_traps: 0` headlined "traps 0" above rows with
traps, while `check`, counting from the rows, failed the gate. The rows are the report;
the counts shown are theirs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ..spectral.analyze import traps_per_shuffle


def row_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The summary's counts of `rows` (layers.parquet rows): matrices by status, failures
    by kind, traps (per shuffle, `traps_per_shuffle`), mean alpha by kind, warnings."""
    rows = list(rows)
    alphas: dict[str, list[float]] = {}
    for r in rows:
        if r["alpha"] is not None:
            alphas.setdefault(r["kind"], []).append(r["alpha"])
    traps = [traps_per_shuffle(r["rand_num_spikes"], r["num_evals"]) for r in rows]
    failed = Counter(r["error_kind"] or "data" for r in rows if r["status"] == "error")
    return {
        "matrices_in_report": len(rows),
        "audited": sum(r["status"] == "ok" for r in rows),
        "skipped": sum(r["status"] == "skipped" for r in rows),
        "failed": sum(r["status"] == "error" for r in rows),
        "failed_by_kind": dict(failed),
        "bugs": failed.get("bug", 0),
        "matrices_with_traps": sum(t > 0 for t in traps),
        "total_traps": sum(traps),
        "mean_alpha_by_kind": {k: sum(v) / len(v) for k, v in sorted(alphas.items())},
        "warnings": dict(Counter(r["warning"] for r in rows if r["warning"])),
    }
