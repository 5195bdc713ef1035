"""The `llm-audit` command line.

User errors (a missing file, a bad option value) print one line on stderr and exit 2,
with no traceback; results go to stdout, logs and progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .analyze import RAND_ROUTES, analyze_batch
from .backends import BACKEND_NAMES, BackendError
from .errors import AuditError
from .grok.cli import add_grok_parser

DEMO_COLUMNS = (
    "matrix",
    "kind",
    "N",
    "M",
    "alpha",
    "num_spikes",
    "rand_num_spikes",
    "max_abs_entry",
    "status",
)
SHOW_COLUMNS = (
    "matrix",
    "kind",
    "layer",
    "expert",
    "N",
    "M",
    "alpha",
    "num_spikes",
    "rand_num_spikes",
    "max_abs_entry",
    "entry_kurtosis",
    "warning",
    "status",
)
SUMMARY_COLUMNS = (
    "name",
    "N",
    "M",
    "alpha",
    "num_spikes",
    "rand_num_spikes",
    "max_abs_entry",
    "entry_kurtosis",
    "status",
)


class UserError(AuditError):
    """An error in what the user asked for: reported in one line, exit code 2."""


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Fixed-width table of selected columns on stdout."""
    cells = [[_format_value(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def _emit(rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        json.dump(rows, sys.stdout, indent=1, default=_json_default)
        print()
    else:
        print_table(rows, SUMMARY_COLUMNS)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)  # never unpickle user files
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"{path}: not a readable .npy array ({err})") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    matrices = [_load_npy(Path(p)) for p in args.files]
    for path, matrix in zip(args.files, matrices, strict=True):
        if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.floating):
            raise UserError(f"{path}: need a 2-D float array, got {matrix.dtype} {matrix.shape}")
    rows = analyze_batch(
        matrices,
        randomize=not args.no_randomize,
        seed=args.seed,
        matrix_ids=[Path(p).name for p in args.files],
        backend=args.backend,
        rand_route=args.rand_route,
    )
    for path, row in zip(args.files, rows, strict=True):
        row["name"] = str(path)
    _emit(rows, args.format)
    return 1 if any(r["status"] == "error" for r in rows) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    import pyarrow.parquet as pq

    from .audit import run_audit
    from .config import AuditConfig
    from .demo import PLANTED, write_bundled_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not (out / "gpt-oss-mini").is_dir():
            raise UserError(f"{out} is not empty and not a demo folder; choose another --out")
        shutil.rmtree(out)  # an earlier demo's model and report
    model = write_bundled_model(out / "gpt-oss-mini")
    print(f"llm-audit {__version__}: bundled miniature gpt-oss written to {model}", file=sys.stderr)
    result = run_audit(str(model), out / "report", AuditConfig(seed=args.seed), quiet=args.quiet)
    rows = pq.read_table(out / "report" / "layers.parquet").to_pylist()
    if args.format == "json":
        _emit(rows, "json")
        return 1 if result.failed else 0
    summary = result.summary
    print(f"report: {result.out}")
    print(
        f"matrices: {summary['matrices_in_report']} (audited {summary['audited']}, "
        f"failed {summary['failed']}); traps: {summary['total_traps']} in "
        f"{summary['matrices_with_traps']} matrices"
    )
    print_table([r for r in rows if r["rand_num_spikes"]], DEMO_COLUMNS)
    found = {r["matrix"]: r["rand_num_spikes"] for r in rows}
    print("\nplanted traps (matrix: planted -> found):")
    for unit_id, planted in PLANTED.items():
        print(f"  {unit_id}: {planted} -> {found[unit_id]}")
    others = sum(v for k, v in found.items() if k not in PLANTED)
    print(f"traps in the other {len(found) - len(PLANTED)} matrices: {others}")
    return 1 if result.failed else 0


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    raise AssertionError("unreachable")


def cmd_plan(args: argparse.Namespace) -> int:
    from .checkpoint import open_checkpoint
    from .model_ref import resolve_model

    checkpoint = open_checkpoint(resolve_model(args.model, args.revision))
    plan = checkpoint.plan(min_evals=args.min_evals)
    largest = plan.largest()
    if args.format == "json":
        payload = {
            "model": args.model,
            "files": [str(p) for p in checkpoint.model.files],
            "matrices": len(plan.units),
            "by_kind": plan.counts_by_kind(),
            "bytes_to_read": plan.bytes_to_read(),
            "bytes_on_disk": checkpoint.bytes_on_disk(),
            "largest": largest.id if largest else None,
            "skipped": plan.skipped_reasons(),
            "units": [
                {
                    "id": u.id,
                    "kind": u.kind,
                    "layer": u.layer,
                    "expert": u.expert,
                    "shape": list(u.shape),
                    "source_dtype": u.source_dtype,
                    "bytes": u.nbytes,
                }
                for u in plan.units
            ],
        }
        json.dump(payload, sys.stdout, indent=1)
        print()
        return 0
    files = checkpoint.model.files
    print(f"model {args.model}: {len(files)} file(s), {_human_bytes(checkpoint.bytes_on_disk())}")
    print(f"matrices to audit: {len(plan.units)}")
    for kind, count in plan.counts_by_kind().items():
        print(f"  {kind:15s} {count}")
    print(f"bytes to read: {_human_bytes(plan.bytes_to_read())}")
    if largest:
        print(f"largest matrix: {largest.id} {largest.shape[0]}x{largest.shape[1]}")
    print(f"skipped tensors: {len(plan.skipped)}")
    for reason, count in plan.skipped_reasons().items():
        print(f"  {count:5d}  {reason}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import run_audit
    from .config import load_config

    config = load_config(args.config).with_overrides(
        seed=args.seed,
        include=args.include,
        exclude=args.exclude,
        randomize=False if args.no_randomize else None,
        backend=args.backend,
    )
    try:
        result = run_audit(
            args.model,
            args.out,
            config,
            revision=args.revision,
            address=args.address,
            resume=args.resume,
            quiet=args.quiet,
        )
    except KeyboardInterrupt:
        print(
            f"llm-audit: partial report in {args.out}; complete it with --resume", file=sys.stderr
        )
        return 130
    summary = result.summary
    print(f"report: {result.out}")
    print(
        f"matrices: {summary['matrices_in_report']} of {summary['matrices_planned']} "
        f"(audited {summary['audited']}, skipped {summary['skipped']}, "
        f"failed {summary['failed']})"
    )
    print(
        f"correlation traps: {summary['total_traps']} in {summary['matrices_with_traps']} matrices"
    )
    for kind, alpha in summary["mean_alpha_by_kind"].items():
        print(f"  mean alpha {kind:15s} {alpha:.3f}")
    return 1 if result.failed else 0


def cmd_check(args: argparse.Namespace) -> int:
    from .check import Rules, evaluate, junit_xml, load_rules
    from .report_read import load_report

    rules = load_rules(args.rules) if args.rules else Rules()
    report = load_report(args.report)
    violations = evaluate(report, rules)
    if args.junit:
        Path(args.junit).write_bytes(junit_xml(report, rules, violations))
    model = report.manifest.get("model", {}).get("reference", "?")
    for v in violations:
        print(f"FAIL {v.rule}: {v.subject}: {v.message}")
    verdict = "FAILED" if violations else "PASSED"
    print(
        f"{verdict}: {model}: {len(rules.values)} rules, {len(violations)} violations, "
        f"{len(report.rows)} matrices"
    )
    return 1 if violations else 0


_OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}


_CLAUSE = re.compile(r"^\s*(\w+)\s*(==|!=|>=|<=|>|<)\s*([^<>=!\s][^<>=!]*?)\s*$")


def _where(expr: str, columns: set[str]) -> Any:
    """A row filter from "COL OP VALUE [and COL OP VALUE ...]" (no eval: a tiny parser)."""
    tests = []
    for clause in expr.split(" and "):
        match = _CLAUSE.match(clause)
        if not match:
            raise UserError(
                f"--where {clause!r}: want COLUMN OP VALUE with OP in {', '.join(_OPS)}"
            )
        col, op, value = match.groups()
        if col not in columns:
            raise UserError(f"--where: unknown column {col!r}")
        try:
            parsed: Any = float(value)
        except ValueError:
            parsed = value.strip("'\"")
        tests.append((col, _OPS[op], parsed))

    def keep(row: dict[str, Any]) -> bool:
        for col, fn, value in tests:
            cell = row.get(col)
            if cell is None:
                return False
            try:
                if not fn(cell, value):
                    return False
            except TypeError:
                return False
        return True

    return keep


def cmd_report_show(args: argparse.Namespace) -> int:
    import csv

    from .report_read import load_report

    report = load_report(args.report)
    rows = report.rows
    columns = set(rows[0]) if rows else set()
    if args.kind:
        rows = [r for r in rows if r["kind"] == args.kind]
    if args.where:
        rows = [r for r in rows if _where(args.where, columns)(r)]
    if args.sort:
        key = args.sort
        if key not in columns:
            raise UserError(f"--sort: unknown column {key!r}")
        present = [r for r in rows if r[key] is not None]
        rows = sorted(present, key=lambda r: r[key], reverse=args.desc) + [
            r for r in rows if r[key] is None
        ]
    if args.top:
        rows = rows[: args.top]
    if args.format == "json":
        _emit(rows, "json")
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(SHOW_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        s, m = report.summary, report.manifest
        print(
            f"model {m['model']['reference']}  llm-audit {m.get('tool_version')}  seed "
            f"{m.get('seed')}  status {m.get('status')}"
        )
        print(
            f"matrices {s['matrices_in_report']} (audited {s['audited']}, skipped "
            f"{s['skipped']}, failed {s['failed']}); traps {s['total_traps']} in "
            f"{s['matrices_with_traps']} matrices; showing {len(rows)}"
        )
        print_table(rows, SHOW_COLUMNS)
    return 0


def cmd_report_html(args: argparse.Namespace) -> int:
    from .html_report import write_html_report

    out = write_html_report(args.report, args.output, compare=args.compare)
    print(f"{out} ({_human_bytes(out.stat().st_size)})")
    return 0


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
)


def cmd_diff(args: argparse.Namespace) -> int:
    import csv

    from .diff import diff_reports
    from .report_read import load_report

    rows = diff_reports(load_report(args.a), load_report(args.b))
    if args.top:
        rows = rows[: args.top]
    if args.format == "json":
        _emit(rows, "json")
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    else:
        gained = sum(r["new_traps"] for r in rows)
        print(
            f"{len(rows)} matrices compared; {gained} new traps in "
            f"{sum(r['new_traps'] > 0 for r in rows)} matrices"
        )
        print_table(rows, DIFF_COLUMNS)
    return 0


def _parse_trap(text: str) -> tuple[str, int]:
    name, _, count = text.partition("=")
    try:
        return name, int(count or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--trap {text!r}: want NAME[EXPERT]=COUNT") from None


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import SynthConfig, synth_gpt_oss

    cfg = SynthConfig(
        layers=args.layers,
        experts=args.experts,
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        vocab=args.vocab,
        shards=args.shards,
        dtype=args.dtype,
        mxfp4=not args.no_mxfp4,
        seed=args.seed,
        traps=dict(args.trap or []),
        trap_scale=args.trap_scale,
    )
    out = synth_gpt_oss(args.out, cfg)
    print(f"wrote a miniature gpt-oss checkpoint to {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-audit",
        description="Spectral (HTSR) audit and correlation-trap detection for model weights.",
    )
    parser.add_argument("--version", action="version", version=f"llm-audit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--seed", type=int, default=0, help="run seed for the shuffles")
        p.add_argument(
            "--backend",
            choices=BACKEND_NAMES,
            default=None,
            help="array backend (default: auto, or $LLM_AUDIT_BACKEND)",
        )
        p.add_argument(
            "--rand-route",
            choices=RAND_ROUTES,
            default="full",
            help="shuffled spectrum: full ESD (default) or top-k Lanczos",
        )
        p.add_argument("--format", choices=("table", "json"), default="table")

    p = sub.add_parser("analyze", help="analyze 2-D matrices saved as .npy files")
    p.add_argument("files", nargs="+", help=".npy files (loaded without pickle)")
    p.add_argument("--no-randomize", action="store_true", help="skip the shuffled ESD")
    common(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("demo", help="audit the bundled miniature gpt-oss with planted traps")
    p.add_argument(
        "--out",
        default="demo-out",
        help="folder for the model and its report (replaced; default ./demo-out)",
    )
    p.add_argument("--seed", type=int, default=0, help="run seed for the shuffles")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("audit", help="audit a whole checkpoint with Ray into a report folder")
    p.add_argument("model", help="folder, .safetensors file, or hub repo id in the local cache")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--config", help="YAML config (see configs/default.yaml)")
    p.add_argument("--revision", help="hub branch, tag or commit (repo ids only)")
    p.add_argument("--seed", type=int, help="run seed (overrides the config)")
    p.add_argument(
        "--include",
        action="append",
        metavar="REGEX",
        help="audit only matrices whose id matches (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="REGEX",
        help="leave out matrices whose id matches (repeatable)",
    )
    p.add_argument("--no-randomize", action="store_true", help="skip shuffles and traps")
    p.add_argument("--backend", choices=BACKEND_NAMES, help="array backend in the workers")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    p.add_argument("--resume", action="store_true", help="complete a partial report in --out")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("check", help="release gate: check a report against rules (exit 1 on fail)")
    p.add_argument("report", help="report folder")
    p.add_argument("--rules", help="YAML rules (default: configs/release-check.yaml's values)")
    p.add_argument("--junit", help="also write JUnit XML here")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("report", help="browse a report")
    report_sub = p.add_subparsers(dest="report_command", required=True)
    p = report_sub.add_parser("show", help="summary and a table of matrices")
    p.add_argument("report", help="report folder")
    p.add_argument("--sort", help="column to sort by (rows without a value last)")
    p.add_argument("--desc", action="store_true", help="sort descending")
    p.add_argument("--where", help="filter, e.g. 'rand_num_spikes > 0 and kind == expert_down'")
    p.add_argument("--kind", help="only this kind")
    p.add_argument("--top", type=int, help="at most N rows")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.set_defaults(func=cmd_report_show)
    p = report_sub.add_parser("html", help="one self-contained HTML page (works offline)")
    p.add_argument("report", help="report folder")
    p.add_argument("-o", "--output", help="HTML file to write (default: REPORT/report.html)")
    p.add_argument(
        "--compare",
        metavar="B",
        help="baseline report of the same architecture: show the changes from B to REPORT",
    )
    p.set_defaults(func=cmd_report_html)

    p = sub.add_parser("diff", help="per-matrix changes between two reports (same architecture)")
    p.add_argument("a", help="report folder (before: base model, earlier checkpoint)")
    p.add_argument("b", help="report folder (after)")
    p.add_argument("--top", type=int, help="at most N rows")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("plan", help="list what an audit of MODEL would compute, reading no weights")
    p.add_argument("model", help="folder, .safetensors file, or hub repo id in the local cache")
    p.add_argument("--revision", help="hub branch, tag or commit (repo ids only)")
    p.add_argument("--min-evals", type=int, default=8, help="skip smaller matrices")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("synth", help="write a synthetic checkpoint (real names, planted traps)")
    p.add_argument("family", choices=("gpt-oss",))
    p.add_argument("out", help="output folder")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    p.add_argument("--no-mxfp4", action="store_true", help="dense experts (transformers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--trap",
        type=_parse_trap,
        action="append",
        metavar="NAME[EXPERT]=COUNT",
        help="plant COUNT large entries in that matrix (repeatable)",
    )
    p.add_argument("--trap-scale", type=float, default=1.0, help="size of a planted entry")
    p.set_defaults(func=cmd_synth)

    add_grok_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-audit` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (AuditError, BackendError) as err:
        print(f"llm-audit: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
