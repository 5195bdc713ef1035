"""torch's weight norm: a layer's weight stored as a magnitude g and a direction v.

Why: `torch.nn.utils.weight_norm` and `parametrize.weight_norm` save W = g * v / |v| as its
two halves (wav2vec2's, HuBERT's and WavLM's position conv, audio codecs such as EnCodec
and DAC, HiFi-GAN and other vocoders, whose every conv is weight-normed). Neither half
is the layer: v has other norms and, with g per channel, another spectrum. The auditor
rebuilds W exactly as torch does and audits that, named by the weight the model uses.

Layout, as torch stores it: g keeps v's dimensions with size 1 on every axis the norm
runs over (`norm_except_dim`): [out, 1, ...] for the default dim=0, [1, 1, k] for
wav2vec2's dim=2, a single element for dim=None (the norm of the whole tensor). So the
axes of |v| are read off g's shape and nothing needs to be guessed.
"""

from __future__ import annotations

import math
from collections.abc import Container, Sequence

import numpy as np

from ..errors import DecodeError

# (g, v) suffixes: `weight_norm` and `parametrize.weight_norm`; the weight is `<prefix>weight`
PAIRS = (
    ("weight_g", "weight_v"),
    ("parametrizations.weight.original0", "parametrizations.weight.original1"),
)


def pair_of(name: str, tensors: Container[str]) -> tuple[str, str, str] | None:
    """(g, v, weight) where `name` is half of a weight-norm pair present in `tensors`."""
    for g, v in PAIRS:
        for mine, other in ((g, v), (v, g)):
            if name.endswith("." + mine) and name[: -len(mine)] + other in tensors:
                prefix = name[: -len(mine)]
                return prefix + g, prefix + v, prefix + "weight"
    return None


def shape_problem(g_shape: Sequence[int], v_shape: Sequence[int]) -> str | None:
    """Why g of `g_shape` is not the magnitude of v of `v_shape` as torch stores it, or None."""
    if math.prod(g_shape) == 1 and len(g_shape) in (0, len(v_shape)):
        return None  # the norm of the whole tensor (or of a one-channel one)
    kept = [i for i, d in enumerate(g_shape) if d != 1]
    if len(g_shape) == len(v_shape) and len(kept) == 1 and g_shape[kept[0]] == v_shape[kept[0]]:
        return None
    return (
        f"magnitude g of shape {list(g_shape)} is not torch's keep-dims norm of v "
        f"{list(v_shape)} (one axis of v's size, the others 1)"
    )


def reconstruct(v: np.ndarray, g: np.ndarray) -> np.ndarray:
    """W = g * v / |v|, the norm over the axes where g has size 1, computed in float64 and
    returned in v's dtype. Raises DecodeError where W is undefined or not finite (a zero
    direction, a NaN in g)."""
    axes = tuple(i for i in range(v.ndim) if g.ndim == 0 or g.shape[i] == 1)
    wide = v.astype(np.float64)
    with np.errstate(all="ignore"):
        norms = np.sqrt(np.sum(wide * wide, axis=axes, keepdims=True))
        weight = (g.astype(np.float64) * wide / norms).astype(v.dtype)
    if not np.isfinite(weight).all():
        zero = np.argwhere(norms == 0)
        where = f"v is all zero at {zero[0].tolist()}" if zero.size else "g or v is not finite"
        raise DecodeError(f"weight norm g·v/|v| is not finite: {where}")
    return weight
