"""How results are printed: a fixed-width table for people, JSON for machines.

Why one module: every command that prints rows (analyze, demo, audit, report show, diff)
must print the same value the same way, so a number in a table matches the JSON.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# The columns every printed table of matrices shows, between its own leading and trailing ones.
CORE_COLUMNS = (
    "N",
    "M",
    "alpha",
    "num_spikes",
    "rand_num_spikes",
    "trap_ratio",
    "max_abs_entry",
)


def _escape(char: str) -> str:
    code = ord(char)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else f"\\U{code:08x}"
    )


def printable(text: str) -> str:
    """`text` with control, format (bidi), surrogate, separator and unassigned characters
    written as `\\xNN` / `\\uNNNN` escapes: report strings come from someone else's
    checkpoint or folder and must not drive a terminal, reorder a line or break XML."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def format_value(value: Any) -> str:
    """One table cell: '-' for missing, 4 significant digits for floats, text escaped."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return printable(str(value))


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet will not run and a terminal will not obey: text
    starting like a formula gets a leading quote (OWASP's advice), control and bidi
    characters are escaped (`printable`); numbers are kept as they are; lists and mappings
    (`trap_entries`, `trap_ratios`) are written as JSON, which any reader can parse."""
    if isinstance(value, list | tuple | dict):
        value = json.dumps(value, default=_json_default)
    if isinstance(value, str):
        value = printable(value)
        return "'" + value if value.startswith(_FORMULA) else value
    return value


def write_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """`columns` of `rows` as CSV on stdout, formula-guarded."""
    writer = csv.writer(sys.stdout)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in columns])


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Fixed-width table of selected columns on stdout."""
    cells = [[format_value(row.get(c)) for c in columns] for row in rows]
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


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout (numpy values as plain numbers)."""
    json.dump(data, sys.stdout, indent=1, default=_json_default)
    print()


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (powers of 1000, as disks are sold)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def not_planned_line(summary: Mapping[str, Any]) -> str | None:
    """The weights a report's plan left out (formats not read, unknown layouts), most
    common reasons first; None where there are none (or the report predates the count)."""
    reasons = summary.get("weights_not_planned") or {}
    if not reasons:
        return None
    shown = "; ".join(f"{n}: {printable(reason)}" for reason, n in list(reasons.items())[:3])
    more = f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
    return f"weights not audited: {sum(reasons.values())} tensors ({shown}{more})"
