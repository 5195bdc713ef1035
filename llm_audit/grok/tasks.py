"""The two setups as data + model + loss: what the training loop needs and nothing more.

Why one small interface: the loop, the checkpoint schedule, the resume logic and the
measures are the same for both setups; only these differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UsageError
from .mnist import load_mnist
from .models import MLP, ModAddTransformer, weight_matrices
from .settings import MNIST_CLASSES, GrokConfig

MLP_DEPTH = 2  # hidden layers of the MNIST MLP


@dataclass
class Task:
    """A model with its training and test sets, and how to draw a step's batch."""

    model: nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    data_source: str
    mse: bool  # MSE on one-hot targets (the MNIST setup) instead of cross-entropy
    batch_size: int  # 0: full batch
    seed: int
    _epoch: int = field(default=-1, init=False, repr=False)
    _perm: torch.Tensor | None = field(default=None, init=False, repr=False)

    def to(self, device: torch.device) -> Task:
        """Model and data on `device` (initialized on the CPU first: the same init anywhere)."""
        self.model.to(device)
        for name in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mse:
            return F.mse_loss(logits, F.one_hot(labels, logits.shape[-1]).to(logits.dtype))
        return F.cross_entropy(logits, labels)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s batch: a pure function of (seed, step), so a resumed run is exact."""
        n = len(self.train_x)
        if not self.batch_size or self.batch_size >= n:
            return self.train_x, self.train_y
        per_epoch = n // self.batch_size
        epoch, k = divmod(step, per_epoch)
        if self._perm is None or self._epoch != epoch:
            self._epoch = epoch
            perm = np.random.default_rng([self.seed, epoch]).permutation(n)
            self._perm = torch.from_numpy(perm).to(self.train_x.device)
        idx = self._perm[k * self.batch_size : (k + 1) * self.batch_size]
        return self.train_x[idx], self.train_y[idx]


def _stratified(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` indices, n/10 per class, drawn with `seed`, in a seeded order."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    per = n // len(classes)
    if counts.min() < per:
        short = classes[np.argmin(counts)]
        raise UsageError(
            f"n_train={n} needs {per} training images of each class; class {short} has "
            f"{counts.min()} (MNIST has 5,421 or more of each)"
        )
    picks = [rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in classes]
    return rng.permutation(np.concatenate(picks))


def _model(config: GrokConfig, d_in: int) -> nn.Module:
    """The task's model, freshly initialized (`d_in`: the MLP's input size; modadd has
    none)."""
    if config.task == "mlp-mnist":
        return MLP(d_in, config.width, MLP_DEPTH, MNIST_CLASSES, config.init_scale)
    return ModAddTransformer(config.p, init_scale=config.init_scale)


def matrix_names(config: GrokConfig) -> list[str]:
    """The names of the weight matrices `config`'s model has (what circuit_layer may
    name): its model built on the meta device (no memory, no random numbers drawn), at
    the smallest size, since the names do not depend on the sizes."""
    with torch.device("meta"):
        model = _model(replace(config, width=1, p=2), d_in=1)
    return list(weight_matrices(model))


def mlp_mnist(config: GrokConfig, data: str | Path | None, cache: Path) -> Task:
    """MLP on 1,000 stratified MNIST training images, tested on the full test set."""
    digits = load_mnist(data, cache)
    dtype = getattr(torch, config.dtype)
    idx = _stratified(digits.train_y, config.n_train, config.seed)
    torch.manual_seed(config.seed)
    model = _model(config, digits.train_x.shape[1]).to(dtype)
    return Task(
        model,
        torch.from_numpy(digits.train_x[idx]).to(dtype),
        torch.from_numpy(digits.train_y[idx]),
        torch.from_numpy(digits.test_x).to(dtype),
        torch.from_numpy(digits.test_y),
        digits.source,
        mse=True,
        batch_size=config.batch_size,
        seed=config.seed,
    )


def modadd(config: GrokConfig) -> Task:
    """(a + b) mod p from [a, b, =]; a seeded `train_fraction` of all p*p pairs trains."""
    p = config.p
    a, b = np.divmod(np.arange(p * p), p)
    tokens = np.stack([a, b, np.full_like(a, p)], axis=1)
    order = np.random.default_rng(config.seed).permutation(p * p)
    cut = int(config.train_fraction * p * p)
    tokens, labels = torch.from_numpy(tokens[order]), torch.from_numpy((a + b)[order] % p)
    torch.manual_seed(config.seed)
    dtype = getattr(torch, config.dtype)
    model = _model(config, d_in=0).to(dtype)
    return Task(
        model,
        tokens[:cut],
        labels[:cut],
        tokens[cut:],
        labels[cut:],
        f"modular addition p={p}",
        mse=False,
        batch_size=0,
        seed=config.seed,
    )


def build_task(config: GrokConfig, data: str | Path | None, cache: Path) -> Task:
    return mlp_mnist(config, data, cache) if config.task == "mlp-mnist" else modadd(config)
