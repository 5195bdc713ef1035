"""Audit configuration: YAML files in configs/, validated strictly.

Why strict: a typo in a release gate's config ("exlude") silently auditing the wrong
matrices is worse than an error. Unknown keys and values of the wrong type or range are
`AuditError`s naming the file and key. Command-line options override the file.

An `AuditConfig` is the analysis settings (`llm_audit.spectral.settings`, whose defaults
it inherits) plus what only the driver needs: which matrices, and how tasks are run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import AuditError
from ..inputs import build_checked, read_yaml, shown
from ..source.roles import KindRule, parse_kind_rules
from ..spectral.settings import AnalysisSettings

_POSITIVE = ("cpus_per_task", "gpu_batch_size", "memory_budget_mb", "task_timeout_s")


@dataclass(frozen=True)
class AuditConfig(AnalysisSettings):
    """What to audit and how to run it (every key documented in configs/default.yaml)."""

    include: list[str] = field(default_factory=list)  # regexes on unit ids; empty: all
    exclude: list[str] = field(default_factory=list)
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.25  # share of a GPU per task (GPU clusters only): tasks overlap
    max_in_flight: int = 0  # tasks submitted ahead; 0: twice the worker slots
    max_retries: int = 3  # re-runs of a task whose worker died
    task_timeout_s: float = 3600.0  # a task running longer is reported as failed
    kinds: list[dict[str, Any]] = field(default_factory=list)  # user rules: regex -> kind

    def kind_rules(self) -> tuple[KindRule, ...]:
        """The `kinds:` rules, compiled (validated when the config was built)."""
        return parse_kind_rules(self.kinds, "kinds")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def analysis(self) -> AnalysisSettings:
        """The settings every worker analyzes with."""
        return AnalysisSettings(**{f.name: getattr(self, f.name) for f in fields(AnalysisSettings)})

    def with_overrides(self, **overrides: Any) -> AuditConfig:
        """A copy with the given non-None values replaced, validated."""
        values = self.to_dict() | {k: v for k, v in overrides.items() if v is not None}
        return _validated(values, "command line")


MAX_GPUS_PER_TASK = 1024  # more than any node holds: a task asking for it never runs


def _validated(values: dict[str, Any], where: str) -> AuditConfig:
    try:
        config = build_checked(AuditConfig, values, where)
    except AuditError as err:
        if str(err).startswith(where):
            raise
        raise AuditError(f"{where}: {err}") from None
    for name in _POSITIVE:
        value = getattr(config, name)
        if not value > 0:
            raise AuditError(f"{where}: {name} must be positive, got {shown(value)}")
    parse_kind_rules(config.kinds, where)
    gpus = config.gpus_per_task
    whole = isinstance(gpus, int) or gpus.is_integer()  # float(10**400) overflows
    if not (0 < gpus < 1 or whole) or gpus > MAX_GPUS_PER_TASK:  # Ray: no fraction above 1
        raise AuditError(
            f"{where}: gpus_per_task must be a fraction below 1 or a whole number up to "
            f"{MAX_GPUS_PER_TASK}, got {shown(gpus)}"
        )
    return config


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
