"""The two canonical grokking models, small enough to read in one sitting.

Why named tensors: checkpoints are saved as safetensors and audited by the same pipeline
as a large model, so each weight matrix must be one 2-D tensor under a readable name
(`fc1.weight`, `W_Q`, ...). Shapes follow the paper's setups (configs/grok-*.yaml).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


class MLP(nn.Module):
    """d_in -> width (x depth) -> n_out with ReLU (the paper's 784 -> 200 -> 200 -> 10);
    every weight and bias scaled by `init_scale`. No defaults: a run's sizes and scale
    are its settings (grok/settings.py)."""

    def __init__(self, d_in: int, width: int, depth: int, n_out: int, init_scale: float) -> None:
        super().__init__()
        dims = [d_in] + [width] * depth + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(init_scale)

    def forward(self, x: torch.Tensor, hidden: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; post-ReLU activations are appended to `hidden` when given."""
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
            if hidden is not None:
                hidden.append(x)
        return self.layers[-1](x)

    def named_matrices(self) -> dict[str, torch.Tensor]:
        """Tensors as saved: fc1.weight (200x784), fc1.bias, ..., fc3.weight (10x200)."""
        out = {}
        for i, layer in enumerate(self.layers, start=1):
            out[f"fc{i}.weight"] = layer.weight
            out[f"fc{i}.bias"] = layer.bias
        return out


class ModAddTransformer(nn.Module):
    """One-layer attention + MLP transformer on [a, b, =] (Nanda et al. 2023).

    No LayerNorm, no attention biases; only the last position's output is computed,
    since the loss reads only it. `p` and `init_scale` are settings (grok/settings.py,
    no defaults here); the other sizes are the architecture's.
    """

    def __init__(
        self,
        p: int,
        d_model: int = 128,
        n_heads: int = 4,
        d_mlp: int = 512,
        n_ctx: int = 3,
        *,
        init_scale: float,
    ) -> None:
        super().__init__()
        d_vocab = p + 1
        self.n_heads, self.d_head = n_heads, d_model // n_heads

        def param(*shape: int, fan: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape) * init_scale / fan**0.5)

        self.embed = param(d_vocab, d_model, fan=d_model)
        self.pos = param(n_ctx, d_model, fan=d_model)
        self.W_Q = param(d_model, d_model, fan=d_model)
        self.W_K = param(d_model, d_model, fan=d_model)
        self.W_V = param(d_model, d_model, fan=d_model)
        self.out_proj = param(d_model, d_model, fan=d_model)
        self.fc1 = param(d_mlp, d_model, fan=d_model)
        self.fc1_bias = nn.Parameter(torch.zeros(d_mlp))
        self.fc2 = param(d_model, d_mlp, fan=d_model)
        self.fc2_bias = nn.Parameter(torch.zeros(d_model))
        self.unembed = param(p, d_model, fan=d_vocab)

    def forward(
        self, tokens: torch.Tensor, hidden: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Logits over the p residues at the last position, for tokens of shape (B, 3).

        Why tables: a position's input is embed[token] + pos[position], so its query, key
        and value are rows of (embed + pos[i]) @ W^T, a (positions x vocab x d) table
        computed once per step and gathered, instead of three matmuls per example: 40%
        fewer multiply-adds per full-batch step, the same function.
        """
        b, t = tokens.shape
        x = self.embed[None] + self.pos[:, None]  # (T, V, d): every token at every position
        at = torch.arange(t, device=tokens.device)

        def heads(w: torch.Tensor) -> torch.Tensor:  # (B, H, T, dh)
            return (x @ w.T)[at, tokens].view(b, t, self.n_heads, self.d_head).transpose(1, 2)

        q = (x[-1] @ self.W_Q.T)[tokens[:, -1]].view(b, self.n_heads, 1, self.d_head)
        k, v = heads(self.W_K), heads(self.W_V)
        att = torch.softmax(q @ k.transpose(-1, -2) / self.d_head**0.5, dim=-1)  # causal: last
        z = (att @ v).reshape(b, -1)
        r = x[at[-1], tokens[:, -1]] + z @ self.out_proj.T
        h = torch.relu(r @ self.fc1.T + self.fc1_bias)
        if hidden is not None:
            hidden.append(h)
        r = r + h @ self.fc2.T + self.fc2_bias
        return r @ self.unembed.T

    def named_matrices(self) -> dict[str, torch.Tensor]:
        """Tensors as saved, one 2-D matrix per audited layer (plus biases)."""
        names = (
            "embed",
            "pos",
            "W_Q",
            "W_K",
            "W_V",
            "out_proj",
            "fc1",
            "fc1_bias",
            "fc2",
            "fc2_bias",
            "unembed",
        )
        return {n: getattr(self, n) for n in names}


def weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """The 2-D tensors of `model.named_matrices()`: what the audit and the measures see."""
    return {n: t for n, t in model.named_matrices().items() if t.ndim == 2 and n != "pos"}
