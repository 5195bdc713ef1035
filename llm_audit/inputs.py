"""Reading settings that users hand us: YAML files and the values in them.

Why one module: audit configs, grok settings and release-gate rules are all untrusted
files, and each must be refused the same way — one line naming the file and the key —
rather than with a traceback or, worse, a silently wrong value (`true` taken as 1).
"""

from __future__ import annotations

import argparse
import math
import re
import stat
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import AuditError

try:  # the regex parser `re` compiles with (named sre_parse before Python 3.11)
    from re import _parser  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_parse as _parser  # type: ignore[no-redef]

T = TypeVar("T")


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: a message never echoes a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


MAX_COUNT = 2**63 - 1  # what an int64 column, numpy's seeding and Ray's options hold


def at_least_one(text: str) -> int:
    """An argparse type: a whole number >= 1 (`--top -3` would drop the last 3 rows,
    `--min-evals -5` audit every matrix)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"want a whole number >= 1, got {text!r}")
    return value


def is_count(value: Any) -> bool:
    """An integer 0 <= value < 2^63 (True is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def is_number(value: Any) -> bool:
    """A finite real number >= 0 (True is not 1 here)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return 0 <= value < math.inf


def slow_regex(pattern: str) -> bool:
    r"""Whether `pattern` nests one unbounded repetition inside another (`(a+)+`,
    `(.*.*)*`), or an alternation inside a repetition whose branches do not start with
    distinct characters (`(a|ab)*`, `([\w.]|[\w.][\w.])*`: a name can be split between
    the branches in exponentially many ways): Python's `re` has no time limit, and such a
    pattern takes exponential time on a name it almost matches: an audit that hangs at
    100% CPU, silently."""

    def distinct_starts(branches: list[Any]) -> bool:
        """Each branch begins with its own literal character (`(q|k|v)_proj`)."""
        literals = [b[0][1] for b in branches if len(b) and b[0][0] is _parser.LITERAL]
        return len(literals) == len(branches) == len(set(literals))

    def bodies(op: Any, arg: Any) -> list[Any]:
        """The sub-patterns of a group, an alternation or a lookaround."""
        if op is _parser.SUBPATTERN:
            return [arg[3]]
        if op is _parser.BRANCH:
            return list(arg[1])
        return [arg[1]] if op in (_parser.ASSERT, _parser.ASSERT_NOT) else []

    def nested(items: Any, inside: bool) -> bool:
        for op, arg in items:
            if op in (_parser.MAX_REPEAT, _parser.MIN_REPEAT):
                low, high, body = arg
                if (inside and low != high) or nested(body, inside or high > 1):
                    return True  # a variable count inside a repetition
            elif op is _parser.BRANCH and inside and not distinct_starts(arg[1]):
                return True  # branches that overlap, inside a repetition
            elif any(nested(body, inside) for body in bodies(op, arg)):
                return True
        return False

    return nested(_parser.parse(pattern), False)


def compile_regex(pattern: str, where: str) -> re.Pattern[str]:
    """`pattern` compiled, or a one-line AuditError naming `where`: a bad regex, or one
    that can take exponential time (`slow_regex`)."""
    try:
        compiled = re.compile(pattern)
    except re.error as err:
        raise AuditError(f"{where}: bad regex {shown(pattern)} ({err})") from None
    if slow_regex(pattern):
        raise AuditError(
            f"{where}: regex {shown(pattern)} nests a repetition, or alternatives that can "
            "start alike, inside a repetition, which can take exponential time on a tensor "
            "name; write it without the nesting"
        )
    return compiled


def first_line(err: BaseException, limit: int = 120) -> str:
    """An exception's message for a one-line error: its first line, cut to `limit`
    characters (its type's name when it has none)."""
    text = str(err)
    return text.splitlines()[0][:limit] if text.strip() else type(err).__name__


def check_regular(path: Path) -> None:
    """A one-line AuditError unless `path` is a regular file. A FIFO would hang its reader
    and /dev/zero never ends, and neither has a size to check first: a report artifact or
    a config can be either (tar keeps them)."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise AuditError(f"{path}: not a regular file")


def read_capped(path: Path, limit: int) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes, or a one-line
    AuditError."""
    check_regular(path)
    with path.open("rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise AuditError(f"{path}: larger than {limit >> 10} KB")
    return data


MAX_YAML_BYTES = 2**20  # settings files are a few hundred bytes


class _NoAliases(yaml.SafeLoader):
    """The safe loader, refusing aliases: a 1 KB file of nested aliases expands to
    millions of values (and an error message echoing them to megabytes). And refusing a
    key given twice in one mapping, where YAML keeps the last silently: a rules file with
    `max_total_traps: 0` and, further down, `max_total_traps: 100` is not a gate."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not accepted (line {mark.line + 1})")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.YAMLError(f"key {key!r} given twice (line {line})")
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads `1e9` and `1.0e9` as text, YAML 1.2 as numbers; a threshold
# written so must be the number its author meant, not a type error or, worse, a string.
_NoAliases.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


# YAML 1.1 also reads `010` as 8 (octal) and `1:30` as 90 (base 60): silently other numbers
# than a rules file's author wrote. Integers here are decimal digits, as YAML 1.2 reads
# them (`010` is 10); `1:30` stays text, refused where a number is wanted.
_INT = "tag:yaml.org,2002:int"
for _first, _resolvers in _NoAliases.yaml_implicit_resolvers.items():
    _resolvers[:] = [(tag, regexp) for tag, regexp in _resolvers if tag != _INT]
_NoAliases.add_implicit_resolver(_INT, re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789"))
_NoAliases.add_constructor(_INT, lambda loader, node: int(node.value.replace("_", "")))


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content (safe loader, no aliases, at most 1 MB), or a one-line
    AuditError naming the file."""
    try:
        text = read_capped(path, MAX_YAML_BYTES).decode("utf-8")
        return yaml.load(text, Loader=_NoAliases)  # a SafeLoader subclass
    except OSError as err:
        raise AuditError(f"{path}: cannot read {what} ({err.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError, ValueError) as err:
        # ValueError: an integer of more than 4300 digits (Python's conversion limit)
        first = first_line(err, 10**6)
        raise AuditError(f"{path}: not valid YAML ({shown(first, 160)[1:-1]})") from None


def _check(name: str, kind: Any, value: Any, where: str) -> None:
    def bad(expected: str) -> AuditError:
        return AuditError(f"{where}: {name} must be {expected}, got {shown(value)}")

    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of regular expressions")
        for pattern in value:
            compile_regex(pattern, f"{where}: {name}")
    elif kind == "bool" and not isinstance(value, bool):
        raise bad("true or false")
    elif kind == "int" and not is_count(value):
        raise bad("a non-negative integer")
    elif kind == "float" and not is_number(value):
        raise bad("a non-negative number")
    elif kind == "str" and not isinstance(value, str):
        raise bad("a string")
    elif kind == "str | None" and value is not None and not isinstance(value, str):
        raise bad("a path")


def build_checked(cls: type[T], values: dict[str, Any], where: str) -> T:
    """`cls(**values)` for a dataclass of plain fields, each value checked against its
    field's annotation (int, float, bool, str, str | None, list[str]); unknown keys refused."""
    types = {f.name: f.type for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(types), key=str)  # YAML keys may be numbers too
    if unknown:
        raise AuditError(
            f"{where}: unknown key(s) {shown(', '.join(map(str, unknown)))}; known: "
            f"{', '.join(types)}"
        )
    for name, value in values.items():
        _check(name, types[name], value, where)
    return cls(**values)
