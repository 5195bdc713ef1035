"""The `llm-audit` command line.

User errors (a missing file, a bad option value) print one line on stderr and exit 2,
with no traceback; results go to stdout, logs and progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .analyze import RAND_ROUTES, analyze_batch
from .backends import BACKEND_NAMES, BackendError

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


class UserError(Exception):
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
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
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
    from .demo import demo_matrices

    mats = demo_matrices()
    print(f"llm-audit {__version__}: auditing {len(mats)} demo matrices", file=sys.stderr)
    rows = analyze_batch(
        list(mats.values()),
        seed=args.seed,
        matrix_ids=list(mats),
        backend=args.backend,
        rand_route=args.rand_route,
    )
    for name, row in zip(mats, rows, strict=True):
        row["name"] = name
    _emit(rows, args.format)
    planted = rows[list(mats).index("planted_5_traps")]
    if args.format == "table":
        print(f"\nplanted_5_traps: {planted['rand_num_spikes']} traps; entries behind them:")
        for entry in planted["trap_entries"]:
            print(f"  row {entry['row']:5d}  col {entry['col']:4d}  value {entry['value']:+.1f}")
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

    p = sub.add_parser("demo", help="audit deterministic matrices with planted traps")
    common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `llm-audit` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, BackendError) as err:
        print(f"llm-audit: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
