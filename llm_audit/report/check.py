"""`llm-audit check`: a release gate over a report, with rules in YAML and JUnit output.

Why rules in a file: what counts as a regression differs by model family and by team, and
a CI job should state its own limits beside the model it gates. Every violation names the
matrix (or kind) and the numbers, so a failed gate says what to look at.

Why some checks are not rules: a gate that passes an audit which never finished — status
`interrupted`, or fewer matrices than were planned — or one that finished without
auditing a single matrix (a checkpoint whose tensors were all skipped, every matrix
failed) passes a model nobody audited, and every rule holds vacuously over no matrices.
So `report_complete` is always checked, as its own JUnit case, whatever the rules file
says. With a baseline report (`--baseline`, the last released model) the gate also fails
on regressions, computed by `diff`: new traps in matrices that had none, newly failed
matrices, and mean alpha per kind drifting further than `max_alpha_drift_per_kind`; a
baseline must pass `report_complete` too (subject `baseline`), since regressions against
a model nobody audited are checked against nothing.

JUnit: one test case per rule and violating subject (a matrix, a kind, or the model), or
one passing case per rule without violations; `tests` and `failures` count those cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from ..errors import AuditError
from ..inputs import is_count, read_yaml, shown
from ..source.roles import KINDS
from ..spectral.analyze import traps_per_shuffle
from ..spectral.columns import OVER_TRAINED, UNDER_TRAINED
from .diff import diff_reports
from .format import format_value, printable
from .reader import Report

RULE_KEYS = {
    "max_traps_per_matrix": "int",
    "max_traps_per_kind": "dict",
    "max_total_traps": "int",
    "alpha_range": "range",
    "max_share_alpha_outside": "share",
    "max_failed": "int",
    "min_trap_ratio": "number",
    "max_alpha_drift_per_kind": "number",
}
COMPLETE = "report_complete"  # always checked
TRAP_RULES = ("max_traps_per_matrix", "max_traps_per_kind", "max_total_traps")
BASELINE_RULES = ("baseline_new_traps", "baseline_newly_failed")  # with --baseline
BASELINE_ONLY = ("max_alpha_drift_per_kind",)
MODIFIERS = ("min_trap_ratio",)  # change how other rules count; not checks themselves


# The documented default, configs/release-check.yaml (a test keeps the two equal).
DEFAULT_RULES: dict[str, Any] = {
    "max_traps_per_matrix": 0,
    "max_traps_per_kind": {},
    "max_total_traps": 0,
    "alpha_range": [OVER_TRAINED, UNDER_TRAINED],
    "max_share_alpha_outside": 0.5,
    "max_failed": 0,
    "max_alpha_drift_per_kind": 0.5,
}


@dataclass
class Rules:
    """Limits; a missing key is not checked."""

    values: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_RULES))

    def checks(self, baseline: bool) -> list[str]:
        """The names of the JUnit test cases' rules, in order."""
        names = [COMPLETE]
        for key in self.values:
            if key in MODIFIERS or (key in BASELINE_ONLY and not baseline):
                continue
            if key == "alpha_range" and "max_share_alpha_outside" in self.values:
                continue  # checked as max_share_alpha_outside
            names.append(key)
        return names + list(BASELINE_RULES if baseline else ())


@dataclass(frozen=True)
class Violation:
    rule: str
    subject: str
    message: str


def _bad(path: Path, key: str, expected: str, value: Any) -> AuditError:
    return AuditError(f"{path}: rule {key} must be {expected}, got {shown(value)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def load_rules(path: str | Path) -> Rules:
    """Parse and validate a rules file (see configs/release-check.yaml)."""
    path = Path(path)
    data = read_yaml(path, "rules")
    if not isinstance(data, dict):
        raise AuditError(f"{path}: rules are a mapping of rule names to limits")
    for key, value in data.items():
        kind = RULE_KEYS.get(key)
        if kind is None:
            raise AuditError(f"{path}: unknown rule {shown(key)}; known: {', '.join(RULE_KEYS)}")
        if kind == "int" and not is_count(value):
            raise _bad(path, key, "a non-negative integer", value)
        if kind == "number" and not (_is_number(value) and 0 <= value < float("inf")):
            raise _bad(path, key, "a non-negative number", value)
        if kind == "share" and not (_is_number(value) and 0 <= value <= 1):
            raise _bad(path, key, "a share between 0 and 1", value)
        if kind == "range" and not (
            isinstance(value, list)
            and len(value) == 2
            and all(_is_number(v) for v in value)
            and value[0] < value[1]
        ):
            raise _bad(path, key, "[low, high] with low < high", value)
        if kind == "dict" and not (
            isinstance(value, dict)
            and all(isinstance(k, str) for k in value)
            and all(is_count(v) for v in value.values())
        ):
            raise _bad(path, key, "a mapping of kinds to non-negative integers", value)
    if ("alpha_range" in data) != ("max_share_alpha_outside" in data):
        raise AuditError(
            f"{path}: alpha_range and max_share_alpha_outside go together (the range, and "
            "the share of matrices allowed outside it): give both or neither"
        )
    return Rules(data)


def trap_count(row: dict[str, Any], min_ratio: float | None) -> int:
    """Traps of a matrix per shuffle; with `min_ratio`, only those whose own ratio to the
    shuffled bulk edge is at least that (a version-1 report has no ratios: every trap
    counts). WeightWatcher's `rand_num_spikes` pools 5 shuffles below 100 eigenvalues, so
    one trap in a router of 32 experts is 5 there; the gate counts ceil(pooled / 5), the
    number of entries behind them (`trap_entries`): `traps_per_shuffle`."""
    ratios = row.get("trap_ratios")
    if min_ratio is None or ratios is None:
        pooled = row["rand_num_spikes"]
    else:
        pooled = sum(r is not None and r >= min_ratio for r in ratios)
    return traps_per_shuffle(pooled, row["num_evals"])


def _nothing_audited(report: Report) -> str:
    """Why `report`, finished and whole, holds no audited matrix: the plan was empty, or
    every matrix was skipped or failed (the first failure, else the first skip, named)."""
    if not report.rows:
        reference = report.manifest["model"]["reference"]
        return (
            f"{report.folder}: no matrix audited: 0 matrices planned (no tensor llm-audit "
            f"audits, or the config's include/exclude left none; `llm-audit plan {reference}` "
            "lists the tensors skipped and why)"
        )
    skipped = [row for row in report.rows if row["status"] == "skipped"]
    failed = [row for row in report.rows if row["status"] == "error"]
    first = (failed or skipped)[0]
    why = first["error"] if first["status"] == "error" else first["reason"]
    return (
        f"{report.folder}: no matrix audited: 0 of {len(report.rows)} matrices ok "
        f"({len(skipped)} skipped, {len(failed)} failed); first: {first['matrix']}: {why}"
    )


def _completeness(report: Report, subject: str) -> list[Violation]:
    """`report_complete` for `report`: finished, every planned matrix in it, at least one
    audited (`subject` is "model", or "baseline" for the --baseline report)."""
    status = report.manifest.get("status")
    planned = report.summary.get("matrices_planned")
    matrices = [row["matrix"] for row in report.rows]
    if status != "complete":
        message = f"status is {shown(status)}, not 'complete' (finish it with audit --resume)"
    elif planned != len(matrices):
        message = f"{len(matrices)} matrices in the report, {shown(planned)} planned"
    elif not any(row["status"] == "ok" for row in report.rows):
        message = _nothing_audited(report)
    else:
        return []
    return [Violation(COMPLETE, subject, message)]


def _baseline(
    report: Report, baseline: Report, r: dict[str, Any], min_ratio: float | None
) -> list[Violation]:
    out: list[Violation] = []
    before = {row["matrix"]: row for row in baseline.rows}
    after = {row["matrix"]: row for row in report.rows}
    diffs = diff_reports(baseline, report)  # refuses two architectures in one line
    for d in diffs:
        old, new = (
            trap_count(before[d["matrix"]], min_ratio),
            trap_count(after[d["matrix"]], min_ratio),
        )
        if old == 0 and new > 0:
            out.append(
                Violation("baseline_new_traps", d["matrix"], f"0 traps in the baseline, {new} now")
            )
    for d in diffs:
        if d["status_b"] == "error" and d["status_a"] != "error":
            out.append(
                Violation(
                    "baseline_newly_failed",
                    d["matrix"],
                    f"{d['status_a']} in the baseline, error now: {after[d['matrix']]['error']}",
                )
            )
    if "max_alpha_drift_per_kind" in r:
        by_kind: dict[str, tuple[list[float], list[float]]] = {}
        for d in diffs:
            if d["alpha_a"] is not None and d["alpha_b"] is not None:
                pair = by_kind.setdefault(d["kind"] or "-", ([], []))
                pair[0].append(d["alpha_a"])
                pair[1].append(d["alpha_b"])
        for kind, (a, b) in sorted(by_kind.items()):
            drift = sum(b) / len(b) - sum(a) / len(a)
            if abs(drift) > r["max_alpha_drift_per_kind"]:
                out.append(
                    Violation(
                        "max_alpha_drift_per_kind",
                        kind,
                        f"mean alpha {sum(a) / len(a):.3f} -> {sum(b) / len(b):.3f} "
                        f"(|{drift:+.3f}| > {r['max_alpha_drift_per_kind']})",
                    )
                )
    return out


def evaluate(report: Report, rules: Rules, baseline: Report | None = None) -> list[Violation]:
    """Every violation of `rules` in `report` (and against `baseline`), rule by rule."""
    r = rules.values
    rows = report.rows
    min_ratio = r.get("min_trap_ratio")
    out = _completeness(report, "model")
    if baseline is not None:
        out += _completeness(baseline, "baseline")
    traps = {row["matrix"]: trap_count(row, min_ratio) for row in rows}
    # an audited matrix without a trap count (audited with randomize off) is not 0 traps
    uncounted = [
        row["matrix"] for row in rows if row["status"] == "ok" and row["rand_num_spikes"] is None
    ]
    if uncounted:
        why = (
            f"{len(uncounted)} audited matrices have no trap count (rand_num_spikes null: "
            f"audited without the shuffle?), first {uncounted[0]}: traps cannot be checked"
        )
        out += [Violation(rule, "model", why) for rule in TRAP_RULES if rule in r]
    if "max_traps_per_matrix" in r:
        limit = r["max_traps_per_matrix"]
        for row in rows:
            if traps[row["matrix"]] > limit:
                out.append(
                    Violation(
                        "max_traps_per_matrix",
                        row["matrix"],
                        f"{traps[row['matrix']]} traps > {limit} (kind {row['kind']}, "
                        f"max |w| {format_value(row['max_abs_entry'])}, entry kurtosis "
                        f"{format_value(row['entry_kurtosis'])}, trap ratio "
                        f"{format_value(row.get('trap_ratio'))})",
                    )
                )
    if "max_traps_per_kind" in r:
        present = {row["kind"] for row in rows}
        for kind, limit in r["max_traps_per_kind"].items():
            if kind not in present and kind not in KINDS:  # a typo would check nothing
                why = f"no matrix has this kind, and llm-audit has no such kind: {', '.join(KINDS)}"
                out.append(Violation("max_traps_per_kind", kind, why))
                continue
            total = sum(traps[row["matrix"]] for row in rows if row["kind"] == kind)
            if total > limit:
                out.append(Violation("max_traps_per_kind", kind, f"{total} traps > {limit}"))
    if "max_total_traps" in r and sum(traps.values()) > r["max_total_traps"]:
        out.append(
            Violation(
                "max_total_traps", "model", f"{sum(traps.values())} traps > {r['max_total_traps']}"
            )
        )
    if "alpha_range" in r and "max_share_alpha_outside" in r:
        low, high = r["alpha_range"]
        alphas = [row for row in rows if row["alpha"] is not None]
        outside = [row for row in alphas if not low <= row["alpha"] <= high]
        share = len(outside) / len(alphas) if alphas else 0.0
        if share > r["max_share_alpha_outside"]:
            worst = ", ".join(f"{row['matrix']} ({row['alpha']:.2f})" for row in outside[:3])
            out.append(
                Violation(
                    "max_share_alpha_outside",
                    "model",
                    f"{len(outside)} of {len(alphas)} matrices ({share:.1%}) have "
                    f"alpha outside [{low}, {high}] > {r['max_share_alpha_outside']:.1%}; "
                    f"e.g. {worst}",
                )
            )
    if "max_failed" in r:
        failed = [row for row in rows if row["status"] == "error"]
        if len(failed) > r["max_failed"]:
            first = failed[0]
            out.append(
                Violation(
                    "max_failed",
                    "model",
                    f"{len(failed)} matrices failed > {r['max_failed']}; first: "
                    f"{first['matrix']}: {first['error']}",
                )
            )
    if baseline is not None:
        out += _baseline(report, baseline, r, min_ratio)
    return out


def junit_xml(
    report: Report, rules: Rules, violations: list[Violation], baseline: bool = False
) -> bytes:
    """One test case per rule and violating subject, or per rule without violations;
    the suite's `tests` and `failures` count those cases. Every string is `printable`:
    no character XML 1.0 cannot hold, so the file always parses."""
    cases: list[tuple[str, Violation | None]] = []
    for rule in rules.checks(baseline):
        broken = [v for v in violations if v.rule == rule]
        cases += [(f"{rule}: {v.subject}", v) for v in broken] or [(rule, None)]
    suite = ET.Element(
        "testsuite",
        name=printable(f"llm-audit check {report.folder}"),
        tests=str(len(cases)),
        failures=str(sum(v is not None for _, v in cases)),
        errors="0",
    )
    for name, violation in cases:
        case = ET.SubElement(suite, "testcase", classname="llm-audit.check", name=printable(name))
        if violation is not None:
            text = printable(f"{violation.subject}: {violation.message}")
            ET.SubElement(case, "failure", message=text).text = text
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True)
