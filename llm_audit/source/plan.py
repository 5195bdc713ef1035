"""Which matrices of a checkpoint to audit: every tensor maps to zero or more work units.

Why a separate step: the plan is computed from tensor names, dtypes and shapes alone
(safetensors headers), before a single weight byte is read, so users see what will be
audited and what it costs (`llm-audit plan`), workers get units that say exactly which
bytes to read, and everything not audited is listed with its reason instead of vanishing.

What becomes a unit:
- 2-D float tensors: attention projections, the MoE router, embedding and lm_head, and any
  other linear layer (kind `linear`);
- gpt-oss experts, one unit per expert: MXFP4 `*_blocks` (+ `*_scales`) [E, out, G, 16],
  or transformers' dense `mlp.experts.gate_up_proj` / `down_proj` stored [E, in, out];
- openai's `original/` layout: `attn.qkv.weight` is split into q, k and v row ranges;
- conv kernels (out, in, kh, kw): one unit per (kh, kw) slice, as WeightWatcher does.
Skipped, with the reason: vectors (norms, biases, sinks), MXFP4 scales (read with their
blocks), non-float tensors, and matrices with fewer than `min_evals` eigenvalues.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import AuditError
from . import mxfp4
from .dtypes import FLOAT_DTYPES

KINDS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "router",
    "expert_gate_up",
    "expert_down",
    "embedding",
    "lm_head",
    "linear",
    "conv",
)

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")
_BY_SUFFIX = (  # (name pattern, kind) for dense 2-D weights, first match wins
    (re.compile(r"\.(?:self_attn|attn)\.q_proj\.weight$"), "q_proj"),
    (re.compile(r"\.(?:self_attn|attn)\.k_proj\.weight$"), "k_proj"),
    (re.compile(r"\.(?:self_attn|attn)\.v_proj\.weight$"), "v_proj"),
    (re.compile(r"\.(?:self_attn\.o_proj|attn\.out)\.weight$"), "o_proj"),
    (re.compile(r"\.mlp\.(?:router|gate)\.weight$"), "router"),
    (re.compile(r"(?:^|\.)(?:embed_tokens|embedding|wte)\.weight$"), "embedding"),
    (re.compile(r"^(?:lm_head|unembedding)\.weight$"), "lm_head"),
)
_MXFP4_BLOCKS = re.compile(
    r"^(.*\.(?:gate_up_proj|down_proj|mlp1_weight|mlp2_weight))(_blocks|\.blocks)$"
)
_MXFP4_SCALES = re.compile(
    r"^(.*\.(?:gate_up_proj|down_proj|mlp1_weight|mlp2_weight))(_scales|\.scales)$"
)
_DENSE_EXPERTS = re.compile(r"\.mlp\.experts\.(gate_up_proj|down_proj)$")
_QKV = re.compile(r"\.attn\.qkv\.weight$")


class TensorMeta(Protocol):
    """What the plan needs to know of a tensor (a safetensors header entry)."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class MatrixUnit:
    """One matrix to audit and exactly how to read it.

    `layout` says how the bytes of `tensor` become the matrix:
    - "dense": the 2-D tensor itself;
    - "expert": slice `expert` of a stacked [E, a, b] tensor (`transpose` if stored in x out);
    - "mxfp4": slice `expert` of `tensor` (blocks) and `scales_tensor`, decoded;
    - "rows": rows `row_start:row_stop` of a 2-D tensor (a fused qkv);
    - "conv": the [:, :, kh, kw] slice `(row_start, row_stop)` = (kh, kw) of a 4-D kernel.
    `shape` is the matrix as audited, (out, in); `nbytes` is what reading it costs.
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


@dataclass(frozen=True)
class SkippedTensor:
    """A tensor that yields no unit, and why."""

    name: str
    reason: str


@dataclass
class Plan:
    """Units in checkpoint order and the skipped tensors; summaries for `llm-audit plan`."""

    units: list[MatrixUnit] = field(default_factory=list)
    skipped: list[SkippedTensor] = field(default_factory=list)

    def counts_by_kind(self) -> dict[str, int]:
        counts = Counter(u.kind for u in self.units)
        return {kind: counts[kind] for kind in KINDS if counts[kind]}

    def bytes_to_read(self) -> int:
        return sum(u.nbytes for u in self.units)

    def largest(self) -> MatrixUnit | None:
        return max(self.units, key=lambda u: u.shape[0] * u.shape[1], default=None)

    def skipped_reasons(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.skipped).most_common())


def _layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _kind_of_dense(name: str) -> str:
    for pattern, kind in _BY_SUFFIX:
        if pattern.search(name):
            return kind
    return "linear"


def _expert_kind(base: str) -> str:
    return "expert_gate_up" if base.endswith(("gate_up_proj", "mlp1_weight")) else "expert_down"


def _itemsize(dtype: str) -> int:
    return {"F8_E4M3": 1, "F8_E5M2": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8}[dtype]


def _vector_reason(name: str) -> str:
    lowered = name.lower()
    if "norm" in lowered:
        return "norm (vector)"
    if lowered.endswith("bias"):
        return "bias (vector)"
    if lowered.endswith("sinks"):
        return "attention sinks (vector)"
    return "vector"


def _qkv_split(config: Mapping[str, Any], rows: int) -> list[tuple[str, int, int]]:
    """Row ranges of q, k, v in a fused qkv weight, from the model config."""
    head_dim = int(config.get("head_dim", 0))
    q_rows = int(config.get("num_attention_heads", 0)) * head_dim
    kv_rows = int(config.get("num_key_value_heads", 0)) * head_dim
    if q_rows <= 0 or kv_rows <= 0 or q_rows + 2 * kv_rows != rows:
        raise AuditError(
            f"cannot split fused qkv of {rows} rows: config gives q {q_rows} + 2 x kv {kv_rows}"
        )
    return [
        ("q_proj", 0, q_rows),
        ("k_proj", q_rows, q_rows + kv_rows),
        ("v_proj", q_rows + kv_rows, rows),
    ]


class _Planner:
    def __init__(
        self, tensors: Mapping[str, TensorMeta], config: Mapping[str, Any], min_evals: int
    ) -> None:
        self.tensors = tensors
        self.config = config
        self.min_evals = min_evals
        self.plan = Plan()

    def skip(self, name: str, reason: str) -> None:
        self.plan.skipped.append(SkippedTensor(name, reason))

    def add(self, unit: MatrixUnit) -> None:
        rows, cols = unit.shape
        if min(rows, cols) < self.min_evals:
            self.skip(
                unit.id, f"too small: {rows}x{cols} has fewer than {self.min_evals} eigenvalues"
            )
        else:
            self.plan.units.append(unit)

    def visit(self, name: str, meta: TensorMeta) -> None:
        shape = tuple(int(d) for d in meta.shape)
        blocks = _MXFP4_BLOCKS.match(name)
        if blocks:
            self.visit_mxfp4(name, blocks.group(1), blocks.group(2), meta.dtype, shape)
        elif _MXFP4_SCALES.match(name):
            self.check_scales_have_blocks(name)
        elif meta.dtype not in FLOAT_DTYPES:
            self.skip(name, f"not a float tensor ({meta.dtype})")
        elif len(shape) <= 1 or name.endswith("bias"):  # stacked expert biases are 2-D
            self.skip(name, _vector_reason(name))
        elif _DENSE_EXPERTS.search(name) and len(shape) == 3:
            self.visit_dense_experts(name, meta.dtype, shape)
        elif len(shape) == 2 and _QKV.search(name):
            self.visit_qkv(name, meta.dtype, shape)
        elif len(shape) == 2:
            self.add(
                MatrixUnit(
                    name,
                    name,
                    _kind_of_dense(name),
                    _layer_of(name),
                    None,
                    shape,
                    meta.dtype,
                    math.prod(shape) * _itemsize(meta.dtype),
                )
            )
        elif len(shape) == 4:
            self.visit_conv(name, meta.dtype, shape)
        else:
            self.skip(name, f"{len(shape)}-D tensor of shape {list(shape)} is not a known layout")

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
        per_expert = rows * groups * (mxfp4.BYTES_PER_BLOCK + 1)
        for e in range(experts):
            self.add(
                MatrixUnit(
                    f"{base}[{e}]",
                    name,
                    _expert_kind(base),
                    _layer_of(name),
                    e,
                    (rows, groups * mxfp4.BLOCK),
                    "MXFP4",
                    per_expert,
                    "mxfp4",
                    scales_tensor=scales,
                )
            )

    def check_scales_have_blocks(self, name: str) -> None:
        base = _MXFP4_SCALES.match(name)
        assert base is not None
        if not any(base.group(1) + s in self.tensors for s in ("_blocks", ".blocks")):
            raise AuditError(f"tensor {name!r}: MXFP4 scales without their blocks")
        self.skip(name, "MXFP4 scales (read with their blocks)")

    def visit_dense_experts(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        experts, fan_in, fan_out = shape
        per_expert = fan_in * fan_out * _itemsize(dtype)
        for e in range(experts):
            self.add(
                MatrixUnit(
                    f"{name}[{e}]",
                    name,
                    _expert_kind(name),
                    _layer_of(name),
                    e,
                    (fan_out, fan_in),
                    dtype,
                    per_expert,
                    "expert",
                    transpose=True,
                )
            )

    def visit_qkv(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        rows, cols = shape
        for kind, start, stop in _qkv_split(self.config, rows):
            self.add(
                MatrixUnit(
                    f"{name}:{kind[0]}",
                    name,
                    kind,
                    _layer_of(name),
                    None,
                    (stop - start, cols),
                    dtype,
                    (stop - start) * cols * _itemsize(dtype),
                    "rows",
                    row_start=start,
                    row_stop=stop,
                )
            )

    def visit_conv(self, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        out, fan_in, kh, kw = shape
        kernel_bytes = math.prod(shape) * _itemsize(dtype)  # a strided slice reads it all
        for i in range(kh):
            for j in range(kw):
                self.add(
                    MatrixUnit(
                        f"{name}[{i},{j}]",
                        name,
                        "conv",
                        _layer_of(name),
                        None,
                        (out, fan_in),
                        dtype,
                        kernel_bytes,
                        "conv",
                        row_start=i,
                        row_stop=j,
                    )
                )


def build_plan(
    tensors: Mapping[str, TensorMeta],
    config: Mapping[str, Any] | None = None,
    *,
    min_evals: int,
) -> Plan:
    """Map every tensor (name -> dtype and shape) to audit units or a skip reason.

    `config` (the model's config.json) is needed only to split openai's fused qkv.
    Raises `AuditError` for inconsistent MXFP4 pairs: those are broken checkpoints.
    """
    planner = _Planner(tensors, config or {}, min_evals)
    for name, meta in tensors.items():
        planner.visit(name, meta)
    return planner.plan
