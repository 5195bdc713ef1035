"""The progress measures the anti-grokking paper compares correlation traps against.

Why here and not in the audit: they need the model's forward pass and its training
inputs, which the spectral audit deliberately never sees. Definitions follow the
anti-grokking paper's "other progress measures" (Prakash & Martin 2026).
"""

from __future__ import annotations

import torch
from torch import nn

from .models import weight_matrices


def l2_norm(model: nn.Module) -> float:
    """sqrt of the sum of squared Frobenius norms of the weight matrices."""
    return float(
        sum(w.detach().double().pow(2).sum() for w in weight_matrices(model).values()) ** 0.5
    )


def abs_weight_entropy(model: nn.Module) -> float:
    """-sum |w| log |w| over the weight matrices (0 log 0 = 0)."""
    total = 0.0
    for w in weight_matrices(model).values():
        a = w.detach().double().abs()
        total -= float(torch.special.xlogy(a, a).sum())
    return total


def activation_sparsity(hidden: list[torch.Tensor]) -> float:
    """Fraction of post-ReLU activations <= 0, per hidden layer, averaged over layers."""
    return float(sum((h <= 0).double().mean() for h in hidden) / len(hidden))


def circuit_mask(model: nn.Module, layer: str, seed: int, fraction: float = 0.1) -> torch.Tensor:
    """A random, fixed boolean mask of `fraction` of `layer`'s weights (the ones zeroed)."""
    shape = weight_matrices(model)[layer].shape
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < fraction  # on the CPU: the same mask anywhere


@torch.no_grad()
def local_circuit_complexity(
    model: nn.Module, inputs: torch.Tensor, layer: str, mask: torch.Tensor
) -> float:
    """sum over inputs of KL(softmax f_W(x) || softmax f_W'(x)), W' = W with `mask` zeroed."""
    logp = torch.log_softmax(model(inputs).double(), dim=-1)
    weight = weight_matrices(model)[layer]
    saved = weight.detach().clone()
    try:
        weight.masked_fill_(mask, 0.0)
        logq = torch.log_softmax(model(inputs).double(), dim=-1)
    finally:
        weight.copy_(saved)
    return float((logp.exp() * (logp - logq)).sum())
