"""The training loop: log-spaced checkpoints, measures at each, exact resume.

Why log-spaced: the three phases span four decades of steps (10^2 to 10^6+), so equal
spacing would either miss the early phases or write thousands of checkpoints. Every
checkpoint step gets: evaluation and the progress measures, a safetensors file of the
weights (what the audit reads), one line in metrics.jsonl, and then the resume state.
The resume state is written last, so a run killed anywhere resumes from the last
complete checkpoint and redoes at most one interval; batches are a pure function of
(seed, step), so the resumed run takes exactly the same path. An interval is long near
the end (1.4 million steps before 10^7, hours of CPU), so SIGINT and SIGTERM do not kill:
the step in progress finishes, the resume state is saved at that step, and the run stops
without losing a step (a second signal stops at once). A machine that goes down sends no
signal, so the state is also saved every `SAVE_EVERY_S` seconds between checkpoints: a
power-off costs minutes, not the hours of a late interval.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import AuditError
from ..files import write_atomic
from ..grok import measures
from ..inputs import read_capped
from ..run.progress import stderr_progress
from .settings import GrokConfig
from .tasks import Task

# audits the checkpoint (step, weights file) and evaluates its ablations with the
# accuracy function given; returns columns for its row
OnCheckpoint = Callable[[int, Path, Callable[[Mapping[str, np.ndarray]], float]], dict[str, Any]]


def checkpoint_steps(steps: int, per_decade: int) -> list[int]:
    """0, then round(10^(k/per_decade)) up to `steps`, and `steps` itself; unique, sorted."""
    out = {0, steps}
    k = 0
    while (s := round(10 ** (k / per_decade))) <= steps:
        out.add(s)
        k += 1
    return sorted(out)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    host = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(host, tmp, metadata=meta))


def save_state(path: Path, task: Task, opt: torch.optim.Optimizer, step: int) -> None:
    """Model parameters and the optimizer's moments, as safetensors (no pickle)."""
    tensors = {f"model.{k}": v for k, v in task.model.state_dict().items()}
    for index, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value)
    _atomic_save(tensors, path, {"step": str(step)})


def state_step(path: Path) -> int:
    """The step a resume state was saved at (its header's metadata), without its tensors."""
    try:
        with safe_open(path, "pt") as fh:
            return int((fh.metadata() or {})["step"])
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise AuditError(f"{path}: not a grok state file ({err})") from None


def load_state(path: Path, task: Task, opt: torch.optim.Optimizer) -> int:
    """Restore what `save_state` wrote; the step it was written at."""
    with safe_open(path, "pt", device=str(task.train_x.device)) as fh:
        step = int(fh.metadata()["step"])
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
    task.model.load_state_dict(
        {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    )
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return step


@torch.no_grad()
def evaluate(task: Task, circuit_layer: str, mask: torch.Tensor) -> dict[str, float]:
    """Accuracy and loss on both sets, and the paper's progress measures."""
    model = task.model
    hidden: list[torch.Tensor] = []
    train_logits = model(task.train_x, hidden)
    test_logits = model(task.test_x)
    return {
        "train_acc": float((train_logits.argmax(-1) == task.train_y).double().mean()),
        "test_acc": float((test_logits.argmax(-1) == task.test_y).double().mean()),
        "train_loss": float(task.loss(train_logits, task.train_y)),
        "test_loss": float(task.loss(test_logits, task.test_y)),
        "l2_norm": measures.l2_norm(model),
        "abs_weight_entropy": measures.abs_weight_entropy(model),
        "activation_sparsity": measures.activation_sparsity(hidden),
        "circuit_complexity": measures.local_circuit_complexity(
            model, task.train_x, circuit_layer, mask
        ),
        "max_abs_weight": max(
            float(w.abs().max()) for w in measures.weight_matrices(model).values()
        ),
    }


@torch.no_grad()
def accuracy_with(task: Task, replaced: Mapping[str, np.ndarray]) -> float:
    """Test accuracy of `task.model` with the named matrices replaced; the model is put
    back as it was."""
    params = task.model.named_matrices()
    saved = {name: params[name].detach().clone() for name in replaced}
    try:
        for name, value in replaced.items():
            params[name].copy_(torch.as_tensor(value))
        logits = task.model(task.test_x)
        return float((logits.argmax(-1) == task.test_y).double().mean())
    finally:
        for name, value in saved.items():
            params[name].copy_(value)


ABLATED = "ablated"  # a row whose trap ablations were evaluated


def backfill_ablations(
    task: Task, rows: list[dict[str, Any]], out: Path, on_checkpoint: OnCheckpoint
) -> None:
    """Evaluate the ablations of `rows` written before they existed, where the
    checkpoint's weights are still in out/checkpoints; the model is put back as it was."""
    todo = [r for r in rows if not r.get(ABLATED)]
    current = {k: v.detach().clone() for k, v in task.model.named_matrices().items()}
    try:
        for row in todo:
            weights = out / "checkpoints" / f"step-{row['step']:09d}.safetensors"
            if not weights.exists():
                continue
            with safe_open(weights, "pt", device=str(task.train_x.device)) as fh:
                saved = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118
            with torch.no_grad():
                for name, param in task.model.named_matrices().items():
                    param.copy_(saved[name])
            row.update(on_checkpoint(row["step"], weights, partial(accuracy_with, task)))
            row[ABLATED] = True
    finally:
        with torch.no_grad():
            for name, param in task.model.named_matrices().items():
                param.copy_(current[name])


MAX_METRICS_BYTES = 64 * 2**20  # ~2 KB a checkpoint, ~120 checkpoints to 10^7 steps


def read_metrics(path: Path, upto: float = float("inf")) -> list[dict[str, Any]]:
    """The metrics rows of checkpoints up to step `upto` (none if the file is absent)."""
    if not path.exists():
        return []
    text = read_capped(path, MAX_METRICS_BYTES).decode("utf-8")  # a FIFO would hang here
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


@contextmanager
def deferred_stop() -> Iterator[list[int]]:
    """While inside: SIGINT or SIGTERM is recorded in the list yielded instead of stopping
    the process, so that the loop stops between steps; a second one raises
    KeyboardInterrupt at once. Outside the main thread (where handlers cannot be set)
    signals keep their usual effect."""
    received: list[int] = []

    def record(signum: int, frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    before = {s: signal.signal(s, record) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


SAVE_EVERY_S = 600.0  # the resume state's age at most; one save is ~5 MB, milliseconds


def optimizer(model: torch.nn.Module, config: GrokConfig) -> torch.optim.AdamW:
    """The run's AdamW, from its settings (also what benchmarks/device_check.py times)."""
    return torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=True,  # the same update, one kernel: 8% faster per step on the CPU here
    )


def train_step(task: Task, opt: torch.optim.Optimizer, config: GrokConfig, step: int) -> None:
    """Step `step` (counted from 0): its batch, loss, gradient and update."""
    if step <= config.warmup_steps:  # linear warm-up: a function of the step
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup_steps, 1))
    x, y = task.batch(step)
    loss = task.loss(task.model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def train(
    task: Task,
    config: GrokConfig,
    out: Path,
    on_checkpoint: OnCheckpoint,
    resume: bool,
    init_from: Path | None = None,
) -> list[dict[str, Any]]:
    """Train `task.model` for `config.steps` steps; the metrics rows, one per checkpoint.

    `on_checkpoint(step, weights_file, accuracy)` audits a checkpoint and returns columns
    for its row; rows of an earlier session without ablations get them first, where their
    checkpoint's weights are still on disk.
    `init_from`: another run's state.safetensors to start from (weights and Adam moments,
    so the other run goes on under this run's settings); this run's steps count from 0.
    """
    model = task.model
    opt = optimizer(model, config)
    state_path, metrics_path = out / "state.safetensors", out / "metrics.jsonl"
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    step = 0
    if resume and state_path.exists():
        step = load_state(state_path, task, opt)
    elif resume:
        raise AuditError(f"{out}: nothing to resume (no state.safetensors)")
    elif init_from is not None:
        load_state(init_from, task, opt)
    rows = read_metrics(metrics_path, step)
    backfill_ablations(task, rows, out, on_checkpoint)
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mask = measures.circuit_mask(model, config.circuit_layer, config.seed).to(task.train_x.device)
    todo = [s for s in checkpoint_steps(config.steps, config.checkpoints_per_decade) if s > step]
    if step == 0 and not rows:
        todo.insert(0, 0)
    # counts the steps of this session, so that rate and ETA stay right after a resume
    label = f"grok {config.task}" + (f" (resumed at step {step})" if step else "")
    progress = stderr_progress(label, "steps")
    t0, first = time.perf_counter(), step
    save_at = t0 + SAVE_EVERY_S
    with deferred_stop() as stop:
        for target in todo:
            model.train()
            while step < target and not stop:
                train_step(task, opt, config, step)
                step += 1
                if step % 256 == 0:
                    progress(step - first, config.steps - first)
                if time.perf_counter() >= save_at:
                    save_state(state_path, task, opt, step)
                    save_at = time.perf_counter() + SAVE_EVERY_S
            if step == target:
                model.eval()
                row: dict[str, Any] = {"step": step, **evaluate(task, config.circuit_layer, mask)}
                weights = ckpt_dir / f"step-{step:09d}.safetensors"
                _atomic_save(model.named_matrices(), weights, {"step": str(step)})
                row |= on_checkpoint(step, weights, partial(accuracy_with, task))
                row[ABLATED] = True
                row["train_seconds"] = round(time.perf_counter() - t0, 3)
                rows.append(row)
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            save_state(state_path, task, opt, step)
            if stop:
                name = signal.Signals(stop[0]).name
                print(
                    f"grok {config.task}: {name}: stopped at step {step}, state saved",
                    file=sys.stderr,
                )
                raise KeyboardInterrupt
    progress(config.steps - first, config.steps - first)
    if step > first:
        rate = (step - first) / (time.perf_counter() - t0)
        print(f"grok {config.task}: {step - first} steps, {rate:.0f} steps/s", file=sys.stderr)
    return rows
