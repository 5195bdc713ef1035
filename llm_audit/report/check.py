"""`llm-audit check`: a release gate over a report, with rules in YAML and JUnit output.

Why rules in a file: what counts as a regression differs by model family and by team, and
a CI job should state its own limits beside the model it gates. Every violation names the
matrix (or kind) and the numbers, so a failed gate says what to look at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from ..errors import AuditError
from ..inputs import read_yaml
from .reader import Report

RULE_KEYS = {
    "max_traps_per_matrix": "int",
    "max_traps_per_kind": "dict",
    "max_total_traps": "int",
    "alpha_range": "range",
    "max_share_alpha_outside": "share",
    "max_failed": "int",
}


# The documented default, configs/release-check.yaml (a test keeps the two equal).
DEFAULT_RULES: dict[str, Any] = {
    "max_traps_per_matrix": 0,
    "max_traps_per_kind": {},
    "max_total_traps": 0,
    "alpha_range": [2.0, 6.0],
    "max_share_alpha_outside": 0.5,
    "max_failed": 0,
}


@dataclass
class Rules:
    """Limits; a missing key is not checked."""

    values: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_RULES))


@dataclass(frozen=True)
class Violation:
    rule: str
    subject: str
    message: str


def _bad(path: Path, key: str, expected: str, value: Any) -> AuditError:
    return AuditError(f"{path}: rule {key} must be {expected}, got {value!r}")


def load_rules(path: str | Path) -> Rules:
    """Parse and validate a rules file (see configs/release-check.yaml)."""
    path = Path(path)
    data = read_yaml(path, "rules")
    if not isinstance(data, dict):
        raise AuditError(f"{path}: rules are a mapping of rule names to limits")
    for key, value in data.items():
        kind = RULE_KEYS.get(key)
        if kind is None:
            raise AuditError(f"{path}: unknown rule {key!r}; known: {', '.join(RULE_KEYS)}")
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if kind == "int" and not (is_int and value >= 0):
            raise _bad(path, key, "a non-negative integer", value)
        if kind == "share" and not (
            isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1
        ):
            raise _bad(path, key, "a share between 0 and 1", value)
        if kind == "range" and not (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int | float) for v in value)
            and value[0] < value[1]
        ):
            raise _bad(path, key, "[low, high] with low < high", value)
        if kind == "dict" and not (
            isinstance(value, dict)
            and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values()
            )
        ):
            raise _bad(path, key, "a mapping of kinds to non-negative integers", value)
    return Rules(data)


def evaluate(report: Report, rules: Rules) -> list[Violation]:
    """Every violation of `rules` in `report`, rule by rule."""
    r = rules.values
    rows = report.rows
    out: list[Violation] = []
    traps = {row["matrix"]: row["rand_num_spikes"] or 0 for row in rows}
    if "max_traps_per_matrix" in r:
        limit = r["max_traps_per_matrix"]
        for row in rows:
            if traps[row["matrix"]] > limit:
                out.append(
                    Violation(
                        "max_traps_per_matrix",
                        row["matrix"],
                        f"{traps[row['matrix']]} traps > {limit} (kind {row['kind']}, "
                        f"max |w| {row['max_abs_entry']:.4g}, entry kurtosis "
                        f"{row['entry_kurtosis']:.3g})",
                    )
                )
    if "max_traps_per_kind" in r:
        for kind, limit in r["max_traps_per_kind"].items():
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
    return out


def junit_xml(report: Report, rules: Rules, violations: list[Violation]) -> bytes:
    """One test case per rule; a failure element per violation of it."""
    suite = ET.Element(
        "testsuite",
        name=f"llm-audit check {report.folder}",
        tests=str(len(rules.values)),
        failures=str(len(violations)),
    )
    for rule in rules.values:
        case = ET.SubElement(suite, "testcase", classname="llm-audit.check", name=rule)
        for v in (v for v in violations if v.rule == rule):
            failure = ET.SubElement(case, "failure", message=f"{v.subject}: {v.message}")
            failure.text = f"{v.subject}: {v.message}"
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="utf-8", xml_declaration=True)
