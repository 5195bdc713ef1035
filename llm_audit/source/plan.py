"""Which matrices of a checkpoint to audit: every tensor maps to zero or more work units.

Why a separate step: the plan is computed from tensor names, dtypes and shapes alone
(safetensors headers, config.json), before a single weight byte is read, so users see
what will be audited and what it costs (`llm-audit plan`), workers get units that say
exactly which bytes to read, and everything not audited is listed with its reason instead
of vanishing.

What becomes a unit (its kind, layer and expert from `roles`, user `kinds:` rules first):
- 2-D float tensors, one unit each; GPT-2's Conv1D weights, stored [in, out], are
  audited as their transpose (out, in), and the unit says so (`transpose`);
- FP8 weights with their scales (`quantized`): the unit names the scale tensor and block,
  the reader dequantizes; so are compressed-tensors' `pack-quantized` integer weights
  (`weight_packed` + `weight_scale`), named `P.weight`;
- fused qkv weights whose layout the architecture fixes (openai's `attn.qkv`, Phi-3
  `qkv_proj`, GPT-2 `c_attn`, Falcon `query_key_value`): one unit per q, k and v; other
  fused qkv weights keep the kind `qkv_proj`;
- stacked experts, one unit per expert: MXFP4 `*_blocks` (+ `*_scales`) [E, out, G, 16],
  or transformers' dense `mlp.experts.gate_up_proj` / `down_proj` stored [E, in, out];
- conv kernels (out, in, kh, kw): one unit per (kh, kw) slice, as WeightWatcher does;
  Conv1d kernels (out, in, k) (a 3-D tensor with `conv` in its name) one per k, Conv3d
  kernels one per (kd, kh, kw); the file's header says how it stores them: MLX
  (`format: mlx`) as (out, kh, kw, in), TF and Flax as (kh, kw, in, out), their dense
  `kernel`s as [in, out] (audited as the transpose); anything else as PyTorch does;
- weight-normed layers (torch's `weight_g`/`weight_v`, `parametrizations.weight.
  original0/1`): the unit reads v, names its `norm_tensor` g and is named by the weight
  the model uses; the reader rebuilds W = g * v / |v| (`weight_norm`), a matrix or a conv
  kernel as above;
- PEFT LoRA factors (`lora_A`, `lora_B`) are skipped with the reason: a rank-r factor
  is not a layer's weight, and its spectrum says nothing of the model's;
Skipped, with the reason: vectors (norms, biases, sinks), empty tensors, scales and other
quantization state (read with their weight or not at all), integer-packed weights (named
by format), non-float tensors, and matrices with fewer than `min_evals` eigenvalues.
Absurd headers are refused, not looped over: a dimension above `MAX_DIM` or a tensor that
would give more than `MAX_UNITS_PER_TENSOR` units is an `AuditError`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import AuditError
from . import mxfp4, weight_norm
from .dtypes import DTYPE_SIZES, FLOAT_DTYPES, TensorMeta, not_float_reason
from .quantized import (
    FP8_DTYPES,
    PackedInts,
    WeightScales,
    auxiliary_reason,
    fp8_scales,
    packed_ints,
    packed_reason,
    torchao_weight,
)
from .roles import (
    KINDS,
    KindRule,
    config_of,
    fused_qkv_split,
    layer_of,
    role_of,
    stored_transposed,
    user_kind,
)

MAX_DIM = 2**40  # larger than any real weight dimension (2^40 elements of one row)
MAX_UNITS_PER_TENSOR = 2**20  # experts x conv positions of one tensor
_MXFP4_BLOCKS = re.compile(
    r"^(.*\.(?:gate_up_proj|down_proj|mlp1_weight|mlp2_weight))(_blocks|\.blocks)$"
)
_MXFP4_SCALES = re.compile(
    r"^(.*\.(?:gate_up_proj|down_proj|mlp1_weight|mlp2_weight))(_scales|\.scales)$"
)
_LN = re.compile(r"(?:^|\.)ln(?:_\w+)?\.(?:weight|bias)$")  # GPT-2's ln_1, ln_f
_STACK_SCALES = ("_scale", "_scale_inv", "_scales", "_weight_scale", "_weight_scale_inv")
# Expert stacks [E, a, b], one matrix per expert: transformers' gpt-oss and Llama 4 store
# [E, in, out] (used as x @ W[e]), and so do Aria's `experts.fc1/fc2`; GraniteMoE (and its
# shared and hybrid variants) and mlx-lm's SwitchGLU [E, out, in] (F.linear(x, W[e])). The
# flag: stored transposed, as each family's checkpoints on the hub are. Where config.json's
# hidden size tells a and b apart, it decides instead: transformers 5 saves Qwen3-VL-MoE's
# stacks in its in-memory [E, out, in], the hub holds them [E, in, out], under the same names.
_STACKED_EXPERTS = (
    (re.compile(r"\.(?:mlp|feed_forward)\.experts\.(?:gate_up_proj|down_proj)$"), True),
    (re.compile(r"\.experts\.(?:fc1|fc2)\.weight$"), True),
    (re.compile(r"\.block_sparse_moe\.(?:input_linear|output_linear)\.weight$"), False),
    (re.compile(r"\.switch_mlp\.(?:gate_proj|up_proj|down_proj)\.weight$"), False),  # mlx-lm
)
# Each stack's fused gate_up name and its down name, for the orientation of a down stack
# whose two sides are both the hidden size.
_GATE_UP_OF_DOWN = (
    ("down_proj", "gate_up_proj"),
    ("fc2.weight", "fc1.weight"),
    ("output_linear.weight", "input_linear.weight"),
)
_FUSED_GATE_UP = ("gate_up_proj", "mlp1_weight", "input_linear.weight", "fc1.weight")
_STACK_PARTS = ((".gate_proj", "expert_gate"), (".up_proj", "expert_up"))  # mlx-lm's
# Buffers saved beside the weights that are constants, not linear maps (MiniMax's
# lightning attention decays).
_CONSTANTS = re.compile(r"(?:^|\.)(?:diagonal_decay|query_decay|key_decay|slope_rate)$")
# Buffers and parameters that are statistics or per-head biases, not linear maps: a vector
# quantizer's running codebook statistics (EnCodec's embed_avg, Mimi's embed_sum), the
# relative-position attention's per-head biases (Conformer's pos_bias_u/v).
_NOT_MAPS = (
    (re.compile(r"\.codebook\.(?:embed_avg|embed_sum|cluster_usage|cluster_size)$"),
     "a codebook's running statistics (a buffer), not a linear map"),
    (re.compile(r"\.pos_bias_[uv]$"), "per-head position biases, not a linear map"),
)  # fmt: skip
# What a module's weight is called (PyTorch, MLX, TF/Flax): a kernel-shaped tensor under
# another name is a bare parameter (a position table, a constant), not a conv kernel.
_MODULE_WEIGHT = re.compile(r"(?:^|[./])(?:weight|kernel)(?::\d+)?$")
_CONV_NAME = re.compile(r"conv", re.IGNORECASE)
# the `format` a safetensors header's metadata gives, for how its kernels are stored
_KERNEL_LAYOUTS = {"mlx": "mlx", "tf": "tf", "flax": "tf"}
_TF_DENSE = re.compile(r"(?:^|[./])kernel(?::\d+)?$")  # TF/Flax Dense weights, [in, out]
_PLAIN_FLOATS = FLOAT_DTYPES - FP8_DTYPES  # a weight norm's halves: never scaled codes
# LoRA factors: PEFT's lora_A [r, in], lora_B [out, r], the embedding's lora_embedding_A/B
# (kohya's and diffusers' LoRA files: lora_down [r, in], lora_up [out, r])
_LORA = re.compile(r"(?:^|\.)lora_(?:A|B|down|up|embedding_A|embedding_B)(?:\.|$)")
# DBRX flattens each layer's experts into 2-D [E * ffn, d]: expert e is rows e*ffn:(e+1)*ffn.
# w1 (gate) and v1 (up) are (out, in) per expert; w2 (down) is used as h @ w2[e], so it is
# stored (in, out). The expert count is config.json's ffn_config.moe_num_experts.
_FLAT_EXPERTS = re.compile(r"\.ffn\.experts\.mlp\.(w1|v1|w2)$")
_FLAT_EXPERT_KINDS = {"w1": "expert_gate", "v1": "expert_up", "w2": "expert_down"}


@dataclass(frozen=True)
class MatrixUnit:
    """One matrix to audit and exactly how to read it.

    `layout` says how the bytes of `tensor` become the matrix:
    - "dense": the 2-D tensor itself;
    - "transposed": a 2-D tensor stored [in, out] (GPT-2's Conv1D), audited as its transpose;
    - "rows": rows `row_start:row_stop` of a 2-D tensor (a fused qkv, a DBRX expert),
      transposed if `transpose`;
    - "split": in each group of `row_period` rows of the (out, in) matrix (the transpose
      of the stored tensor if `transpose`), rows `row_start:row_stop` (Falcon, GPT-2 qkv);
    - "expert": slice `expert` of a stacked [E, a, b] tensor (`transpose` if stored in x out);
    - "mxfp4": slice `expert` of `tensor` (blocks) and `scales_tensor`, decoded;
    - "conv": the (out, in) slice at kernel `position` of a conv kernel, stored as
      `kernel_layout` says: "pt" [out, in, *k], "mlx" [out, *k, in], "tf" [*k, in, out]
      (TF and Flax); see `kernel_index`.
    FP8 weights name their `scales_tensor`, `scale_block` (rows, cols per scale) and
    `scale_dtype` (what the scale bytes decode as); the reader multiplies them in; so do
    compressed-tensors' packed integer weights, whose rows the reader first unpacks into
    `int_bits`-bit codes (`intpack`), less their `zero_tensor` if asymmetric. A
    weight-normed layer names its magnitude g as `norm_tensor` (`tensor` is the direction
    v); the reader rebuilds W = g * v / |v| before taking the layout's slice. `shape`
    is the matrix as audited, (out, in); `transpose` says the stored tensor is its
    transpose, so trap coordinates (row, col) are (col, row) there; `nbytes` is what
    reading it costs.
    """

    id: str
    tensor: str
    kind: str
    layer: int | None
    expert: int | None
    shape: tuple[int, int]
    source_dtype: str
    nbytes: int
    layout: str = "dense"
    scales_tensor: str | None = None
    transpose: bool = False
    row_start: int | None = None
    row_stop: int | None = None
    row_period: int | None = None
    scale_block: tuple[int, int] | None = None
    scale_dtype: str | None = None
    position: tuple[int, ...] = ()
    kernel_layout: str = "pt"
    norm_tensor: str | None = None
    int_bits: int | None = None
    zero_tensor: str | None = None


def kernel_index(unit: MatrixUnit, row: int | slice, col: int | slice) -> tuple[int | slice, ...]:
    """Where entry (row, col) of a conv unit's matrix is in its stored kernel (slices for
    the whole matrix): [out, in, *k] (PyTorch), [out, *k, in] (MLX), [*k, in, out] (TF)."""
    if unit.kernel_layout == "mlx":
        return (row, *unit.position, col)
    if unit.kernel_layout == "tf":
        return (*unit.position, col, row)
    return (row, col, *unit.position)


def unit_matrix(unit: MatrixUnit, whole: np.ndarray) -> np.ndarray:
    """The unit's (out, in) matrix (a view where one exists), from its whole decoded
    tensor: for layouts that need the whole (a split qkv, a conv kernel, a weight-normed
    weight); "mxfp4" units are decoded from their blocks instead."""
    if unit.layout == "conv":
        matrix = whole[kernel_index(unit, slice(None), slice(None))]
        return matrix.T if unit.kernel_layout == "tf" else matrix
    if unit.layout == "expert":
        whole = whole[unit.expert]
    elif unit.layout == "rows":
        whole = whole[unit.row_start : unit.row_stop]
    elif unit.layout not in ("dense", "transposed", "split"):
        raise ValueError(f"unit layout {unit.layout!r} is not read from a whole tensor")
    matrix = whole.T if unit.transpose else whole
    if unit.layout != "split":
        return matrix
    keep = np.arange(matrix.shape[0]) % unit.row_period
    return matrix[(keep >= unit.row_start) & (keep < unit.row_stop)]


@dataclass(frozen=True)
class SkippedTensor:
    """A tensor that yields no unit, and why. `weight`: a weight matrix left unaudited (a
    format not read, an unknown layout, too small), not a vector, an empty tensor or a
    part read with its weight (scales, zero points)."""

    name: str
    reason: str
    weight: bool = True


@dataclass
class Plan:
    """Units in checkpoint order and the skipped tensors; summaries for `llm-audit plan`."""

    units: list[MatrixUnit] = field(default_factory=list)
    skipped: list[SkippedTensor] = field(default_factory=list)

    def counts_by_kind(self) -> dict[str, int]:
        counts = Counter(u.kind for u in self.units)
        known = {kind: counts[kind] for kind in KINDS if counts[kind]}
        return known | {kind: n for kind, n in sorted(counts.items()) if kind not in known}

    def bytes_to_read(self) -> int:
        return sum(u.nbytes for u in self.units)

    def largest(self) -> MatrixUnit | None:
        return max(self.units, key=lambda u: u.shape[0] * u.shape[1], default=None)

    def skipped_reasons(self, weights_only: bool = False) -> dict[str, int]:
        """Skip counts by reason, most common first (only weights left out, if asked)."""
        skips = [s for s in self.skipped if s.weight or not weights_only]
        return dict(Counter(s.reason for s in skips).most_common())

    def skipped_list(self) -> list[dict[str, str]]:
        """Every skipped tensor (or unit) with its reason, in checkpoint order."""
        return [{"name": s.name, "reason": s.reason} for s in self.skipped]


def _expert_kind(name: str) -> str:
    """The kind of the expert stack `name` (or of an MXFP4 pair's base name)."""
    if name.endswith(_FUSED_GATE_UP):
        return "expert_gate_up"
    stem = name.removesuffix(".weight")
    return next((kind for part, kind in _STACK_PARTS if stem.endswith(part)), "expert_down")


def _hidden_sizes(config: Mapping[str, Any]) -> set[int]:
    """config.json's hidden size, and its text model's (a multimodal config nests it)."""
    sizes = set()
    for where in (config, config.get("text_config")):
        value = where.get("hidden_size") if isinstance(where, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool):
            sizes.add(value)
    return sizes


def _stored_in_out(name: str, shape: Sequence[int], hidden: set[int]) -> bool | None:
    """Whether the expert stack `name` [E, a, b] is stored [E, in, out], from which side is
    the hidden size (a gate_up, gate or up stack's input, a down stack's output); None if both or
    neither side is."""
    a, b = shape[1] in hidden, shape[2] in hidden
    if a == b:
        return None
    return b if _expert_kind(name) == "expert_down" else a


def _flat_experts(name: str, config: Mapping[str, Any], rows: int) -> int | None:
    """The expert count of DBRX's flattened expert weight `name` of `rows` rows, or None
    (not one, or config.json does not say how many experts divide its rows)."""
    ffn = config.get("ffn_config")
    experts = ffn.get("moe_num_experts") if isinstance(ffn, dict) else None
    if not _FLAT_EXPERTS.search(name) or isinstance(experts, bool):
        return None
    if not isinstance(experts, int) or experts <= 0:
        return None
    return experts if rows % experts == 0 else None


def _stacked_experts(name: str) -> bool | None:
    """Whether the expert stack `name` is stored transposed; None if it is not one."""
    return next((t for pattern, t in _STACKED_EXPERTS if pattern.search(name)), None)


def _vector_reason(name: str) -> str:
    lowered = name.lower()
    if "norm" in lowered or _LN.search(lowered):
        return "norm (vector)"
    if lowered.endswith("bias"):
        return "bias (vector)"
    if lowered.endswith("sinks"):
        return "attention sinks (vector)"
    return "vector"


class _Planner:
    def __init__(
        self,
        tensors: Mapping[str, TensorMeta],
        config: Mapping[str, Any],
        min_evals: int,
        rules: Sequence[KindRule],
        formats: Mapping[str, str],
    ) -> None:
        self.tensors = tensors
        self.config = config
        self.min_evals = min_evals
        self.rules = rules
        self.formats = formats
        self.plan = Plan()

    def kind(self, name: str, default: str) -> str:
        """The user's `kinds:` rule's kind for `name` if one matches, else `default`."""
        return user_kind(name, self.rules) or default

    def kernel_layout(self, name: str) -> str:
        """How the file of `name` stores kernels and dense weights (`_KERNEL_LAYOUTS`)."""
        return _KERNEL_LAYOUTS.get(self.formats.get(name, ""), "pt")

    def skip(self, name: str, reason: str, weight: bool = True) -> None:
        self.plan.skipped.append(SkippedTensor(name, reason, weight))

    def add(self, unit: MatrixUnit) -> None:
        rows, cols = unit.shape
        if self.too_small(unit.shape):
            self.skip(
                unit.id, f"too small: {rows}x{cols} has fewer than {self.min_evals} eigenvalues"
            )
        else:
            self.plan.units.append(unit)

    def too_small(self, shape: tuple[int, int]) -> bool:
        return min(shape) < self.min_evals

    def units_cap(self, name: str, count: int) -> None:
        if count > MAX_UNITS_PER_TENSOR:
            raise AuditError(
                f"tensor {name[:200]!r} would give {count} matrices "
                f"(more than {MAX_UNITS_PER_TENSOR}): refusing an absurd header"
            )

    def visit(self, name: str, meta: TensorMeta) -> None:
        shape = tuple(int(d) for d in meta.shape)
        if any(d > MAX_DIM for d in shape):
            raise AuditError(
                f"tensor {name[:200]!r}: shape {list(shape)} has a dimension above {MAX_DIM}"
            )
        blocks = _MXFP4_BLOCKS.match(name)
        auxiliary = auxiliary_reason(name, self.tensors, self.config)
        packed = packed_reason(name, meta, self.tensors, self.config)
        if blocks:
            self.visit_mxfp4(name, blocks.group(1), blocks.group(2), meta.dtype, shape)
        elif auxiliary:  # before MXFP4 scales: GPTQ's and MLX's `down_proj.scales` too
            self.skip(name, auxiliary, weight=False)
        elif _MXFP4_SCALES.match(name):
            self.check_scales_have_blocks(name)
        elif packed:
            self.skip(name, packed)
        elif (ints := packed_ints(name, meta, self.tensors, self.config)) is not None:
            if isinstance(ints, str):
                self.skip(name, ints)
            else:
                weight = name.removesuffix("_packed")
                self.visit_matrix(name, meta, (shape[0], ints.cols), weight, ints=ints)
        elif (pair := weight_norm.pair_of(name, self.tensors)) is not None:
            self.visit_weight_norm(name, meta, shape, *pair)
        elif meta.dtype not in FLOAT_DTYPES:  # a counter (BatchNorm's), a mask: not weights
            weight = len(shape) >= 2 and meta.dtype != "BOOL"
            self.skip(name, not_float_reason(meta.dtype), weight=weight)
        elif len(shape) <= 1 or name.endswith("bias"):  # stacked expert biases are 2-D
            self.skip(name, _vector_reason(name), weight=False)
        elif 0 in shape:
            self.skip(name, f"empty tensor of shape {list(shape)}", weight=False)
        elif _LORA.search(name):
            rank = f" (rank {min(shape)})" if len(shape) == 2 else ""
            self.skip(name, f"LoRA factor{rank} of an adapter: audit the model merged with it")
        elif name.endswith(".A_log"):  # Mamba, Jamba: [d_inner, d_state] decay rates
            self.skip(name, "SSM state decay (A_log), not a linear map", weight=False)
        elif _CONSTANTS.search(name):
            self.skip(name, "attention decay constants (a buffer), not a linear map", weight=False)
        elif (why := next((w for p, w in _NOT_MAPS if p.search(name)), None)) is not None:
            self.skip(name, why, weight=False)
        elif len(shape) == 3 and (transposed := _stacked_experts(name)) is not None:
            self.visit_expert_stack(name, meta.dtype, shape, self.orientation(name, transposed))
        elif len(shape) == 2 and (experts := _flat_experts(name, self.config, shape[0])):
            self.visit_flat_experts(name, meta, shape, experts)
        elif len(shape) == 2:
            self.visit_matrix(name, meta, shape)
        elif len(shape) in (4, 5) or (len(shape) == 3 and _CONV_NAME.search(name)):
            if _MODULE_WEIGHT.search(name):
                self.visit_conv(name, meta.dtype, shape)
            else:
                what = f"a {len(shape)}-D parameter of shape {list(shape)}"
                self.skip(name, f"{what} that is no module's weight (a table, a constant)", False)
        elif shape[0] == 1:  # timm's cls_token [1, 1, D], pos_embed [1, N, D]; SigLIP's probe
            table = sum(d > 1 for d in shape) >= 2
            what = "a parameter table (position table, learned tokens)" if table else "vector"
            self.skip(name, f"{what} of shape {list(shape)}, not a layer's weight", weight=False)
        else:
            self.skip(name, f"{len(shape)}-D tensor of shape {list(shape)} is not a known layout")

    def visit_weight_norm(
        self, name: str, meta: TensorMeta, shape: tuple[int, ...], g: str, v: str, weight: str
    ) -> None:
        """Half of a weight-norm pair: v becomes the units of W = g * v / |v| (a matrix, or
        a conv kernel whatever its name: a Linear's weight is 2-D), g is read with it."""
        if name == g:
            self.skip(name, "weight norm's magnitude g (read with its direction v)", False)
            return
        g_meta = self.tensors[g]
        not_float = [m.dtype for m in (meta, g_meta) if m.dtype not in _PLAIN_FLOATS]
        if not_float:
            problem: str | None = f"{not_float[0]} is not a plain float dtype"
        elif len(shape) < 2 or 0 in shape:
            problem = f"direction v of shape {list(shape)} is not a layer's weight"
        else:
            problem = weight_norm.shape_problem(g_meta.shape, shape)
        if problem:
            self.skip(name, f"weight norm of {weight}: {problem}")
        elif len(shape) == 2:
            self.visit_matrix(name, meta, shape, weight=weight, norm=g)
        else:
            self.visit_conv(name, meta.dtype, shape, weight=weight, norm=g)

    def orientation(self, name: str, default: bool) -> bool:
        """Whether the expert stack `name` is stored [E, in, out] (see `_STACKED_EXPERTS`)."""
        hidden = _hidden_sizes(self.config)
        found = _stored_in_out(name, self.tensors[name].shape, hidden)
        for down, gate_up in _GATE_UP_OF_DOWN:
            if found is None and name.endswith(down):
                sibling = self.tensors.get(name[: -len(down)] + gate_up)
                if sibling is not None and len(sibling.shape) == 3:
                    found = _stored_in_out(gate_up, sibling.shape, hidden)
        return default if found is None else found

    def visit_matrix(
        self,
        tensor: str,
        meta: TensorMeta,
        shape: tuple[int, ...],
        weight: str | None = None,
        norm: str | None = None,
        ints: PackedInts | None = None,
    ) -> None:
        """A 2-D weight of `shape` (as stored, or as unpacked from packed integers `ints`);
        `weight` names the matrix where `tensor` is not the weight itself (a weight norm's
        v with its g `norm`, packed codes)."""
        scales = ints.scales if ints else fp8_scales(tensor, meta, self.tensors, self.config)
        if isinstance(scales, str):
            self.skip(tensor, scales)
            return
        name = weight or torchao_weight(tensor) or tensor  # the matrix is named by its weight
        role = role_of(name, self.rules)
        config = config_of(name, self.config)
        transpose = stored_transposed(name, config) or (
            self.kernel_layout(tensor) == "tf" and bool(_TF_DENSE.search(name))
        )
        out, fan_in = (shape[1], shape[0]) if transpose else (shape[0], shape[1])
        split = fused_qkv_split(name, config, out) if role.kind == "qkv_proj" else None
        dtype = scales.label if scales else meta.dtype
        nbytes = self.read_cost(meta, scales, 0, shape[0], shape[1]) + self.norm_cost(norm)
        common = {
            "scales_tensor": scales.tensor if scales else None,
            "scale_block": scales.block if scales else None,
            "scale_dtype": scales.dtype if scales else None,
            "transpose": transpose,
            "norm_tensor": norm,
            "int_bits": ints.bits if ints else None,
            "zero_tensor": ints.zero_point if ints else None,
        }
        if split is None:
            self.add(
                MatrixUnit(
                    id=name,
                    tensor=tensor,
                    kind=role.kind,
                    layer=role.layer,
                    expert=role.expert,
                    shape=(out, fan_in),
                    source_dtype=dtype,
                    nbytes=nbytes,
                    layout="transposed" if transpose else "dense",
                    **common,
                )
            )
            return
        groups = out // split.period
        contiguous = groups == 1 and not transpose and norm is None  # |v| needs all of v
        for kind, start, stop in split.parts:
            rows = (stop - start) * groups
            cost = self.read_cost(meta, scales, start, stop, shape[1]) if contiguous else nbytes
            self.add(
                MatrixUnit(
                    id=f"{name}:{kind[0]}",
                    tensor=tensor,
                    kind=kind,
                    layer=role.layer,
                    expert=None,
                    shape=(rows, fan_in),
                    source_dtype=dtype,
                    nbytes=cost,
                    layout="rows" if contiguous else "split",
                    row_start=start,
                    row_stop=stop,
                    row_period=None if contiguous else split.period,
                    **common,
                )
            )

    def norm_cost(self, norm: str | None) -> int:
        """Bytes of a weight norm's magnitude g, read with each of its v's units."""
        if norm is None:
            return 0
        meta = self.tensors[norm]
        return math.prod(meta.shape) * DTYPE_SIZES[meta.dtype]

    def read_cost(
        self, meta: TensorMeta, scales: WeightScales | None, first: int, stop: int, cols: int
    ) -> int:
        """Bytes read for rows `first:stop` of a stored 2-D weight, with their scale rows
        (`cols`: the weight's columns, which its scales cover)."""
        cost = (stop - first) * meta.shape[1] * DTYPE_SIZES[meta.dtype]
        if scales is not None:
            scale_meta = self.tensors[scales.tensor]
            block_rows, block_cols = scales.block
            scale_rows = (stop - 1) // block_rows + 1 - first // block_rows
            grid_cols = -(-cols // block_cols)
            cost += scale_rows * grid_cols * DTYPE_SIZES[scale_meta.dtype]
        return cost

    def visit_mxfp4(
        self, name: str, base: str, sep: str, dtype: str, shape: tuple[int, ...]
    ) -> None:
        scales = base + sep.replace("blocks", "scales")
        if dtype != "U8" or len(shape) != 4 or shape[-1] != mxfp4.BYTES_PER_BLOCK:
            self.skip(
                name, f"MXFP4 blocks must be U8 [E, rows, groups, 16], got {dtype} {list(shape)}"
            )
            return
        meta = self.tensors.get(scales)
        if meta is None:
            raise AuditError(f"tensor {name!r}: MXFP4 blocks without their scales {scales!r}")
        if meta.dtype != "U8" or tuple(meta.shape) != shape[:3]:
            raise AuditError(
                f"tensor {scales!r}: MXFP4 scales must be U8 {list(shape[:3])}, "
                f"got {meta.dtype} {list(meta.shape)}"
            )
        experts, rows, groups, _ = shape
        matrix = (rows, groups * mxfp4.BLOCK)
        if 0 in shape or self.too_small(matrix):
            self.skip_stack(name, experts, matrix)
            return
        self.units_cap(name, experts)
        per_expert = rows * groups * (mxfp4.BYTES_PER_BLOCK + 1)
        kind, layer = self.kind(name, _expert_kind(base)), layer_of(name)
        for e in range(experts):
            self.add(
                MatrixUnit(
                    id=f"{base}[{e}]",
                    tensor=name,
                    kind=kind,
                    layer=layer,
                    expert=e,
                    shape=matrix,
                    source_dtype="MXFP4",
                    nbytes=per_expert,
                    layout="mxfp4",
                    scales_tensor=scales,
                )
            )

    def skip_stack(self, name: str, experts: int, matrix: tuple[int, int]) -> None:
        """One skip for a whole stack whose every expert would be skipped: a zero-size or
        tiny [E, a, b] header costs the same to plan whatever E says."""
        rows, cols = matrix
        if experts == 0 or rows == 0 or cols == 0:
            self.skip(name, f"empty expert stack of {experts} x {rows}x{cols}")
        else:
            self.skip(
                name,
                f"too small: {experts} experts of {rows}x{cols}, fewer than "
                f"{self.min_evals} eigenvalues",
            )

    def check_scales_have_blocks(self, name: str) -> None:
        base = _MXFP4_SCALES.match(name)
        assert base is not None
        if not any(base.group(1) + s in self.tensors for s in ("_blocks", ".blocks")):
            raise AuditError(f"tensor {name!r}: MXFP4 scales without their blocks")
        self.skip(name, "MXFP4 scales (read with their blocks)", weight=False)

    def visit_flat_experts(
        self, name: str, meta: TensorMeta, shape: tuple[int, ...], experts: int
    ) -> None:
        if fp8_scales(name, meta, self.tensors, self.config) is not None:
            self.skip(
                name, "FP8 flattened experts with scales: only 2-D FP8 weights are dequantized"
            )
            return
        per, width = shape[0] // experts, shape[1]
        part = _FLAT_EXPERTS.search(name).group(1)  # type: ignore[union-attr]
        transpose = part == "w2"
        kind = self.kind(name, _FLAT_EXPERT_KINDS[part])
        matrix = (width, per) if transpose else (per, width)
        if self.too_small(matrix):
            self.skip_stack(name, experts, matrix)
            return
        self.units_cap(name, experts)
        for e in range(experts):
            self.add(
                MatrixUnit(
                    id=f"{name}[{e}]",
                    tensor=name,
                    kind=kind,
                    layer=layer_of(name),
                    expert=e,
                    shape=matrix,
                    source_dtype=meta.dtype,
                    nbytes=self.read_cost(meta, None, e * per, (e + 1) * per, width),
                    layout="rows",
                    transpose=transpose,
                    row_start=e * per,
                    row_stop=(e + 1) * per,
                )
            )

    def visit_expert_stack(
        self, name: str, dtype: str, shape: tuple[int, ...], transposed: bool
    ) -> None:
        experts, fan_in, fan_out = shape if transposed else (shape[0], shape[2], shape[1])
        if dtype in FP8_DTYPES and any(name + s in self.tensors for s in _STACK_SCALES):
            self.skip(name, "FP8 expert stack with scales: only 2-D FP8 weights are dequantized")
            return
        if self.too_small((fan_out, fan_in)):
            self.skip_stack(name, experts, (fan_out, fan_in))
            return
        self.units_cap(name, experts)
        per_expert = fan_in * fan_out * DTYPE_SIZES[dtype]
        kind, layer = self.kind(name, _expert_kind(name)), layer_of(name)
        for e in range(experts):
            self.add(
                MatrixUnit(
                    id=f"{name}[{e}]",
                    tensor=name,
                    kind=kind,
                    layer=layer,
                    expert=e,
                    shape=(fan_out, fan_in),
                    source_dtype=dtype,
                    nbytes=per_expert,
                    layout="expert",
                    transpose=transposed,
                )
            )

    def visit_conv(
        self,
        tensor: str,
        dtype: str,
        shape: tuple[int, ...],
        weight: str | None = None,
        norm: str | None = None,
    ) -> None:
        """Conv kernels of 1 to 3 spatial dimensions: one (out, in) matrix per kernel
        position, wherever the file's layout puts out and in (`kernel_index`); `weight`
        names the kernel where `tensor` is a weight norm's v (with its g `norm`)."""
        name = weight or tensor
        layout = self.kernel_layout(tensor)
        if layout == "tf":
            *kernel, fan_in, out = shape
        elif layout == "mlx":
            out, *kernel, fan_in = shape
        else:
            out, fan_in, *kernel = shape
        if self.too_small((out, fan_in)):
            self.skip(name, f"too small: conv kernel {list(shape)} slices are {out}x{fan_in}")
            return
        self.units_cap(name, math.prod(kernel))  # before a position is listed
        # The reader decodes the kernel once for all its positions: each slice costs its share.
        per_slice = out * fan_in * DTYPE_SIZES[dtype] + self.norm_cost(norm) // math.prod(kernel)
        kind, layer = self.kind(name, "conv"), layer_of(name)
        for position in itertools.product(*(range(k) for k in kernel)):
            self.add(
                MatrixUnit(
                    id=f"{name}[{','.join(map(str, position))}]",
                    tensor=tensor,
                    kind=kind,
                    layer=layer,
                    expert=None,
                    shape=(out, fan_in),
                    source_dtype=dtype,
                    nbytes=per_slice,
                    layout="conv",
                    position=position,
                    kernel_layout=layout,
                    norm_tensor=norm,
                )
            )


def build_plan(
    tensors: Mapping[str, TensorMeta],
    config: Mapping[str, Any] | None = None,
    *,
    min_evals: int,
    kind_rules: Sequence[KindRule] = (),
    formats: Mapping[str, str] | None = None,
) -> Plan:
    """Map every tensor (name -> dtype and shape) to audit units or a skip reason.

    `config` (the model's config.json) gives the architecture (fused qkv layouts, GPT-2's
    Conv1D) and the quantization (FP8 block size, packed formats); `kind_rules` are the
    user's `kinds:` rules (`roles.parse_kind_rules`), tried before the naming table;
    `formats` the `format` each tensor's file header gives (how MLX, TF and Flax files
    store kernels).
    Raises `AuditError` for inconsistent MXFP4 pairs, fused qkv weights that the config
    does not describe, and absurd shapes: those are broken checkpoints.
    """
    planner = _Planner(tensors, config or {}, min_evals, kind_rules, formats or {})
    for name, meta in tensors.items():
        planner.visit(name, meta)
    return planner.plan
