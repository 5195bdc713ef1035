"""Reading settings that users hand us: YAML files and the values in them.

Why one module: audit configs, grok settings and release-gate rules are all untrusted
files, and each must be refused the same way — one line naming the file and the key —
rather than with a traceback or, worse, a silently wrong value (`true` taken as 1).
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import AuditError

T = TypeVar("T")


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)`, cut to `limit` characters: a message never echoes a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_count(value: Any) -> bool:
    """An integer >= 0 (True is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_number(value: Any) -> bool:
    """A real number >= 0 (True is not 1 here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


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


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content (safe loader, no aliases, at most 1 MB), or a one-line
    AuditError naming the file."""
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise AuditError(f"{path}: a {what} file of more than {MAX_YAML_BYTES >> 10} KB")
        return yaml.load(path.read_text(), Loader=_NoAliases)  # a SafeLoader subclass
    except OSError as err:
        raise AuditError(f"{path}: cannot read {what} ({err.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AuditError(f"{path}: not valid YAML ({shown(first, 160)[1:-1]})") from None


def _check(name: str, kind: Any, value: Any, where: str) -> None:
    def bad(expected: str) -> AuditError:
        return AuditError(f"{where}: {name} must be {expected}, got {shown(value)}")

    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of regular expressions")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise AuditError(f"{where}: {name}: bad regex {shown(pattern)} ({err})") from None
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
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise AuditError(
            f"{where}: unknown key(s) {shown(', '.join(map(str, unknown)))}; known: "
            f"{', '.join(types)}"
        )
    for name, value in values.items():
        _check(name, types[name], value, where)
    return cls(**values)
