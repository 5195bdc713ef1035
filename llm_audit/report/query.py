"""`report show --where`: a row filter from "COL OP VALUE [and COL OP VALUE ...]".

Why a parser and not eval: the expression comes from a command line that may be built
by a script from untrusted names; nothing in it is ever executed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import UsageError

_OPS = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}
_CLAUSE = re.compile(r"^\s*(\w+)\s*(==|!=|>=|<=|>|<)\s*([^<>=!\s][^<>=!]*?)\s*$")


def row_filter(expr: str, columns: set[str]) -> Callable[[dict[str, Any]], bool]:
    """A predicate over rows; rows missing a value, or of another type, do not match."""
    tests = []
    for clause in expr.split(" and "):
        match = _CLAUSE.match(clause)
        if not match:
            raise UsageError(
                f"--where {clause!r}: want COLUMN OP VALUE with OP in {', '.join(_OPS)}"
            )
        col, op, value = match.groups()
        if col not in columns:
            raise UsageError(f"--where: unknown column {col!r}")
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
