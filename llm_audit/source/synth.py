"""Write miniature gpt-oss checkpoints: real tensor names, real MXFP4 packing, planted traps.

Why: the project may never download weights at run time, yet every part of it must be
exercised on what a real gpt-oss checkpoint looks like — the hub's names and index, the
attention biases and sinks, MXFP4 expert blocks with their scales, layers split across
shards. `llm-audit synth gpt-oss OUT` writes one deterministically from a seed, small
enough for tests and the demo, with large entries planted in chosen matrices so that an
audit has known traps to find. The output loads with transformers'
`GptOssForCausalLM.from_pretrained`.

Weights are Gaussian with std 0.02 (gpt-oss's `initializer_range`); a planted trap is one
entry of size `trap_scale` (default 1.0, i.e. 50 std) at a seeded position.

Why numpy only, no torch: `llm-audit demo` must run after a plain `pip install llm-audit`,
which does not install torch. The values are drawn in float32 and rounded to bfloat16 here
(`bf16_bits`: round to nearest even, as torch's `.to(torch.bfloat16)`), and the files are
written by safetensors' own serializer, so they are byte for byte what torch's
`safetensors.torch.save_file` writes for the same values (tests/test_synth.py checks both).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import TensorSpec, serialize_file

from ..errors import AuditError
from .mxfp4 import encode_mxfp4

INIT_STD = 0.02
_TRAP_ID = re.compile(r"^(?P<tensor>[\w.]+?)(?:\[(?P<expert>\d+)\])?$")


# The integer sizes of a SynthConfig (each at least 1; `llm-audit synth` has an option each).
SIZE_FIELDS = (
    "layers",
    "experts",
    "hidden",
    "intermediate",
    "heads",
    "kv_heads",
    "head_dim",
    "vocab",
    "shards",
)


@dataclass(frozen=True)
class SynthConfig:
    """Sizes of the miniature model; defaults make the bundled demo model (about 6 MB)."""

    layers: int = 2
    experts: int = 8
    hidden: int = 256
    intermediate: int = 256
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    vocab: int = 1024
    shards: int = 2
    dtype: str = "bf16"  # dense tensors: bf16 or f32
    mxfp4: bool = True
    seed: int = 0
    traps: dict[str, int] = field(default_factory=dict)  # unit id -> planted entries
    trap_scale: float = 1.0

    def validate(self) -> None:
        if self.dtype not in ("bf16", "f32"):
            raise AuditError(f"dtype must be bf16 or f32, got {self.dtype!r}")
        for name in SIZE_FIELDS:
            if getattr(self, name) < 1:
                raise AuditError(f"{name} must be at least 1")
        if self.mxfp4 and (self.hidden % 32 or self.intermediate % 32):
            raise AuditError("MXFP4 needs hidden and intermediate sizes divisible by 32")
        if not math.isfinite(self.trap_scale):
            raise AuditError(f"trap scale must be a finite number, got {self.trap_scale}")


def _rng(seed: int, name: str) -> np.random.Generator:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def _dense_shapes(cfg: SynthConfig) -> dict[str, tuple[int, ...]]:
    """Every non-expert tensor of the HF gpt-oss layout, in the hub's order."""
    h, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab, h)}
    for i in range(cfg.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.o_proj.bias": (h,),
            p + "self_attn.sinks": (cfg.heads,),
            p + "mlp.router.weight": (cfg.experts, h),
            p + "mlp.router.bias": (cfg.experts,),
            p + "mlp.experts.gate_up_proj_bias": (cfg.experts, 2 * cfg.intermediate),
            p + "mlp.experts.down_proj_bias": (cfg.experts, h),
        }
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (cfg.vocab, h)
    return shapes


def _plant(matrix: np.ndarray, count: int, scale: float, rng: np.random.Generator) -> None:
    where = rng.choice(matrix.size, size=count, replace=False)
    matrix.ravel()[where] = rng.choice([-scale, scale], size=count)


def _parse_traps(cfg: SynthConfig) -> dict[tuple[str, int | None], int]:
    traps = {}
    for unit_id, count in cfg.traps.items():
        match = _TRAP_ID.match(unit_id)
        if not match or count < 1:
            raise AuditError(f"trap {unit_id!r}={count}: want NAME or NAME[EXPERT] and a count")
        expert = match.group("expert")
        traps[(match.group("tensor"), None if expert is None else int(expert))] = count
    return traps


def _expert_tensors(cfg: SynthConfig, traps: dict) -> dict[str, np.ndarray]:
    """Per layer, gate_up [E, 2I, H] and down [E, H, I] (out x in), MXFP4-packed or dense."""
    out: dict[str, np.ndarray] = {}
    shapes = {
        "gate_up_proj": (2 * cfg.intermediate, cfg.hidden),
        "down_proj": (cfg.hidden, cfg.intermediate),
    }
    for i in range(cfg.layers):
        for proj, (rows, cols) in shapes.items():
            base = f"model.layers.{i}.mlp.experts.{proj}"
            rng = _rng(cfg.seed, base)
            dense = (rng.standard_normal((cfg.experts, rows, cols)) * INIT_STD).astype(np.float32)
            for e in range(cfg.experts):
                count = traps.pop((base, e), 0)
                if count:
                    _plant(dense[e], count, cfg.trap_scale, rng)
            if cfg.mxfp4:
                blocks, scales = encode_mxfp4(dense)
                out[base + "_blocks"] = blocks
                out[base + "_scales"] = scales
            else:  # transformers' own layout: [E, in, out]
                out[base] = np.ascontiguousarray(dense.transpose(0, 2, 1))
    return out


def _config_json(cfg: SynthConfig) -> dict:
    config = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": cfg.intermediate,
        "layer_types": [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.layers)
        ],
        "max_position_embeddings": 4096,
        "num_attention_heads": cfg.heads,
        "num_experts_per_tok": min(4, cfg.experts),
        "experts_per_token": min(4, cfg.experts),
        "num_hidden_layers": cfg.layers,
        "num_key_value_heads": cfg.kv_heads,
        "num_local_experts": cfg.experts,
        "rms_norm_eps": 1e-05,
        "rope_theta": 150000,
        "sliding_window": 128,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16" if cfg.dtype == "bf16" else "float32",
        "vocab_size": cfg.vocab,
        "use_cache": True,
    }
    if cfg.mxfp4:
        config["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        }
    return config


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (little-endian uint16): rounded to nearest,
    ties to even, overflow to infinity, NaN as 0x7FC0 (torch's scalar conversion)."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype("<u2")
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).astype("<u2")


def synth_tensors(cfg: SynthConfig) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint in the hub's order, before the dtype is applied:
    float32 values (dense tensors), uint8 (MXFP4 blocks and scales)."""
    cfg.validate()
    traps = _parse_traps(cfg)
    tensors: dict[str, np.ndarray] = {}
    for name, shape in _dense_shapes(cfg).items():
        rng = _rng(cfg.seed, name)
        if name.endswith("norm.weight"):
            values = np.ones(shape, np.float32)
        else:
            values = (rng.standard_normal(shape) * INIT_STD).astype(np.float32)
            if values.ndim == 2 and (name, None) in traps:
                _plant(values, traps.pop((name, None)), cfg.trap_scale, rng)
        tensors[name] = values
    tensors |= _expert_tensors(cfg, traps)
    if traps:
        unknown = ", ".join(f"{t}[{e}]" if e is not None else t for t, e in traps)
        raise AuditError(f"no such matrix to plant traps in: {unknown}")
    return tensors


def synth_gpt_oss(out: str | Path, cfg: SynthConfig) -> Path:
    """Write the checkpoint into folder `out` (created); returns the folder."""
    tensors = synth_tensors(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(out, tensors, cfg.shards, cfg.dtype)
    (out / "config.json").write_text(json.dumps(_config_json(cfg), indent=2) + "\n")
    return out


def _stored(array: np.ndarray, dtype: str) -> tuple[str, np.ndarray]:
    """(safetensors dtype name, little-endian C-ordered data) of one synth tensor."""
    if array.dtype == np.uint8:
        return "uint8", np.ascontiguousarray(array)
    if dtype == "bf16":
        return "bfloat16", bf16_bits(array)
    return "float32", np.ascontiguousarray(array, "<f4")


def _write_shards(out: Path, tensors: dict[str, np.ndarray], shards: int, dtype: str) -> None:
    """Split tensors over `shards` files in order, hub-style names, plus the index."""
    names = list(tensors)
    shards = min(shards, len(names))
    bounds = np.linspace(0, len(names), shards + 1).astype(int)
    weight_map, total = {}, 0
    for k in range(shards):
        file_name = f"model-{k:05d}-of-{shards - 1:05d}.safetensors"
        part = {n: _stored(tensors[n], dtype) for n in names[bounds[k] : bounds[k + 1]]}
        # the arrays in `part` stay alive while the serializer reads them by address
        specs = {
            n: TensorSpec(
                dtype=kind, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes
            )
            for n, (kind, a) in part.items()
        }
        serialize_file(specs, out / file_name, metadata={"format": "pt"})
        for n, (_, a) in part.items():
            weight_map[n] = file_name
            total += a.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# The bundled demo model (`llm-audit demo`, `make demo`): the main job must run on a fresh
# machine with no download, on a model whose truth is known, so the Ray audit must report
# traps in exactly these matrices and nowhere else.
PLANTED = {
    "model.layers.1.mlp.experts.down_proj[5]": 4,
    "model.layers.0.mlp.experts.gate_up_proj[2]": 2,
    "model.layers.1.self_attn.o_proj.weight": 3,
}
BUNDLED = SynthConfig(seed=2026, traps=PLANTED)


def write_bundled_model(folder: str | Path) -> Path:
    """Write the bundled model (byte-identical on every machine) into `folder`."""
    return synth_gpt_oss(folder, BUNDLED)
