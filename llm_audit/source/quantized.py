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
never audited alone. compressed-tensors' symmetric `pack-quantized` weights (W4A16,
W8A16) are unpacked (`intpack`) and scaled the same way, checked against
compressed-tensors' own decompressor; other integer-packed weights are skipped with a
reason that names their format: we decode only what a test can check exactly.

Scales go by several names: `weight_scale_inv` (DeepSeek-V3, transformers), `weight_scale`
(compressed-tensors, fbgemm, ModelOpt), `qscale_weight` (Mistral) and a bare `scale` beside
the weight (DeepSeek-V4) — the last two are what transformers' own FP8 loader renames to
`weight_scale_inv`. An FP8 weight whose scales this module cannot place is skipped, never
read as raw codes (lambda_max off by 10^6). U8 scales are E8M0 exponents when the config
says so (transformers' `scale_fmt: ue8m0`, compressed-tensors' MXFP8).

torchao (transformers' `quant_method: torchao`) stores a quantized `P.w` flattened, as
`P._w_qdata` beside `P._w_scale` (and `P._w_zero_point`, ...): the report names the matrix
`P.w`, FP8 `qdata` is dequantized with its scale like any other FP8 weight, and integer
`qdata` is skipped as packed. compressed-tensors' 2:4-sparse weights keep half of each row
(`P.compressed`, with `P.bitmask` saying where it goes): read alone, that half is another
matrix, so it is skipped with its format named.

Formats are recognised from config.json's `quantization_config` (and MLX's `quantization`)
and from tensor names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..inputs import shown
from . import intpack
from .dtypes import TensorMeta

FP8_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
SCALE_DTYPES = frozenset({"F32", "BF16", "F16", "F8_E8M0"})  # E8M0: ue8m0 powers of two


@dataclass(frozen=True)
class WeightScales:
    """The scales of a quantized weight [out, in] (FP8 values, or integer codes): `tensor`
    holds one scale per `block` (rows, cols) of the weight, [ceil(out / rows),
    ceil(in / cols)]; `label` for reports; `dtype` what the scale bytes decode as (E8M0
    for U8 exponent bytes)."""

    tensor: str
    block: tuple[int, int]
    label: str
    dtype: str


@dataclass(frozen=True)
class PackedInts:
    """A compressed-tensors `pack-quantized` weight: `bits`-bit signed codes q, `cols`
    per row of the [out, in] weight (`intpack`), W = (q - z) * s with `scales` s and, if
    asymmetric, the `zero_point` tensor z (one per scale, packed along the rows)."""

    bits: int
    cols: int
    scales: WeightScales
    zero_point: str | None


# Last name component -> what the tensor is. Weight state belongs to the `.weight` (or
# compressed-tensors' `.weight_packed`) beside it, GPTQ/AWQ state to the `.qweight`.
_WEIGHT_STATE = {
    "weight_scale_inv": "FP8 weight scales",
    "weight_scale": "weight scales",
    "weight_global_scale": "weight global scale",
    "weight_zero_point": "weight zero points",
    "weight_g_idx": "weight group index",
    "weight_shape": "packed weight's shape",
    "weight_scale_2": "weight global scale",
    "qscale_weight": "FP8 weight scales",
}
_ACTIVATION_STATE = {
    "input_scale": "activation scale (not a weight)",
    "input_global_scale": "activation scale (not a weight)",
    "input_zero_point": "activation zero point (not a weight)",
    "output_scale": "activation scale (not a weight)",
    "input_scale_ub": "activation scale (not a weight)",
    "activation_scale": "activation scale (not a weight)",
    "qscale_act": "activation scale (not a weight)",
    "k_scale": "KV-cache scale (not a weight)",
    "v_scale": "KV-cache scale (not a weight)",
}
# Scale names beside an FP8 `P.weight`, first match wins. The block-style ones take the
# block size from config.json when they are not per-tensor / per-channel / per-group.
_BLOCK_SCALE_NAMES = ("weight_scale_inv", "qscale_weight", "scale")
_SCALE_NAMES = ("weight_scale_inv", "weight_scale", "qscale_weight", "scale")
# optimum-quanto's frozen weights: `P.weight._data` (qint4: `P.weight._data._data`, packed)
# beside `P.weight._scale` (and `_shift`).
_QUANTO_DATA = re.compile(r"^(.*\.weight)\._data(?:\._data)?$")
# Dtypes a quantized weight is stored in (a `P.scale` beside one of these is its scale).
_QUANTIZED_DTYPES = FP8_DTYPES | {"U8", "I8", "U32", "I32"}
_GPTQ_STATE = {"qzeros": "zero points", "scales": "scales", "g_idx": "group index"}
_TORCHAO_DATA = re.compile(r"^(.*)\._(.+)_qdata$")  # torchao's flattened `P._w_qdata`
_SPARSE_STATE = {"bitmask": "2:4 sparsity bitmask", "shape": "dense shape"}  # `P.compressed`
_MARLIN24_STATE = {"scale_packed": "scales", "meta": "2:4 sparsity metadata"}
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


def _groups(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """compressed-tensors' `quantization_config.config_groups` values (the objects only)."""
    qc = config.get("quantization_config")
    groups = qc.get("config_groups") if isinstance(qc, Mapping) else None
    if not isinstance(groups, Mapping):
        return []
    return [g for g in groups.values() if isinstance(g, Mapping)]


def _format(config: Mapping[str, Any]) -> str | None:
    """compressed-tensors' format ("float-quantized", "nvfp4-pack-quantized", ...): the
    top-level one, else the one all its config groups share."""
    qc = config.get("quantization_config")
    top = qc.get("format") if isinstance(qc, Mapping) else None
    if isinstance(top, str) and top != "mixed-precision":
        return top
    formats = {g.get("format") for g in _groups(config)}
    one = formats.pop() if len(formats) == 1 else None
    return one if isinstance(one, str) else None


def _mlx_bits(config: Mapping[str, Any]) -> int | None:
    """MLX's quantization width (config.json `quantization.bits`), or None."""
    mlx = config.get("quantization")
    bits = mlx.get("bits") if isinstance(mlx, Mapping) else None
    return bits if isinstance(bits, int) and not isinstance(bits, bool) else None


def torchao_weight(name: str) -> str | None:
    """The weight `P.w` that torchao's flattened `P._w_qdata` holds, or None."""
    match = _TORCHAO_DATA.match(name)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _torchao_data(name: str, tensors: Mapping[str, Any]) -> str | None:
    """The `P._w_qdata` whose state `name` (`P._w_scale`, `P._w_zero_point`, ...) is."""
    module, _, last = name.rpartition(".")
    if not last.startswith("_"):
        return None
    cuts = (i for i, c in enumerate(last) if c == "_" and i > 1)
    owners = (f"{module}.{last[:i]}_qdata" for i in cuts)
    return next((o for o in owners if o != name and o in tensors), None)


def _sparsity_format(config: Mapping[str, Any]) -> str:
    """compressed-tensors' `quantization_config.sparsity_config.format`."""
    qc = config.get("quantization_config")
    sparsity = qc.get("sparsity_config") if isinstance(qc, Mapping) else None
    fmt = sparsity.get("format") if isinstance(sparsity, Mapping) else None
    return fmt if isinstance(fmt, str) else "sparse-24-bitmask"


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
    if last in _WEIGHT_STATE and any(
        prefix + weight in tensors for weight in (".weight", ".weight_packed", ".compressed")
    ):
        return f"{_WEIGHT_STATE[last]} (read with their weight, never audited alone)"
    if (data := _torchao_data(name, tensors)) is not None:
        return f"torchao quantization state of {torchao_weight(data)} (never audited alone)"
    if last in _SPARSE_STATE and prefix + ".compressed" in tensors:
        return f"compressed-tensors {_SPARSE_STATE[last]} of a 2:4-sparse weight"
    if last in _MARLIN24_STATE and prefix + ".weight_packed" in tensors:
        return f"compressed-tensors marlin-24 {_MARLIN24_STATE[last]} of a packed weight"
    if last in _ACTIVATION_STATE:
        return _ACTIVATION_STATE[last]
    if last in _GPTQ_STATE and prefix + ".qweight" in tensors:
        return f"{_packed_format(config)} {_GPTQ_STATE[last]} of a packed weight"
    if _BNB_STATE.search(name):
        return "bitsandbytes quantization state"
    weight = tensors.get(prefix + ".weight")
    dtype = getattr(weight, "dtype", None)
    if last == "scale" and dtype in _QUANTIZED_DTYPES:
        return "weight scales (read with their weight, never audited alone)"
    if last in ("scales", "biases") and dtype in ("U32", "U8"):
        return f"MLX quantization {last} of a packed weight"
    quanto = prefix + "._data" in tensors or prefix + "._data._data" in tensors
    if last in ("_scale", "_shift") and prefix.endswith(".weight") and quanto:
        return "optimum-quanto quantization state of a weight"
    return None


def packed_reason(
    name: str, meta: TensorMeta, tensors: Mapping[str, Any], config: Mapping[str, Any]
) -> str | None:
    """Why the weight `name` is integer-packed and not decoded, naming its format; or None
    (compressed-tensors' `weight_packed`: `packed_ints`)."""
    if name.endswith(".qweight"):
        return f"{_packed_format(config)}-packed {meta.dtype} weight (not decoded)"
    if name.endswith(".compressed") and name[: -len("compressed")] + "bitmask" in tensors:
        return f"compressed-tensors {_sparsity_format(config)} {meta.dtype} weight (not decoded)"
    if torchao_weight(name) and (meta.dtype not in FP8_DTYPES or len(meta.shape) != 2):
        return f"torchao-quantized {meta.dtype} weight of shape {list(meta.shape)} (not decoded)"
    quanto = _QUANTO_DATA.match(name)
    if quanto and quanto.group(1) + "._scale" in tensors:
        return f"optimum-quanto quantized {meta.dtype} weight (not decoded)"
    if not name.endswith(".weight"):
        return None
    prefix = name[: -len(".weight")]
    if meta.dtype in ("U32", "U8") and prefix + ".scales" in tensors:
        bits = _mlx_bits(config)
        width = f"{bits}-bit " if bits else ""
        return f"MLX {width}quantized {meta.dtype} weight (not decoded)"
    if meta.dtype in ("U8", "I8"):
        if any(name + suffix in tensors for suffix in _BNB_WEIGHT_STATE):
            return "bitsandbytes 4-bit weight (not decoded)"
        if prefix + ".SCB" in tensors:
            return "bitsandbytes int8 weight (not decoded)"
        scale = tensors.get(prefix + ".weight_scale")
        if scale is not None and meta.dtype == "U8" and scale.dtype == "F8_E4M3":
            return "NVFP4 packed 4-bit weight (not decoded)"  # E4M3 scales per 16 values
        if scale is not None and meta.dtype == "U8" and scale.dtype in ("U8", "F8_E8M0"):
            method = quant_method(config) or "MX"  # AMD Quark: E8M0 exponents per 32 values
            return f"{method} MXFP4 packed 4-bit weight (not decoded)"
        if scale is not None:
            method = quant_method(config) or "int"
            return f"{method} int8-quantized weight (not decoded)"
    return None


def _pair(value: Any) -> tuple[int, int] | None:
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in value)
    ):
        return value[0], value[1]
    return None


def _block_size(config: Mapping[str, Any]) -> tuple[int, int] | None:
    """The FP8 weight block (rows, cols): `quantization_config.weight_block_size`
    (DeepSeek, transformers), else the `block_structure` every compressed-tensors group
    with strategy "block" shares."""
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping):
        return None
    if (block := _pair(qc.get("weight_block_size"))) is not None:
        return block
    blocks = set()
    for group in _groups(config):
        weights = group.get("weights")
        if isinstance(weights, Mapping) and weights.get("strategy") == "block":
            blocks.add(_pair(weights.get("block_structure")))
    return blocks.pop() if len(blocks) == 1 else None


def _e8m0_bytes(config: Mapping[str, Any]) -> bool:
    """Whether U8 scales hold E8M0 exponents: transformers' `scale_fmt: ue8m0`, or a
    compressed-tensors MX format (`mxfp8-quantized`)."""
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping) and qc.get("scale_fmt") == "ue8m0":
        return True
    return (_format(config) or "").startswith("mxfp")


def _scale_name(name: str, tensors: Mapping[str, TensorMeta]) -> str | None:
    if torchao_weight(name):
        scale = name[: -len("qdata")] + "scale"
        return scale if scale in tensors else None
    prefix = name[: -len("weight")]
    return next((prefix + s for s in _SCALE_NAMES if prefix + s in tensors), None)


def fp8_scales(
    name: str, meta: TensorMeta, tensors: Mapping[str, TensorMeta], config: Mapping[str, Any]
) -> WeightScales | str | None:
    """How the FP8 weight `name` is scaled: its `WeightScales`, a reason to skip it (scales
    that do not fit, or that this module cannot find although they are there), or None
    when it has no scales (plain FP8 values)."""
    torchao = torchao_weight(name) is not None
    if meta.dtype not in FP8_DTYPES or not (name.endswith(".weight") or torchao):
        return None
    scale_name = _scale_name(name, tensors)
    if scale_name is None:
        return _missing_scales(config)
    scale = tensors[scale_name]
    shape, scale_shape = tuple(meta.shape), tuple(scale.shape)
    scale_dtype = scale.dtype
    if scale_dtype == "U8" and _e8m0_bytes(config):
        scale_dtype = "F8_E8M0"
    if scale_dtype not in SCALE_DTYPES:
        return f"FP8 weight whose scales are {scale.dtype} (not decoded)"
    if len(shape) != 2:
        return f"FP8 weight of shape {list(shape)} with scales: only 2-D weights are dequantized"
    block_style = scale_name.rpartition(".")[2] in _BLOCK_SCALE_NAMES
    found = _scale_layout(scale_shape, (shape[0], shape[1]), config, block_style, torchao)
    if found is not None:
        block, label = found
        return WeightScales(scale_name, block, f"{meta.dtype} {label} scaled", scale_dtype)
    if block_style and _block_size(config) is None:
        return (
            f"FP8 block scales {list(scale_shape)} without quantization_config."
            "weight_block_size in config.json"
        )
    return (
        f"FP8 weight {list(shape)} whose scales {list(scale_shape)} fit no known layout "
        f"(per-tensor, per-channel, group, block)"
    )


def _int_weights(config: Mapping[str, Any]) -> tuple[int, str, int | None, bool] | str:
    """(bits, strategy, group size, symmetric) of the integer weight scheme every
    compressed-tensors config group shares, or why there is no one such scheme this module
    decodes."""
    schemes = set()
    for group in _groups(config):
        weights = group.get("weights")
        if not isinstance(weights, Mapping) or weights.get("type", "int") != "int":
            continue
        bits, strategy, size = (weights.get(k) for k in ("num_bits", "strategy", "group_size"))
        symmetric = weights.get("symmetric", True)
        scheme = (bits, strategy, size if strategy == "group" else None, symmetric)
        if not all(isinstance(v, int | float | str | None) for v in scheme):
            return f"weights {shown(scheme)} are not plain values"
        schemes.add(scheme)
    if len(schemes) != 1:
        return f"{len(schemes)} integer weight schemes in quantization_config.config_groups"
    bits, strategy, size, symmetric = schemes.pop()
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in intpack.BITS:
        return f"num_bits {bits!r} (decoded: {', '.join(map(str, intpack.BITS))})"
    if strategy not in ("group", "channel", "tensor"):
        return f"strategy {strategy!r}"
    if strategy == "group" and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        return f"group_size {size!r}"
    if not isinstance(symmetric, bool) or (not symmetric and strategy == "tensor"):
        return f"symmetric {symmetric!r} with strategy {strategy!r}"
    return bits, strategy, size, symmetric


def packed_ints(
    name: str, meta: TensorMeta, tensors: Mapping[str, TensorMeta], config: Mapping[str, Any]
) -> PackedInts | str | None:
    """How compressed-tensors' `P.weight_packed` unpacks (`PackedInts`), or why it is not
    decoded (another packed format, zero points, a group index, a shape that does not
    fit config.json's scheme); None if `name` is not one."""
    if not name.endswith(".weight_packed"):
        return None
    fmt = _format(config) or "pack-quantized"
    what = f"compressed-tensors {fmt} {meta.dtype} weight"
    if fmt != "pack-quantized":
        return f"{what} (not decoded)"
    scheme = _int_weights(config)
    prefix = name[: -len("weight_packed")]
    if isinstance(scheme, str):
        return f"{what}: {scheme} (not decoded)"
    if prefix + "weight_g_idx" in tensors:
        return f"{what} with a group index (not decoded)"
    scale = tensors.get(prefix + "weight_scale")
    if meta.dtype != "I32" or len(meta.shape) != 2 or scale is None:
        return f"{what} of shape {list(meta.shape)}: only 2-D I32 words with a weight_scale"
    bits, strategy, size, symmetric = scheme
    zero = tensors.get(prefix + "weight_zero_point")
    if symmetric == (zero is not None):
        have = "with" if zero is not None else "without"
        return f"{what} {have} zero points where config.json says symmetric {symmetric}"
    rows, words = (int(d) for d in meta.shape)
    scale_shape = tuple(int(d) for d in scale.shape)
    cols = scale_shape[-1] * size if size and len(scale_shape) == 2 else words * 32 // bits
    found = _scale_layout(scale_shape, (rows, cols), {})
    if intpack.words_per_row(cols, bits) != words or found is None:
        return (
            f"{what} [{rows}, {words}] with scales {list(scale_shape)} does not fit "
            f"{bits}-bit {strategy} codes (not decoded)"
        )
    if scale.dtype not in SCALE_DTYPES - {"F8_E8M0"}:
        return f"{what} whose scales are {scale.dtype} (not decoded)"
    block, label = found
    if zero is not None and (
        zero.dtype != "I32"
        or tuple(zero.shape) != (intpack.words_per_row(rows, bits), scale_shape[-1])
        or len(scale_shape) != 2
    ):
        return f"{what}: zero points {zero.dtype} {list(zero.shape)} are not packed per scale"
    kind = "asymmetric " if zero is not None else ""
    label = f"INT{bits} {kind}{label} scaled"
    scales = WeightScales(prefix + "weight_scale", block, label, scale.dtype)
    return PackedInts(bits, cols, scales, None if zero is None else prefix + "weight_zero_point")


def _scale_layout(
    scale_shape: tuple[int, ...],
    shape: tuple[int, int],
    config: Mapping[str, Any],
    block_style: bool = False,
    torchao: bool = False,
) -> tuple[tuple[int, int], str] | None:
    """(block, label) of scales `scale_shape` over a weight of `shape` (out, in):
    per tensor, per channel, per group of columns, config.json's block, or torchao's
    shape-over-block; None if they fit none."""
    rows, cols = shape
    block = _block_size(config)
    label = f"block {block[0]}x{block[1]}" if block else ""
    if math.prod(scale_shape) == 1 and len(scale_shape) <= 2:
        block, label = (rows, cols), "per-tensor"
    elif block_style and block is not None:
        pass  # DeepSeek's block grid, even where it would also read as per-channel
    elif scale_shape in ((rows,), (rows, 1)):
        block, label = (1, cols), "per-channel"
    elif (
        len(scale_shape) == 2
        and scale_shape[0] == rows
        and scale_shape[1]
        and not cols % scale_shape[1]
    ):
        block, label = (1, cols // scale_shape[1]), f"group {cols // scale_shape[1]}"
    elif (
        torchao
        and len(scale_shape) == 2
        and all(scale_shape)
        and not (rows % scale_shape[0] or cols % scale_shape[1])
    ):  # Float8Tensor's scale is the shape over its block_size, exactly
        block = (rows // scale_shape[0], cols // scale_shape[1])
        label = f"block {block[0]}x{block[1]}"
    if block is not None:
        grid = (-(-rows // block[0]), -(-cols // block[1]))
        if math.prod(scale_shape) == math.prod(grid) and (
            len(scale_shape) < 2 or scale_shape == grid
        ):
            return block, label
    return None


def _missing_scales(config: Mapping[str, Any]) -> str | None:
    """Why an FP8 weight with no scale under a known name is not read as raw codes: the
    config declares a quantization method, so its scales are somewhere we do not look;
    None for plain FP8 values."""
    method = quant_method(config)
    if method is None:
        return None
    return (
        f"FP8 weight without scales under a known name ({', '.join(_SCALE_NAMES)}) although "
        f"config.json declares {method} quantization (not decoded)"
    )
