"""Audit configuration: YAML files in configs/, validated strictly.

Why strict: a typo in a release gate's config ("exlude") silently auditing the wrong
matrices is worse than an error. Unknown keys and values of the wrong type or range are
`AuditError`s naming the file and key. Command-line options override the file.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .analyze import RAND_ROUTES
from .backends import BACKEND_NAMES
from .errors import AuditError


@dataclass(frozen=True)
class AuditConfig:
    """What to audit and how to run it (every key documented in configs/default.yaml)."""

    include: list[str] = field(default_factory=list)  # regexes on unit ids; empty: all
    exclude: list[str] = field(default_factory=list)
    randomize: bool = True
    seed: int = 0
    rand_route: str = "full"
    backend: str = "auto"
    min_evals: int = 8
    cpus_per_task: float = 1.0
    gpus_per_task: float = 1.0  # used only when the cluster has GPUs
    gpu_batch_size: int = 32  # same-shape units (a layer's experts) per GPU task
    max_in_flight: int = 0  # tasks submitted ahead; 0: twice the worker slots
    max_retries: int = 3  # re-runs of a task whose worker died
    memory_budget_mb: int = 512  # matrices larger than this (float32) are streamed
    spill_dir: str | None = None  # where the streamed shuffle spills; default: system temp
    task_timeout_s: float = 3600.0  # a task running longer is reported as failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(self, **overrides: Any) -> AuditConfig:
        """A copy with the given non-None values replaced, validated."""
        values = self.to_dict() | {k: v for k, v in overrides.items() if v is not None}
        return _validated(values, "command line")


_TYPES = {f.name: f.type for f in fields(AuditConfig)}


def _check(name: str, value: Any, where: str) -> None:
    def bad(expected: str) -> AuditError:
        return AuditError(f"{where}: {name} must be {expected}, got {value!r}")

    kind = _TYPES[name]
    if kind == "list[str]":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of regular expressions")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise AuditError(f"{where}: {name}: bad regex {pattern!r} ({err})") from None
    elif kind == "bool" and not isinstance(value, bool):
        raise bad("true or false")
    elif kind == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise bad("a non-negative integer")
    elif kind == "float" and (
        not isinstance(value, int | float) or isinstance(value, bool) or value < 0
    ):
        raise bad("a non-negative number")
    elif kind == "str | None" and value is not None and not isinstance(value, str):
        raise bad("a path")
    if name == "rand_route" and value not in RAND_ROUTES:
        raise bad(f"one of {', '.join(RAND_ROUTES)}")
    if name == "backend" and value not in BACKEND_NAMES:
        raise bad(f"one of {', '.join(BACKEND_NAMES)}")
    if (
        name in ("cpus_per_task", "gpu_batch_size", "memory_budget_mb", "task_timeout_s")
        and not value > 0
    ):
        raise bad("positive")


def _validated(values: dict[str, Any], where: str) -> AuditConfig:
    unknown = sorted(set(values) - set(_TYPES))
    if unknown:
        raise AuditError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(_TYPES)}"
        )
    for name, value in values.items():
        _check(name, value, where)
    return AuditConfig(**values)


def read_yaml(path: Path, what: str) -> Any:
    """A YAML file's content (safe loader only), or a one-line AuditError naming the file."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as err:
        raise AuditError(f"{path}: cannot read {what} ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise AuditError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def load_config(path: str | Path | None) -> AuditConfig:
    """Defaults, or the defaults updated by a YAML file's keys."""
    if path is None:
        return AuditConfig()
    path = Path(path)
    data = read_yaml(path, "config")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AuditError(f"{path}: a config is a mapping of keys to values")
    return _validated(AuditConfig().to_dict() | data, str(path))
