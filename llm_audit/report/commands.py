"""The commands that read report folders: `report show`, `report html`, `diff`, `check`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .format import CORE_COLUMNS, human_bytes, print_json, print_table, printable, write_csv
from .reader import load_report

SHOW_COLUMNS = (
    "matrix",
    "kind",
    "layer",
    "expert",
    *CORE_COLUMNS,
    "entry_kurtosis",
    "warning",
    "status",
)
DIFF_COLUMNS = (
    "matrix",
    "kind",
    "new_traps",
    "rand_num_spikes_a",
    "rand_num_spikes_b",
    "alpha_a",
    "alpha_b",
    "d_alpha",
    "d_log_norm",
    "d_log_spectral_norm",
    "d_trap_ratio",
)


def cmd_check(args: argparse.Namespace) -> int:
    from ..files import write_atomic
    from .check import Rules, evaluate, junit_xml, load_rules

    rules = load_rules(args.rules) if args.rules else Rules()
    report = load_report(args.report)
    baseline = load_report(args.baseline) if args.baseline else None
    violations = evaluate(report, rules, baseline)
    if args.junit:
        xml = junit_xml(report, rules, violations, baseline is not None)
        write_atomic(Path(args.junit), lambda tmp: tmp.write_bytes(xml))
    verdict = "FAILED" if violations else "PASSED"
    checks = len(rules.checks(baseline is not None))
    if args.format == "json":
        print_json(
            {
                "verdict": verdict,
                "model": report.manifest["model"]["reference"],
                "report": str(report.folder),
                "checks": checks,
                "matrices": len(report.rows),
                "violations": [
                    {"rule": v.rule, "subject": v.subject, "message": v.message} for v in violations
                ],
            }
        )
        return 1 if violations else 0
    model = printable(report.manifest["model"]["reference"])
    for v in violations:
        print(printable(f"FAIL {v.rule}: {v.subject}: {v.message}"))
    print(
        f"{verdict}: {model}: {checks} checks, {len(violations)} violations, "
        f"{len(report.rows)} matrices"
    )
    return 1 if violations else 0


def cmd_show(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from .query import row_filter

    report = load_report(args.report)
    rows = report.rows
    columns = set(rows[0]) if rows else set()
    if args.kind:
        rows = [r for r in rows if r["kind"] == args.kind]
    if args.where:
        keep = row_filter(args.where, columns)
        rows = [r for r in rows if keep(r)]
    if args.sort:
        key = args.sort
        if key not in columns:
            raise UsageError(f"--sort: unknown column {key!r}")
        present = [r for r in rows if r[key] is not None]
        rows = sorted(present, key=lambda r: r[key], reverse=args.desc) + [
            r for r in rows if r[key] is None
        ]
    if args.top:
        rows = rows[: args.top]
    if args.format == "json":
        print_json(rows)
    elif args.format == "csv":
        write_csv(rows, SHOW_COLUMNS)
    else:
        s, m = report.summary, report.manifest
        print(
            printable(
                f"model {m['model']['reference']}  llm-audit {m.get('tool_version')}  seed "
                f"{m.get('seed')}  status {m['status']}"
            )
        )
        print(
            f"matrices {s['matrices_in_report']} (audited {s['audited']}, skipped "
            f"{s['skipped']}, failed {s['failed']}); traps {s['total_traps']} in "
            f"{s['matrices_with_traps']} matrices; showing {len(rows)}"
        )
        print_table(rows, SHOW_COLUMNS)
    return 0


def cmd_html(args: argparse.Namespace) -> int:
    from .html import write_html_report

    out = write_html_report(args.report, args.output, compare=args.compare)
    print(f"{out} ({human_bytes(out.stat().st_size)})")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff_reports

    rows = diff_reports(load_report(args.a), load_report(args.b))
    if args.top:
        rows = rows[: args.top]
    if args.format == "json":
        print_json(rows)
    elif args.format == "csv":
        write_csv(rows, list(rows[0]) if rows else list(DIFF_COLUMNS))
    else:
        gained = sum(r["new_traps"] for r in rows)
        print(
            f"{len(rows)} matrices compared; {gained} new traps in "
            f"{sum(r['new_traps'] > 0 for r in rows)} matrices"
        )
        print_table(rows, DIFF_COLUMNS)
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="release gate: check a report against rules (exit 1 on fail)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit check report --rules configs/release-check.yaml --junit check.xml
  llm-audit check candidate --rules my-rules.yaml --baseline last-release
  llm-audit check report --format json   # verdict and violations for a script""",
    )
    p.add_argument("report", help="report folder")
    p.add_argument("--rules", help="YAML rules (default: configs/release-check.yaml's values)")
    p.add_argument("--junit", help="also write JUnit XML here")
    p.add_argument(
        "--baseline",
        metavar="OLD_REPORT",
        help="report of the previous release (same architecture): also fail on new traps "
        "where it had none, newly failed matrices, alpha drift per kind",
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("report", help="browse a report")
    report_sub = p.add_subparsers(dest="report_command", required=True)
    p = report_sub.add_parser(
        "show",
        help="summary and a table of matrices",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit report show report --sort trap_ratio --desc --top 20
  llm-audit report show report --where 'rand_num_spikes > 0 and kind == expert_down'
  llm-audit report show report --kind q_proj --format csv > q_proj.csv""",
    )
    p.add_argument("report", help="report folder")
    p.add_argument("--sort", help="column to sort by (rows without a value last)")
    p.add_argument("--desc", action="store_true", help="sort descending")
    p.add_argument("--where", help="filter, e.g. 'rand_num_spikes > 0 and kind == expert_down'")
    p.add_argument("--kind", help="only this kind")
    p.add_argument("--top", type=int, help="at most N rows")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.set_defaults(func=cmd_show)
    p = report_sub.add_parser("html", help="one self-contained HTML page (works offline)")
    p.add_argument("report", help="report folder")
    p.add_argument("-o", "--output", help="HTML file to write (default: REPORT/report.html)")
    p.add_argument(
        "--compare",
        metavar="B",
        help="baseline report of the same architecture: show the changes from B to REPORT",
    )
    p.set_defaults(func=cmd_html)

    p = sub.add_parser(
        "diff",
        help="per-matrix changes between two reports (same architecture)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit diff base-report finetuned-report --top 20   # new traps first
  llm-audit diff step-1000 step-2000 --format json""",
    )
    p.add_argument("a", help="report folder (before: base model, earlier checkpoint)")
    p.add_argument("b", help="report folder (after)")
    p.add_argument("--top", type=int, help="at most N rows")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.set_defaults(func=cmd_diff)
