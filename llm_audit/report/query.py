"""Which rows and columns `report show` (and `diff`) print: `--where`, `--sort`, `--columns`.

Why Python's `ast` and Arrow compute, not a hand-made mini-language and not `eval`: the
expression comes from a command line that a script may build from names it did not
choose, so nothing in it may ever run. `ast.parse` gives a real grammar (and, or, not,
parentheses, `in`, quoted text holding ' and ' or quotes) for free; the tree is then
walked against a short whitelist and every other construct (a call, an attribute, a
subscript, arithmetic) is refused by name. What is accepted becomes one
`pyarrow.compute.Expression`, built once and evaluated on the whole column set at once.

The logic is SQL's three-valued logic, which Arrow's Kleene kernels implement: a
comparison with a missing value (null: an alpha that could not be fitted) is unknown,
`not unknown` is unknown, `unknown or true` is true, and a row whose condition is unknown
is not shown. So `alpha < 2` and `not (alpha < 2)` both leave out a row without alpha;
`alpha is None` finds those rows.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UsageError
from ..inputs import shown
from .format import printable

MAX_LENGTH = 2000  # characters of one --where expression
MAX_NODES = 1000  # syntax-tree nodes (a value list of several hundred values fits)
MAX_DEPTH = 50  # nesting of and / or / not / parentheses
GRAMMAR = (
    "COLUMN OP VALUE with OP one of == != < <= > >=, COLUMN in (V1, V2, ...), COLUMN not in "
    "(...), COLUMN is None, COLUMN is not None, a bool COLUMN alone, joined by and / or / not "
    "and parentheses; text values in quotes"
)
_SINGLE_EQUALS = re.compile(r"(?<![=!<>])=(?!=)")
_SQL_WORDS = re.compile(r"\b(?:AND|OR|NOT)\b|&&|\|\|")
_ROW = "__row__"  # the row-number column added for the filter (never a report column)
_INT64 = (-(2**63), 2**63 - 1)
_BOOL_OPS = ("==", "!=", "in", "not in")
_A = {"number": "a number", "text": "a text", "bool": "a bool"}
_ORDER = {
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
}
_FORBIDDEN = {
    ast.Call: "a function call",
    ast.Attribute: "an attribute",
    ast.Subscript: "a subscript",
    ast.BinOp: "arithmetic",
    ast.Lambda: "a lambda",
    ast.JoinedStr: "an f-string",
    ast.NamedExpr: "an assignment",
    ast.IfExp: "an if-expression",
    ast.Dict: "a dict",
    ast.Starred: "a starred expression",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a comprehension",
    ast.Await: "await",
    ast.UnaryOp: "this operator",
    ast.Compare: "a comparison where a value is expected",
    ast.BoolOp: "and / or where a value is expected",
    ast.Tuple: "a list outside `in` / `not in`",
    ast.List: "a list outside `in` / `not in`",
    ast.Set: "a list outside `in` / `not in`",
}


def _fail(message: str) -> UsageError:
    return UsageError(printable(f"--where: {message}"))


def close_matches(name: str, names: Sequence[str]) -> str:
    """' (did you mean a, b?)' for the names of `names` close to `name`, or ''."""
    near = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _category(kind: pa.DataType) -> str:
    """What a column holds, as the grammar sees it: number, text, bool or other."""
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return "number"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    return "bool" if pa.types.is_boolean(kind) else "other"


def _whole_int64(value: float) -> bool:
    return value.is_integer() and _INT64[0] <= value <= _INT64[1]


def _value_category(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "text" if isinstance(value, str) else "number"


class _Compiler:
    """One walk over a parsed --where tree, against the report's schema."""

    def __init__(self, text: str, schema: pa.Schema):
        self.text = text
        self.schema = schema
        self.used: set[str] = set()

    def piece(self, node: ast.AST) -> str:
        """The source text of `node`, cut to 60 characters, for a message."""
        segment = ast.get_source_segment(self.text, node) or type(node).__name__
        return segment if len(segment) <= 60 else segment[:57] + "..."

    def condition(self, node: ast.expr, depth: int = 0) -> pc.Expression:
        if depth > MAX_DEPTH:
            raise _fail(f"nested more than {MAX_DEPTH} deep")
        if isinstance(node, ast.BoolOp):
            parts = [self.condition(v, depth + 1) for v in node.values]
            out = parts[0]
            for part in parts[1:]:  # & and | are Arrow's Kleene and_kleene / or_kleene
                out = out & part if isinstance(node.op, ast.And) else out | part
            return out
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.condition(node.operand, depth + 1)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        if isinstance(node, ast.Name):
            name = self.column(node)
            if _category(self.schema.field(name).type) != "bool":
                raise _fail(
                    f"{name} is a {self.schema.field(name).type} column, not a condition: "
                    f"compare it (e.g. {name} > 0, {name} is not None)"
                )
            return pc.field(name)
        if isinstance(node, ast.Constant):
            raise _fail(f"{self.piece(node)} alone is not a condition on a column")
        raise self.forbidden(node)

    def forbidden(self, node: ast.AST) -> UsageError:
        what = _FORBIDDEN.get(type(node), f"{type(node).__name__} syntax")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitAnd | ast.BitOr):
            what = "& or | (write and / or)"
        return _fail(f"{what} is not allowed: {self.piece(node)}; the grammar: {GRAMMAR}")

    def unknown(self, node: ast.Name, hint: str = "") -> UsageError:
        return _fail(
            f"unknown column {node.id!r}{close_matches(node.id, self.schema.names)}"
            + (f"; a text value needs quotes: {hint}" if hint else "")
        )

    def column(self, node: ast.Name) -> str:
        if node.id not in self.schema.names:
            raise self.unknown(node)
        kind = self.schema.field(node.id).type
        if _category(kind) == "other":
            raise _fail(f"{node.id} is a {kind} column: it cannot be compared")
        self.used.add(node.id)
        return node.id

    def value(self, node: ast.expr, hint: str = "") -> Any:
        """A constant operand: a number (maybe negated), a quoted text, True or False."""
        sign, inner = 1, node
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            sign, inner = (-1 if isinstance(node.op, ast.USub) else 1), node.operand
            if not (
                isinstance(inner, ast.Constant)
                and isinstance(inner.value, int | float)
                and not isinstance(inner.value, bool)
            ):
                raise self.forbidden(node)
        if isinstance(inner, ast.Name):
            if inner.id in self.schema.names:
                raise _fail(f"column {inner.id} where a value is expected: {self.piece(node)}")
            raise self.unknown(inner, hint)
        if not isinstance(inner, ast.Constant):
            raise self.forbidden(node)
        value = inner.value
        if value is None:
            raise _fail(f"None only in COLUMN is None / COLUMN is not None: {self.piece(node)}")
        if not isinstance(value, bool | int | float | str):
            raise _fail(f"{self.piece(node)} is not a number, a quoted text, True or False")
        if isinstance(value, bool | str):
            return value
        value *= sign
        if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
            raise _fail(f"{shown(value, 40)} is out of the 64-bit integer range")
        return value

    def text_column(self, node: ast.expr) -> str | None:
        """`node`'s name if it is a text column, else None."""
        if isinstance(node, ast.Name) and node.id in self.schema.names:
            return node.id if _category(self.schema.field(node.id).type) == "text" else None
        return None

    def operand(self, node: ast.expr, other: ast.expr, op: str) -> tuple[str, Any]:
        """('column', name) or ('value', constant). A bare word compared with a text
        column gets the hint to quote it (the old grammar's `kind == expert_down`)."""
        if isinstance(node, ast.Name) and node.id in self.schema.names:
            return "column", self.column(node)
        text = self.text_column(other)
        hint = f"{text} {op} {node.id!r}" if isinstance(node, ast.Name) and text else ""
        return "value", self.value(node, hint)

    def ordered(self, column: str, op: str, node: ast.AST) -> None:
        if _category(self.schema.field(column).type) == "bool" and op not in _BOOL_OPS:
            raise _fail(f"{column} is a bool column: use == or != ({self.piece(node)})")

    def check(self, column: str, value: Any, op: str, node: ast.AST) -> None:
        """Refuse `value` against `column` when their types differ (kind > 3)."""
        kind = self.schema.field(column).type
        category, given = _category(kind), _value_category(value)
        if category != given:
            raise _fail(
                f"{column} is a {kind} column and {shown(value, 40)} is {_A[given]}: "
                f"{self.piece(node)}" + (" (quote text values)" if category == "text" else "")
            )
        self.ordered(column, op, node)

    def compare(self, node: ast.Compare) -> pc.Expression:
        parts = []
        left = node.left
        for op_node, right in zip(node.ops, node.comparators, strict=True):
            parts.append(self.pair(left, op_node, right, node))
            left = right
        out = parts[0]
        for part in parts[1:]:  # 1 < alpha < 4 is (1 < alpha) and (alpha < 4)
            out = out & part
        return out

    def pair(
        self, left: ast.expr, op_node: ast.cmpop, right: ast.expr, node: ast.Compare
    ) -> pc.Expression:
        if isinstance(op_node, ast.Is | ast.IsNot):
            if not (
                isinstance(left, ast.Name)
                and isinstance(right, ast.Constant)
                and right.value is None
            ):
                raise _fail(f"`is` only in COLUMN is None / COLUMN is not None: {self.piece(node)}")
            field = pc.field(self.column(left))
            return field.is_null() if isinstance(op_node, ast.Is) else field.is_valid()
        if isinstance(op_node, ast.In | ast.NotIn):
            return self.membership(left, right, isinstance(op_node, ast.NotIn), node)
        op = _ORDER[type(op_node)]
        (lk, lv), (rk, rv) = self.operand(left, right, op), self.operand(right, left, op)
        if lk == rk == "value":
            raise _fail(f"{self.piece(node)} compares two values: one side must be a column")
        if lk == rk == "column":
            a, b = self.schema.field(lv).type, self.schema.field(rv).type
            if _category(a) != _category(b):
                raise _fail(f"{lv} is a {a} column and {rv} a {b} column: {self.piece(node)}")
            self.ordered(lv, op, node)
        elif lk == "column":
            self.check(lv, rv, op, node)
        else:
            self.check(rv, lv, op, node)
        a = pc.field(lv) if lk == "column" else pc.scalar(lv)
        b = pc.field(rv) if rk == "column" else pc.scalar(rv)
        return {
            "==": pc.equal,
            "!=": pc.not_equal,
            "<": pc.less,
            "<=": pc.less_equal,
            ">": pc.greater,
            ">=": pc.greater_equal,
        }[op](a, b)

    def membership(
        self, left: ast.expr, right: ast.expr, negated: bool, node: ast.Compare
    ) -> pc.Expression:
        op = "not in" if negated else "in"
        if not isinstance(left, ast.Name):
            raise _fail(f"`{op}` needs a column on its left: {self.piece(node)}")
        name = self.column(left)
        if not isinstance(right, ast.Tuple | ast.List | ast.Set):
            raise _fail(f"`{op}` needs a list of values on its right, e.g. {name} {op} (1, 2)")
        values = []
        for item in right.elts:
            text = isinstance(item, ast.Name) and self.text_column(left)
            hint = f"{name} {op} ({item.id!r}, ...)" if text else ""
            value = self.value(item, hint)
            self.check(name, value, op, node)
            values.append(value)
        kind = self.schema.field(name).type
        if pa.types.is_integer(kind):  # 2.5 (or 1e30) never equals an int64; 2.0 equals 2
            values = [int(v) for v in values if isinstance(v, int) or _whole_int64(v)]
        elif pa.types.is_floating(kind):
            values = [float(v) for v in values]
        field = pc.field(name)
        member = pc.is_in(field, value_set=pa.array(values, kind))
        # is_in says False for a missing value; unknown (null) keeps `not in` from matching it
        known = pc.if_else(field.is_valid(), member, pa.scalar(None, pa.bool_()))
        return ~known if negated else known


def compile_where(text: str, schema: pa.Schema) -> tuple[pc.Expression, set[str]]:
    """`text` as an Arrow filter expression over `schema`'s columns, and the columns it
    reads. Every refusal is one `UsageError` line naming the offending piece."""
    if len(text) > MAX_LENGTH:
        raise _fail(f"{len(text)} characters, more than {MAX_LENGTH}")
    if not text.strip():
        raise _fail(f"empty; the grammar: {GRAMMAR}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        hint = "; compare with ==" if _SINGLE_EQUALS.search(text) else ""
        hint += "; join with and / or / not" if _SQL_WORDS.search(text) else ""
        raise _fail(
            f"not an expression ({err.msg} at character {err.offset}){hint}; the grammar: {GRAMMAR}"
        ) from None
    except (ValueError, RecursionError, MemoryError) as err:  # NUL bytes; absurd nesting
        raise _fail(f"not an expression ({type(err).__name__})") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise _fail(f"more than {MAX_NODES} terms")
    compiler = _Compiler(text.strip(), schema)
    return compiler.condition(tree.body), compiler.used


def filter_rows(
    rows: Sequence[dict[str, Any]], where: str, schema: pa.Schema
) -> list[dict[str, Any]]:
    """The rows of `rows` (whose columns `schema` types) that `where` keeps, in order."""
    expression, used = compile_where(where, schema)
    columns = {name: pa.array([r[name] for r in rows], schema.field(name).type) for name in used}
    table = pa.table(columns | {_ROW: pa.array(range(len(rows)), pa.int64())})
    try:
        kept = table.filter(expression)[_ROW].to_pylist()
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise _fail(f"{where.strip()!r} cannot be evaluated: {str(err).splitlines()[0]}") from None
    return [rows[i] for i in sorted(kept)]  # the filter may return rows in any order


def sort_rows(
    rows: Sequence[dict[str, Any]], column: str, descending: bool, schema: pa.Schema
) -> list[dict[str, Any]]:
    """`rows` sorted by `column` (rows without a value last); ties keep their order."""
    if column not in schema.names:
        raise UsageError(
            printable(f"--sort: unknown column {column!r}{close_matches(column, schema.names)}")
        )
    if _category(schema.field(column).type) == "other":
        raise UsageError(f"--sort: {column} is a {schema.field(column).type} column")
    present = [r for r in rows if r[column] is not None]
    # sorted() is stable, with reverse=True too: equal values stay in plan order
    ordered = sorted(present, key=lambda r: r[column], reverse=descending)
    return ordered + [r for r in rows if r[column] is None]


def pick_columns(spec: str | None, default: Sequence[str], known: Sequence[str]) -> list[str]:
    """The columns to print: `default` when `spec` is None, all `known` for 'all', else
    `spec`'s comma-separated names (each one known; repeats dropped)."""
    if spec is None:
        return list(default)
    if spec.strip() == "all":
        return list(known)
    names = [name.strip() for name in spec.split(",")]
    if not all(names):
        raise UsageError(printable(f"--columns {shown(spec, 60)}: an empty column name"))
    for name in names:
        if name not in known:
            raise UsageError(
                printable(f"--columns: unknown column {name!r}{close_matches(name, known)}")
            )
    return list(dict.fromkeys(names))
