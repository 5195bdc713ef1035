"""Settings of a grokking run: configs/grok-*.yaml, validated strictly, CLI overrides.

Why a dataclass of its own: a run's settings are written into its output folder
(run.json) and a resumed run must refuse different settings, which needs one exact,
comparable record of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import AuditError
from ..inputs import read_yaml

TASKS = ("mlp-mnist", "modadd")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class GrokConfig:
    """One run: model, data, optimizer and schedule (documented in configs/grok-*.yaml)."""

    task: str = "mlp-mnist"
    steps: int = 100_000
    init_scale: float = 8.0
    weight_decay: float = 0.0
    lr: float = 5e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    batch_size: int = 200  # 0: full batch
    warmup_steps: int = 0  # linear learning-rate warm-up
    seed: int = 0
    dtype: str = "float32"
    n_train: int = 1000  # mlp-mnist: images, stratified per class
    width: int = 200  # mlp-mnist hidden width
    p: int = 113  # modadd modulus
    train_fraction: float = 0.3  # modadd: share of the p*p pairs used for training
    checkpoints_per_decade: int = 16  # log-spaced checkpoint schedule
    circuit_layer: str = "fc1.weight"  # the layer whose 10% is zeroed for circuit complexity

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELDS = {f.name: f for f in fields(GrokConfig)}
# Each task's defaults: the paper's settings, documented in configs/grok-TASK.yaml (a test
# keeps the two equal). The affordable CPU validation runs override a few on the command
# line (README).
PRESETS: dict[str, dict[str, Any]] = {
    "mlp-mnist": {"steps": 10_000_000, "dtype": "float64"},
    "modadd": {
        "steps": 40_000,
        "init_scale": 1.0,
        "weight_decay": 1.0,
        "lr": 1e-3,
        "beta2": 0.98,
        "warmup_steps": 10,
        "batch_size": 0,
        "circuit_layer": "fc1",
    },
}


def _validated(values: dict[str, Any], where: str) -> GrokConfig:
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise AuditError(f"{where}: unknown key {unknown[0]!r}")
    for name, value in values.items():
        kind = _FIELDS[name].type
        if kind == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise AuditError(f"{where}: {name} must be a non-negative integer, got {value!r}")
        if kind == "float" and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 0
        ):
            raise AuditError(f"{where}: {name} must be a non-negative number, got {value!r}")
        if kind == "str" and not isinstance(value, str):
            raise AuditError(f"{where}: {name} must be a string, got {value!r}")
    config = GrokConfig(**values)
    if config.task not in TASKS:
        raise AuditError(f"{where}: task must be one of {', '.join(TASKS)}, got {config.task!r}")
    if config.dtype not in DTYPES:
        raise AuditError(f"{where}: dtype must be one of {', '.join(DTYPES)}")
    if config.steps < 1 or config.checkpoints_per_decade < 1:
        raise AuditError(f"{where}: steps and checkpoints_per_decade must be >= 1")
    if not 0 < config.train_fraction < 1:
        raise AuditError(f"{where}: train_fraction must be in (0, 1)")
    return config


def load_grok_config(path: str | Path | None, task: str, **overrides: Any) -> GrokConfig:
    """`task`'s preset, updated by the YAML file, then by the non-None `overrides`."""
    if task not in TASKS:
        raise AuditError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    values: dict[str, Any] = {"task": task, **PRESETS[task]}
    where = "command line"
    if path is not None:
        data = read_yaml(Path(path), "grok config") or {}
        if not isinstance(data, dict):
            raise AuditError(f"{path}: a grok config is a mapping of keys to values")
        _validated(GrokConfig().to_dict() | data, str(path))
        if data.get("task", task) != task:
            raise AuditError(f"{path}: this config is for task {data['task']!r}, not {task!r}")
        values |= data
        where = str(path)
    values |= {k: v for k, v in overrides.items() if v is not None}
    return _validated(GrokConfig().to_dict() | values, where)


def first_difference(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...]) -> str | None:
    """The first setting (by name), other than `ignore`, whose value differs between two
    run configs (run.json's "config"): what resuming and comparing twins refuse."""
    for key in sorted(set(a) | set(b)):
        if key not in ignore and a.get(key) != b.get(key):
            return key
    return None
