"""Quantized checkpoints: which tensors are weights, which are their scales or codes, and
how an FP8 weight's scales cover it.

Why: the largest open models ship in FP8 (DeepSeek-V3/R1: `weight` in F8_E4M3 with
`weight_scale_inv` per 128x128 block; compressed-tensors / fbgemm: `weight_scale` per
output channel or per tensor), and smaller ones in integer-packed formats (GPTQ, AWQ,
compressed-tensors `pack-quantized`, bitsandbytes). Read without its scales an FP8
weight's spectrum is off by the square of the scales (lambda_max 1.4e7 for 0.45), and
the scales themselves look like small matrices. So the plan pairs each FP8 weight with
its scales — the reader dequantizes exactly, W = q * s per block — and every auxiliary
tensor (scales, zero points, group indices, bitsandbytes state) is skipped with a reason,
never audited alone. Integer-packed weights are skipped with a reason that names their
format: we decode only what a test can check exactly.

Formats are recognised from config.json's `quantization_config` and from tensor names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .dtypes import TensorMeta

FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
SCALE_DTYPES = frozenset({"F32", "BF16", "F16", "F8_E8M0"})  # E8M0: ue8m0 powers of two


@dataclass(frozen=True)
class Fp8Scales:
    """The scales of an FP8 weight [out, in]: `tensor` holds one scale per `block`
    (rows, cols) of the weight, [ceil(out / rows), ceil(in / cols)]; `label` for reports."""

    tensor: str
    block: tuple[int, int]
    label: str


# Last name component -> what the tensor is. Weight state belongs to the `.weight` (or
# compressed-tensors' `.weight_packed`) beside it, GPTQ/AWQ state to the `.qweight`.
_WEIGHT_STATE = {
    "weight_scale_inv": "FP8 weight scales",
    "weight_scale": "weight scales",
    "weight_global_scale": "weight global scale",
    "weight_zero_point": "weight zero points",
    "weight_g_idx": "weight group index",
    "weight_shape": "packed weight's shape",
}
_ACTIVATION_STATE = {
    "input_scale": "activation scale (not a weight)",
    "input_global_scale": "activation scale (not a weight)",
    "input_zero_point": "activation zero point (not a weight)",
    "output_scale": "activation scale (not a weight)",
    "k_scale": "KV-cache scale (not a weight)",
    "v_scale": "KV-cache scale (not a weight)",
}
_GPTQ_STATE = {"qzeros": "zero points", "scales": "scales", "g_idx": "group index"}
# bitsandbytes: 4-bit state hangs off `X.weight.`, int8 row scales are `X.SCB`.
_BNB_WEIGHT_STATE = (
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
)
_BNB_STATE = re.compile(
    r"\.(?:weight(?:\.absmax|\.quant_map|\.nested_absmax|\.nested_quant_map"
    r"|\.quant_state\.bitsandbytes__(?:nf4|fp4)|_format)|SCB)$"
)


def quant_method(config: Mapping[str, Any]) -> str | None:
    """config.json's `quantization_config.quant_method`, lower case (None if absent)."""
    qc = config.get("quantization_config")
    method = qc.get("quant_method") if isinstance(qc, Mapping) else None
    return method.lower() if isinstance(method, str) else None


def _packed_format(config: Mapping[str, Any]) -> str:
    method = quant_method(config)
    return {"gptq": "GPTQ", "awq": "AWQ"}.get(method or "", "GPTQ/AWQ")


def auxiliary_reason(
    name: str, tensors: Mapping[str, Any], config: Mapping[str, Any]
) -> str | None:
    """Why `name` is a quantization auxiliary tensor never audited on its own, or None.

    A tensor counts as auxiliary only next to the weight it belongs to, so an ordinary
    weight that happens to be called `scales` is still audited."""
    prefix, _, last = name.rpartition(".")
    if last in _WEIGHT_STATE and (
        prefix + ".weight" in tensors or prefix + ".weight_packed" in tensors
    ):
        return f"{_WEIGHT_STATE[last]} (read with their weight, never audited alone)"
    if last in _ACTIVATION_STATE:
        return _ACTIVATION_STATE[last]
    if last in _GPTQ_STATE and prefix + ".qweight" in tensors:
        return f"{_packed_format(config)} {_GPTQ_STATE[last]} of a packed weight"
    if _BNB_STATE.search(name):
        return "bitsandbytes quantization state"
    return None


def packed_reason(
    name: str, meta: TensorMeta, tensors: Mapping[str, Any], config: Mapping[str, Any]
) -> str | None:
    """Why the weight `name` is integer-packed and not decoded, naming its format; or None."""
    if name.endswith(".qweight"):
        return f"{_packed_format(config)}-packed {meta.dtype} weight (not decoded)"
    if name.endswith(".weight_packed"):
        return f"compressed-tensors pack-quantized {meta.dtype} weight (not decoded)"
    if name.endswith(".weight") and meta.dtype in ("U8", "I8"):
        prefix = name[: -len(".weight")]
        if any(name + suffix in tensors for suffix in _BNB_WEIGHT_STATE):
            return "bitsandbytes 4-bit weight (not decoded)"
        if prefix + ".SCB" in tensors:
            return "bitsandbytes int8 weight (not decoded)"
        if prefix + ".weight_scale" in tensors:
            method = quant_method(config) or "int"
            return f"{method} int8-quantized weight (not decoded)"
    return None


def _block_size(config: Mapping[str, Any]) -> tuple[int, int] | None:
    qc = config.get("quantization_config")
    block = qc.get("weight_block_size") if isinstance(qc, Mapping) else None
    if (
        isinstance(block, list)
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        return block[0], block[1]
    return None


def fp8_scales(
    name: str, meta: TensorMeta, tensors: Mapping[str, TensorMeta], config: Mapping[str, Any]
) -> Fp8Scales | str | None:
    """How the FP8 weight `name` is scaled: its `Fp8Scales`, a reason to skip it (scales
    that do not fit), or None when it has no scale tensor (plain FP8 values)."""
    if meta.dtype not in FP8_DTYPES or not name.endswith(".weight"):
        return None
    inverse, direct = name + "_scale_inv", name + "_scale"
    scale_name = inverse if inverse in tensors else direct if direct in tensors else None
    if scale_name is None:
        return None
    scale = tensors[scale_name]
    shape, scale_shape = tuple(meta.shape), tuple(scale.shape)
    if scale.dtype not in SCALE_DTYPES:
        return f"FP8 weight whose scales are {scale.dtype} (not decoded)"
    if len(shape) != 2:
        return f"FP8 weight of shape {list(shape)} with scales: only 2-D weights are dequantized"
    rows, cols = shape
    block: tuple[int, int] | None = None
    label = ""
    if scale_name == inverse:
        block = _block_size(config)
        if block is None:
            return "FP8 block scales without quantization_config.weight_block_size in config.json"
        label = f"block {block[0]}x{block[1]}"
    elif math.prod(scale_shape) == 1 and len(scale_shape) <= 2:
        block, label = (rows, cols), "per-tensor"
    elif scale_shape in ((rows,), (rows, 1)):
        block, label = (1, cols), "per-channel"
    elif (
        len(scale_shape) == 2
        and scale_shape[0] == rows
        and scale_shape[1]
        and not cols % scale_shape[1]
    ):
        block, label = (1, cols // scale_shape[1]), f"group {cols // scale_shape[1]}"
    elif _block_size(config) is not None:
        block = _block_size(config)
        label = f"block {block[0]}x{block[1]}"
    if block is not None:
        grid = (-(-rows // block[0]), -(-cols // block[1]))
        if math.prod(scale_shape) == math.prod(grid) and (
            len(scale_shape) < 2 or scale_shape == grid
        ):
            return Fp8Scales(scale_name, block, f"{meta.dtype} {label} scaled")
    return (
        f"FP8 weight {list(shape)} whose scales {list(scale_shape)} fit no known layout "
        f"(per-tensor, per-channel, group, block)"
    )
