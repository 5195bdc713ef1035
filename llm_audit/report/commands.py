"""The commands that read report folders: `report show`, `report html`, `diff`, `check`."""

from __future__ import annotations

import argparse
from typing import Any

from ..inputs import at_least_one
from .format import (
    CORE_COLUMNS,
    human_bytes,
    not_planned_line,
    print_json,
    print_table,
    printable,
    write_csv,
)
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
    from ..files import output_path, write_atomic
    from .check import Rules, evaluate, junit_xml, load_rules

    junit = output_path(args.junit, (".xml",), "JUnit XML") if args.junit else None
    rules = load_rules(args.rules) if args.rules else Rules()
    report = load_report(args.report)
    baseline = load_report(args.baseline) if args.baseline else None
    violations = evaluate(report, rules, baseline)
    if junit is not None:
        xml = junit_xml(report, rules, violations, baseline is not None)
        write_atomic(junit, lambda tmp: tmp.write_bytes(xml))
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


def _print_rows(
    rows: list[dict[str, Any]], columns: list[str], fmt: str, heading: list[str]
) -> None:
    """`columns` of `rows` in `fmt`: the same columns in a table, CSV and JSON (JSON keeps
    full precision, the table 4 significant digits); `heading` lines go above a table."""
    if fmt == "json":
        print_json([{c: row.get(c) for c in columns} for row in rows])
    elif fmt == "csv":
        write_csv(rows, columns)
    else:
        for line in heading:
            print(printable(line))
        print_table(rows, columns)


def cmd_show(args: argparse.Namespace) -> int:
    from .query import filter_rows, pick_columns, sort_rows
    from .schema import LAYERS_SCHEMA

    columns = pick_columns(args.columns, SHOW_COLUMNS, LAYERS_SCHEMA.names)
    report = load_report(args.report)
    rows = report.rows
    if args.kind:
        rows = [r for r in rows if r["kind"] == args.kind]
    if args.where is not None:
        rows = filter_rows(rows, args.where, LAYERS_SCHEMA)
    if args.sort:
        rows = sort_rows(rows, args.sort, args.desc, LAYERS_SCHEMA)
    if args.top:
        rows = rows[: args.top]
    s, m = report.summary, report.manifest
    heading = [
        f"model {m['model']['reference']}  llm-audit {m.get('tool_version')}  seed "
        f"{m.get('seed')}  status {m['status']}",
        f"matrices {s['matrices_in_report']} (audited {s['audited']}, skipped "
        f"{s['skipped']}, failed {s['failed']}); traps {s['total_traps']} in "
        f"{s['matrices_with_traps']} matrices; showing {len(rows)}",
    ]
    left_out = not_planned_line(s)
    if left_out:
        heading.insert(2, left_out)
    _print_rows(rows, columns, args.format, heading)
    return 0


def cmd_html(args: argparse.Namespace) -> int:
    from .html import write_html_report

    out = write_html_report(args.report, args.output, compare=args.compare)
    size = out.stat().st_size
    if args.format == "json":
        print_json(
            {"html": str(out), "bytes": size, "report": args.report, "compare": args.compare}
        )
    else:
        print(printable(f"{out} ({human_bytes(size)})"))
    return 0


def diff_fields() -> list[str]:
    """Every column of a `diff_reports` row, in its order (what `--columns all` prints)."""
    from .diff import COMPARED

    compared = [name for c in COMPARED for name in (f"{c}_a", f"{c}_b", f"d_{c}")]
    return ["matrix", "kind", "status_a", "status_b", *compared, "traps_a", "traps_b", "new_traps"]


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff_reports
    from .query import pick_columns

    columns = pick_columns(args.columns, DIFF_COLUMNS, diff_fields())
    rows = diff_reports(load_report(args.a), load_report(args.b))
    shown_rows = rows[: args.top] if args.top else rows
    # the counts are over every compared matrix; --top only limits the rows printed
    heading = (
        f"{len(rows)} matrices compared; {sum(r['new_traps'] for r in rows)} new traps in "
        f"{sum(r['new_traps'] > 0 for r in rows)} matrices"
    )
    if len(shown_rows) < len(rows):
        heading += f" (showing the top {len(shown_rows)})"
    _print_rows(shown_rows, columns, args.format, [heading])
    return 0


def _add_rows_args(p: argparse.ArgumentParser, default_columns: tuple[str, ...]) -> None:
    """--top, --format and --columns of the commands that print matrix rows."""
    p.add_argument("--top", type=at_least_one, metavar="N", help="at most N rows")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.add_argument(
        "--columns",
        metavar="COL,COL,...|all",
        help="comma-separated columns to print, the same in every format, or 'all' "
        "(default: " + ", ".join(default_columns) + ")",
    )


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
  llm-audit report show report --where "rand_num_spikes > 0 and kind in ('expert_down', 'o_proj')"
  llm-audit report show report --where "trap_ratio > 2 or num_spikes >= 3"
  llm-audit report show report --where "not (2 <= alpha <= 6)" --columns matrix,alpha,status
  llm-audit report show report --where "alpha is None" --columns matrix,status,error
  llm-audit report show report --kind q_proj --format csv --columns all > q_proj.csv

--where is a condition on the report's columns: COLUMN OP VALUE with OP one of
== != < <= > >=, COLUMN in (V1, V2, ...), COLUMN not in (...), COLUMN is None,
COLUMN is not None, a bool column alone (transposed), joined by and, or, not and
parentheses. Text values are quoted ('expert_down'). A comparison with a missing
value is unknown (SQL's logic): not keeps it unknown, or with a true side is true,
and a row whose condition is unknown is not shown; "alpha is None" finds the rows
without alpha.""",
    )
    p.add_argument("report", help="report folder")
    p.add_argument(
        "--sort", help="column to sort by, any report column (rows without a value last)"
    )
    p.add_argument("--desc", action="store_true", help="sort descending")
    p.add_argument(
        "--where",
        help="condition on columns, e.g. \"trap_ratio > 2 or kind in ('expert_down', 'q_proj')\" "
        "(see below)",
    )
    p.add_argument("--kind", help="only this kind")
    _add_rows_args(p, SHOW_COLUMNS)
    p.set_defaults(func=cmd_show)
    p = report_sub.add_parser(
        "html",
        help="one self-contained HTML page (works offline)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit report html report                  # report/report.html
  llm-audit report html finetuned --compare base -o changes.html""",
    )
    p.add_argument("report", help="report folder")
    p.add_argument("-o", "--output", help="HTML file to write (default: REPORT/report.html)")
    p.add_argument(
        "--compare",
        metavar="B",
        help="baseline report of the same architecture: show the changes from B to REPORT",
    )
    p.add_argument("--format", choices=("table", "json"), default="table", help="what is printed")
    p.set_defaults(func=cmd_html)

    p = sub.add_parser(
        "diff",
        help="per-matrix changes between two reports (same architecture)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit diff base-report finetuned-report --top 20   # new traps first
  llm-audit diff step-1000 step-2000 --format json
  llm-audit diff base-report finetuned-report --format csv --columns all > diff.csv""",
    )
    p.add_argument("a", help="report folder (before: base model, earlier checkpoint)")
    p.add_argument("b", help="report folder (after)")
    _add_rows_args(p, DIFF_COLUMNS)
    p.set_defaults(func=cmd_diff)
