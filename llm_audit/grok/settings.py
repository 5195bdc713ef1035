"""Settings of a grokking run: configs/grok-*.yaml, validated strictly, CLI overrides.

Why a dataclass of its own: a run's settings are written into its output folder
(run.json) and a resumed run must refuse different settings, which needs one exact,
comparable record of them. Why every value is checked here, before anything is built:
a config file is untrusted input, and a bad value (p: 0, lr: .nan, a circuit_layer the
model lacks) must stop the command in one line naming the file or the flag and the key,
not with a traceback from deep inside torch, or, worse, train on silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import AuditError
from ..inputs import is_count, is_number, read_yaml, shown

TASKS = ("mlp-mnist", "modadd")
DTYPES = ("float32", "float64")
MNIST_CLASSES = 10  # mlp-mnist: n_train is drawn evenly from the ten digits
# Beyond about 1,000 per decade every step up to ~430 is a checkpoint already; a huge
# value would only make the schedule's loop run for hours before the first step.
MAX_CHECKPOINTS_PER_DECADE = 1000
MAX_THREADS = 1024  # torch accepts far more and crashes (10^6: a segmentation fault)


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


def _real(value: Any) -> bool:
    """A finite number >= 0 that a float holds (NaN, inf and 10**400 are not)."""
    if not is_number(value):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _positive(value: Any) -> bool:
    return _real(value) and value > 0


def _at_least(low: int, high: int | None = None) -> Callable[[Any], bool]:
    return lambda v: is_count(v) and v >= low and (high is None or v <= high)


# What each setting must be, on its own: a test of its value and what the message says.
# Settings that depend on others (circuit_layer on the task, p on train_fraction) are
# checked again in `_validated`.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "task": (lambda v: isinstance(v, str) and v in TASKS, f"one of {', '.join(TASKS)}"),
    "steps": (_at_least(1), "a whole number >= 1"),
    "init_scale": (_positive, "a finite number > 0"),
    "weight_decay": (_real, "a finite number >= 0"),
    "lr": (_positive, "a finite number > 0"),
    "beta1": (lambda v: _real(v) and v < 1, "a number in [0, 1)"),
    "beta2": (lambda v: _real(v) and v < 1, "a number in [0, 1)"),
    "eps": (_positive, "a finite number > 0"),
    "batch_size": (is_count, "a whole number >= 0 (0: full batch)"),
    "warmup_steps": (is_count, "a whole number >= 0"),
    "seed": (is_count, "a whole number >= 0"),
    "dtype": (lambda v: isinstance(v, str) and v in DTYPES, f"one of {', '.join(DTYPES)}"),
    "n_train": (
        lambda v: _at_least(MNIST_CLASSES)(v) and v % MNIST_CLASSES == 0,
        f"a multiple of {MNIST_CLASSES}, at least {MNIST_CLASSES} (as many images of each digit)",
    ),
    "width": (_at_least(1), "a whole number >= 1"),
    "p": (_at_least(2), "a whole number >= 2 (the modulus)"),
    "train_fraction": (lambda v: _real(v) and 0 < v < 1, "a number in (0, 1)"),
    "checkpoints_per_decade": (
        _at_least(1, MAX_CHECKPOINTS_PER_DECADE),
        f"a whole number from 1 to {MAX_CHECKPOINTS_PER_DECADE}",
    ),
    "circuit_layer": (lambda v: isinstance(v, str), "the name of a weight matrix of the task"),
}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _check_values(values: dict[str, Any], where: str | None) -> None:
    """Each value against its setting's rule; `where` names the file, None the flags."""
    unknown = sorted(set(values) - set(_FIELDS), key=str)
    if unknown:
        raise AuditError(f"{where or 'command line'}: unknown key {shown(unknown[0])}")
    for name, value in values.items():
        test, expected = RULES[name]
        if not test(value):
            key = _flag(name) if where is None else f"{where}: {name}"
            raise AuditError(f"{key} must be {expected}, got {shown(value)}")


def _validated(values: dict[str, Any], where: str | None) -> GrokConfig:
    """`values` (every setting) as a GrokConfig, each checked on its own and together."""
    _check_values(values, where)
    config = GrokConfig(**values)
    from .tasks import matrix_names  # imports torch: not at the parser's import

    names = matrix_names(config)
    if config.circuit_layer not in names:
        raise AuditError(
            f"{where or 'command line'}: circuit_layer must be one of {config.task}'s weight "
            f"matrices ({', '.join(names)}), got {shown(config.circuit_layer)}"
        )
    if config.task == "modadd":
        pairs = config.p * config.p
        cut = int(config.train_fraction * pairs)
        if not 0 < cut < pairs:
            raise AuditError(
                f"{where or 'command line'}: p={config.p} and train_fraction="
                f"{config.train_fraction} leave {cut} of the {pairs} pairs for training; "
                "both the training and the test set need one"
            )
    return config


def load_grok_config(path: str | Path | None, task: str, **overrides: Any) -> GrokConfig:
    """`task`'s preset, updated by the YAML file, then by the non-None `overrides`; each
    value checked, and refused in one line naming the file's key or the flag."""
    if task not in TASKS:
        raise AuditError(f"task must be one of {', '.join(TASKS)}, got {shown(task)}")
    values: dict[str, Any] = GrokConfig().to_dict() | {"task": task, **PRESETS[task]}
    if path is not None:
        data = read_yaml(Path(path), "grok config")
        if data is None:  # an empty file
            data = {}
        if not isinstance(data, dict):
            raise AuditError(f"{path}: a grok config is a mapping of keys to values")
        _check_values(data, str(path))
        if data.get("task", task) != task:
            raise AuditError(f"{path}: this config is for task {data['task']!r}, not {task!r}")
        values = _validated(values | data, str(path)).to_dict()
    flags = {k: v for k, v in overrides.items() if v is not None}
    _check_values(flags, None)
    return _validated(values | flags, None)


def check_threads(threads: Any) -> int:
    """--threads: torch's CPU threads, 1 to MAX_THREADS (torch.set_num_threads(0) raises)."""
    if not (is_count(threads) and 1 <= threads <= MAX_THREADS):
        raise AuditError(
            f"--threads must be a whole number from 1 to {MAX_THREADS}, got {shown(threads)}"
        )
    return threads


def first_difference(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...]) -> str | None:
    """The first setting (by name), other than `ignore`, whose value differs between two
    run configs (run.json's "config"): what resuming and comparing twins refuse."""
    for key in sorted(set(a) | set(b)):
        if key not in ignore and a.get(key) != b.get(key):
            return key
    return None
