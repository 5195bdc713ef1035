"""Integer-packed checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized, bitsandbytes):
compressed-tensors' symmetric `pack-quantized` weights are decoded, exactly as
compressed-tensors' own decompressor does; every other packed weight is skipped with a
reason naming its format, and its auxiliary tensors (scales, zero points, group indices,
quantization state) are never audited as matrices."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.plan import build_plan
from llm_audit.source.reference import resolve_model

OUT, IN, GROUPS = 64, 256, 16  # group size 16: 16 groups, enough rows to look like a matrix
P = "model.layers.0.self_attn.q_proj"
D = "model.layers.0.mlp.down_proj"


def _meta(dtype: str, *shape: int) -> SimpleNamespace:
    return SimpleNamespace(dtype=dtype, shape=tuple(shape))


PLAIN = {
    "model.embed_tokens.weight": _meta("BF16", 128, OUT),
    "lm_head.weight": _meta("BF16", 128, OUT),
    f"{P}.bias": _meta("F16", OUT),
}
# format -> (quantization_config, the tensors of one quantized linear layer, its reason)
FORMATS = {
    "gptq": (  # AutoGPTQ / optimum: qweight [in / 8, out], qzeros [groups, out / 8]
        {"quant_method": "gptq", "bits": 4, "group_size": 16},
        {
            f"{P}.qweight": _meta("I32", IN // 8, OUT),
            f"{P}.qzeros": _meta("I32", GROUPS, OUT // 8),
            f"{P}.scales": _meta("F16", GROUPS, OUT),
            f"{P}.g_idx": _meta("I32", IN),
        },
        "GPTQ-packed I32 weight (not decoded)",
    ),
    "awq": (  # AutoAWQ gemm: qweight [in, out / 8], scales [groups, out]
        {"quant_method": "awq", "bits": 4, "group_size": 16},
        {
            f"{P}.qweight": _meta("I32", IN, OUT // 8),
            f"{P}.qzeros": _meta("I32", GROUPS, OUT // 8),
            f"{P}.scales": _meta("F16", GROUPS, OUT),
        },
        "AWQ-packed I32 weight (not decoded)",
    ),
    "compressed-tensors": (  # pack-quantized with activation order: a group index
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {
                "group_0": {
                    "weights": {
                        "num_bits": 4,
                        "type": "int",
                        "symmetric": False,
                        "strategy": "group",
                        "group_size": 16,
                    },
                },
            },
        },
        {
            f"{P}.weight_packed": _meta("I32", OUT, IN // 8),
            f"{P}.weight_scale": _meta("BF16", OUT, GROUPS),
            f"{P}.weight_zero_point": _meta("I32", OUT // 8, GROUPS),
            f"{P}.weight_shape": _meta("I64", 2),
            f"{P}.weight_g_idx": _meta("I32", IN),
        },
        "compressed-tensors pack-quantized I32 weight with a group index (not decoded)",
    ),
    "compressed-tensors-nvfp4": (  # two FP4 values per byte, E4M3 scales per 16
        {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"},
        {
            f"{P}.weight_packed": _meta("U8", OUT, IN // 2),
            f"{P}.weight_scale": _meta("F8_E4M3", OUT, IN // 16),
            f"{P}.weight_global_scale": _meta("F32", 1),
            f"{P}.input_global_scale": _meta("F32", 1),
        },
        "compressed-tensors nvfp4-pack-quantized U8 weight (not decoded)",
    ),
    "modelopt-nvfp4": (  # NVIDIA ModelOpt: the format is in hf_quant_config.json only
        {},
        {
            f"{P}.weight": _meta("U8", OUT, IN // 2),
            f"{P}.weight_scale": _meta("F8_E4M3", OUT, IN // 16),
            f"{P}.weight_scale_2": _meta("F32"),
            f"{P}.input_scale": _meta("F32"),
        },
        "NVFP4 packed 4-bit weight (not decoded)",
    ),
    "mlx-4bit": (  # mlx-lm QuantizedLinear: eight 4-bit values per uint32, group 32
        {"quantization": {"group_size": 32, "bits": 4}},
        {
            f"{D}.weight": _meta("U32", OUT, IN // 8),
            f"{D}.scales": _meta("F16", OUT, IN // 32),
            f"{D}.biases": _meta("F16", OUT, IN // 32),
        },
        "MLX 4-bit quantized U32 weight (not decoded)",
    ),
    "quanto-qint8": (  # optimum-quanto `freeze`: the weight's `_data` beside its `_scale`
        {},
        {
            f"{P}.weight._data": _meta("I8", OUT, IN),
            f"{P}.weight._scale": _meta("F32", OUT, 1),
            f"{P}.input_scale": _meta("F32"),
            f"{P}.output_scale": _meta("F32"),
        },
        "optimum-quanto quantized I8 weight (not decoded)",
    ),
    "quanto-qint4": (
        {},
        {
            f"{P}.weight._data._data": _meta("U8", OUT, IN // 2),
            f"{P}.weight._scale": _meta("F32", 2 * OUT, 1),
            f"{P}.weight._shift": _meta("F32", 2 * OUT, 1),
        },
        "optimum-quanto quantized U8 weight (not decoded)",
    ),
    "bnb-4bit": (
        {"quant_method": "bitsandbytes", "load_in_4bit": True},
        {
            f"{P}.weight": _meta("U8", OUT * IN // 2, 1),
            f"{P}.weight.absmax": _meta("F32", OUT * IN // 64),
            f"{P}.weight.quant_map": _meta("F32", 16),
            f"{P}.weight.nested_absmax": _meta("F32", 8),
            f"{P}.weight.nested_quant_map": _meta("F32", 256),
            f"{P}.weight.quant_state.bitsandbytes__nf4": _meta("U8", 100),
        },
        "bitsandbytes 4-bit weight (not decoded)",
    ),
    "bnb-8bit": (
        {"quant_method": "bitsandbytes", "load_in_8bit": True},
        {
            f"{P}.weight": _meta("I8", OUT, IN),
            f"{P}.SCB": _meta("F32", OUT),
            f"{P}.weight_format": _meta("U8"),
        },
        "bitsandbytes int8 weight (not decoded)",
    ),
}
# torchao (transformers' TorchAoHfQuantizer): `P.weight` flattened to `P._weight_<attr>`;
# Int4Tensor's scale and zero point are [in / group, out] in the weight's dtype
FORMATS["torchao-int4"] = (
    {"quant_method": "torchao"},
    {
        f"{P}._weight_qdata": _meta("I8", OUT, IN // 2),
        f"{P}._weight_scale": _meta("BF16", GROUPS, OUT),
        f"{P}._weight_zero_point": _meta("BF16", GROUPS, OUT),
    },
    "torchao-quantized I8 weight of shape [64, 128] (not decoded)",
)
# compressed-tensors 2:4 sparsity (Sparse24BitMaskTensor): the kept half of each row, the
# bitmask of where it goes and the dense shape; FP8 values bring their weight_scale
SPARSE = {"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-24-bitmask"}}
for dtype in ("BF16", "F8_E4M3"):
    FORMATS[f"sparse-24-{dtype}"] = (
        SPARSE | {"format": "float-quantized" if dtype == "F8_E4M3" else "dense"},
        {
            f"{P}.compressed": _meta(dtype, OUT, IN // 2),
            f"{P}.bitmask": _meta("U8", OUT, IN // 8),
            f"{P}.shape": _meta("I64", 2, 1),
        }
        | ({f"{P}.weight_scale": _meta("BF16", OUT, 1)} if dtype == "F8_E4M3" else {}),
        f"compressed-tensors sparse-24-bitmask {dtype} weight (not decoded)",
    )
FORMATS["quark-mxfp4"] = (  # AMD Quark: two FP4 per byte, an E8M0 exponent per 32
    {"quant_method": "quark"},
    {f"{P}.weight": _meta("U8", OUT, IN // 2), f"{P}.weight_scale": _meta("U8", OUT, IN // 32)},
    "quark MXFP4 packed 4-bit weight (not decoded)",
)
FORMATS["marlin-24"] = (  # Marlin24Compressor: scales [in / group, out] beside the packing
    {"quant_method": "compressed-tensors", "format": "marlin-24"},
    {
        f"{P}.weight_packed": _meta("I32", IN // 32, OUT * 2),
        f"{P}.scale_packed": _meta("F16", GROUPS, OUT),
        f"{P}.meta": _meta("I16", OUT * 2, IN // 64),
    },
    "compressed-tensors marlin-24 I32 weight (not decoded)",
)
# the same GPTQ layer as a down_proj: `down_proj.scales` is also how gpt-oss names MXFP4 scales
FORMATS["gptq-down_proj"] = (
    FORMATS["gptq"][0],
    {name.replace(P, D): meta for name, meta in FORMATS["gptq"][1].items()},
    FORMATS["gptq"][2],
)
# the packed weight of each layer above, by the end of its name
PACKED = ("qweight", "weight_packed", "weight", "_data", "_qdata", "compressed")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_packed_weights_skipped_by_format_and_their_state_never_audited(fmt):
    config, layer, reason = FORMATS[fmt]
    top_level = "quantization" in config  # MLX's config.json key, not quantization_config
    plan = build_plan(
        PLAIN | layer, config if top_level else {"quantization_config": config}, min_evals=8
    )
    assert [u.id for u in plan.units] == ["model.embed_tokens.weight", "lm_head.weight"]
    reasons = {s.name: s.reason for s in plan.skipped}
    packed = next(n for n in layer if n.endswith(PACKED))
    assert reasons[packed] == reason
    for name in layer:
        assert name in reasons, name  # every auxiliary tensor listed, with its reason
        assert "vector" not in reasons[name] and "too small" not in reasons[name], name


def test_formats_recognised_from_names_alone():
    _, layer, _ = FORMATS["gptq"]
    plan = build_plan(PLAIN | layer, {}, min_evals=8)
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons[f"{P}.qweight"] == "GPTQ/AWQ-packed I32 weight (not decoded)"
    assert reasons[f"{P}.scales"] == "GPTQ/AWQ scales of a packed weight"


def test_a_weight_called_scales_without_a_packed_owner_is_still_audited():
    plan = build_plan({"model.layers.0.film.scales": _meta("F32", 16, 64)}, min_evals=8)
    assert [u.id for u in plan.units] == ["model.layers.0.film.scales"]


def _ct_config(bits: int, strategy: str, group: int | None, **weights) -> dict:
    args = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy}
    args |= {"group_size": group} if group else {}
    return {
        "model_type": "llama",
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args | weights}},
        },
    }


@pytest.mark.parametrize(
    ("bits", "strategy", "group", "scale_dtype", "symmetric"),
    [(4, "group", 32, torch.bfloat16, True), (8, "channel", None, torch.float16, True),
     (4, "tensor", None, torch.float32, True), (2, "group", 64, torch.bfloat16, True),
     (4, "group", 32, torch.bfloat16, False), (8, "channel", None, torch.float16, False)],
)  # fmt: skip
def test_compressed_tensors_pack_quantized_is_decoded_as_its_decompressor_does(
    bits, strategy, group, scale_dtype, symmetric, tmp_path
):
    """llm-compressor's W4A16 / W8A16 (`pack-quantized`, symmetric or with zero points
    packed along the rows): the packed codes less their zero points times their scales
    are compressed-tensors' own decompressed weight, and the audited matrix is named
    `P.weight`. The reader's float32 product is exact; rounded to the scales' dtype it is
    bit for bit the decompressor's (which computes in that dtype)."""
    from compressed_tensors.compressors.pack_quantized.base import (
        PackedQuantizationCompressor as Packer,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import save_file

    config = _ct_config(bits, strategy, group, symmetric=symmetric)
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights))
    torch.manual_seed(0)
    tensors, want = {}, {}
    for name, (out, cols) in {f"{P}": (96, 256), f"{D}": (64, 192)}.items():
        w = torch.randn(out, cols) + (0 if symmetric else 0.7)  # off-centre: zero points
        limit = 2 ** (bits - 1) - 1
        if strategy == "group":
            blocks = w.unflatten(1, (-1, group))
        else:
            blocks = w[:, None, :] if strategy == "channel" else w.reshape(1, 1, -1)
        low, high = blocks.amin(-1).clamp(max=0), blocks.amax(-1).clamp(min=0)
        span = torch.maximum(-low, high) / limit if symmetric else (high - low) / (2**bits - 1)
        scale = span.reshape(-1) if strategy == "tensor" else span
        state = {"weight": w.to(scale_dtype), "weight_scale": scale.to(scale_dtype)}
        if not symmetric:
            zero = (-(limit + 1) - torch.round(low / scale)).clamp(-limit - 1, limit)
            state["weight_zero_point"] = zero.to(torch.int8)
        packed = Packer.compress(state, scheme)
        assert packed["weight_packed"].dtype == torch.int32
        tensors |= {f"{name}.{k}": v.contiguous() for k, v in packed.items()}
        want[f"{name}.weight"] = Packer.decompress(packed, scheme)["weight"]
    (tmp_path / "m").mkdir()
    save_file(tensors, tmp_path / "m" / "model.safetensors")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "m")))
    plan = checkpoint.plan(8)
    units = {u.id: u for u in plan.units}
    assert set(units) == set(want)
    assert {s.name for s in plan.skipped} == {n for n in tensors if not n.endswith("_packed")}
    for name, reference in want.items():
        unit = units[name]
        assert unit.source_dtype.startswith(f"INT{bits} ") and unit.shape == reference.shape
        got = checkpoint.read_matrix(unit)
        assert got.dtype == np.float32
        assert torch.equal(torch.from_numpy(got).to(scale_dtype), reference), name
        streamed = np.concatenate(list(checkpoint.iter_rows(unit, 7)))  # chunks of 7 rows
        assert np.array_equal(streamed, got)
        scale = tensors[name + "_scale"].float()
        codes = torch.from_numpy(got) / scale.repeat_interleave(
            reference.shape[1] // scale.shape[-1], dim=-1
        )
        assert torch.equal(codes, codes.round()), "W is whole codes times scales, exactly"
        assert unit.zero_tensor == (None if symmetric else name + "_zero_point")


def test_pack_quantized_that_cannot_be_decoded_exactly_is_listed():
    """A group index, 3-bit codes (whose packing changed between compressed-tensors
    versions), scales or zero points that do not fit the config's scheme: listed, never
    read as codes."""
    layer = {
        f"{P}.weight_packed": _meta("I32", OUT, IN // 8),
        f"{P}.weight_scale": _meta("BF16", OUT, GROUPS),
        f"{P}.weight_shape": _meta("I64", 2),
    }
    cases = [
        (_ct_config(4, "group", 16), {f"{P}.weight_g_idx": _meta("I32", IN)}, "a group index"),
        (_ct_config(3, "group", 16), {}, "num_bits 3 (decoded: 1, 2, 4, 8)"),
        (_ct_config(4.0, "group", 16), {}, "num_bits 4.0 (decoded"),  # a float from JSON
        (_ct_config(True, "group", 16), {}, "num_bits True (decoded"),
        (_ct_config(4, "group", 16.0), {}, "group_size 16.0"),
        (_ct_config(4, ["group"], 16), {}, "are not plain values"),  # unhashable: no crash
        (_ct_config(4, "group", 32), {}, "does not fit 4-bit group codes"),
        (_ct_config(4, "group", 16), {f"{P}.weight_zero_point": _meta("I32", 8, 16)}, "zero"),
        (_ct_config(4, "group", 16, symmetric=False), {}, "without zero points"),
        (
            _ct_config(4, "group", 16, symmetric=False),
            {f"{P}.weight_zero_point": _meta("I32", 16, 16)},  # not packed along the rows
            "are not packed per scale",
        ),
    ]
    for config, extra, reason in cases:
        plan = build_plan(PLAIN | layer | extra, config, min_evals=8)
        assert [u.id for u in plan.units] == ["model.embed_tokens.weight", "lm_head.weight"]
        skipped = {s.name: s.reason for s in plan.skipped}
        assert reason in skipped[f"{P}.weight_packed"], (reason, skipped)
    plan = build_plan(PLAIN | layer, _ct_config(4, "group", 16), min_evals=8)
    (unit,) = [u for u in plan.units if u.id == f"{P}.weight"]
    assert (unit.shape, unit.scale_block, unit.int_bits) == ((OUT, IN), (1, 16), 4)
