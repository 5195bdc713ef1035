"""FP8 checkpoints are audited on their dequantized weights: DeepSeek-style block scales
(`weight_scale_inv`, partial edge blocks) and compressed-tensors per-channel / per-tensor
`weight_scale`, E4M3 and E5M2, in memory and streamed."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

from llm_audit import analyze_matrix
from llm_audit.run.units import analyze_units
from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.reference import resolve_model
from llm_audit.spectral.settings import AnalysisSettings

BLOCK = (128, 128)
SHAPE = (300, 200)  # 3 x 2 blocks, the last row and column of blocks partial (44, 72)
PLANTED = [(10, 150), (290, 7), (140, 199)]
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
NAME = "model.layers.0.self_attn.q_proj.weight"


def _weight(seed: int = 0) -> torch.Tensor:
    """A Gaussian weight with large entries planted before quantization."""
    w = torch.from_numpy(np.random.default_rng(seed).standard_normal(SHAPE) * 0.02).float()
    for k, (r, c) in enumerate(PLANTED):
        w[r, c] = 1.0 - 0.1 * k
    return w


def _block_quantize(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    grid = (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    scales = torch.empty(grid)
    q = torch.empty_like(w)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = (
                slice(i * BLOCK[0], (i + 1) * BLOCK[0]),
                slice(j * BLOCK[1], (j + 1) * BLOCK[1]),
            )
            scales[i, j] = w[block].abs().max() / FP8_MAX[dtype]
            q[block] = w[block] / scales[i, j]
    return q.to(dtype), scales


def _write(folder: Path, tensors: dict[str, torch.Tensor], quantization: dict) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "deepseek_v3", "quantization_config": quantization}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _audit_one(folder: Path, settings: AnalysisSettings):
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    plan = checkpoint.plan(8)
    [unit] = [u for u in plan.units if u.tensor == NAME]
    [row] = analyze_units(checkpoint, [unit], settings)
    return checkpoint, plan, unit, row


def _same_numbers(row: dict, reference: dict) -> None:
    assert row["lambda_max"] == pytest.approx(reference["lambda_max"], rel=1e-5)
    assert row["log_norm"] == pytest.approx(reference["log_norm"], rel=1e-5)
    assert row["alpha"] == reference["alpha"]
    assert row["rand_num_spikes"] == reference["rand_num_spikes"]


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_block_scaled_fp8_is_dequantized_exactly(dtype, tmp_path):
    q, scales = _block_quantize(_weight(), dtype)
    tensors = {NAME: q, NAME + "_scale_inv": scales, "model.norm.weight": torch.ones(200)}
    quantization = {"quant_method": "fp8", "weight_block_size": list(BLOCK)}
    folder = _write(tmp_path / "m", tensors, quantization)
    checkpoint, plan, unit, row = _audit_one(folder, AnalysisSettings(seed=0))

    # transformers' own FP8 dequantization (the one its backward pass uses) is the reference
    reference = _dequantize_fp8_weight(q, scales, list(BLOCK), torch.float32).numpy()
    checkpoint.bytes_read = 0
    ours = checkpoint.read_matrix(unit)
    assert ours.dtype == np.float32 and np.array_equal(ours, reference)
    assert checkpoint.bytes_read == unit.nbytes == 300 * 200 + 3 * 2 * 4  # weight + scales
    # and the documented formula: W = q * s of its block
    by_formula = q.float().numpy() * np.kron(scales.numpy(), np.ones(BLOCK))[: SHAPE[0], : SHAPE[1]]
    assert np.array_equal(ours, by_formula.astype(np.float32))

    _same_numbers(row, analyze_matrix(reference, seed=0, matrix_id=unit.id))
    fmt = "F8_E4M3" if dtype == torch.float8_e4m3fn else "F8_E5M2"
    assert row["source_dtype"] == f"{fmt} block 128x128 scaled"
    assert unit.scales_tensor == NAME + "_scale_inv" and unit.scale_block == BLOCK
    # the trap planted before quantization is found, at its coordinates
    assert row["rand_num_spikes"] >= len(PLANTED)
    top = {(e["row"], e["col"]) for e in row["trap_entries"][: len(PLANTED)]}
    assert top == set(PLANTED)
    # the scales are never audited on their own
    reasons = {s.name: s.reason for s in plan.skipped}
    assert "never audited alone" in reasons[NAME + "_scale_inv"]
    assert [u.tensor for u in plan.units] == [NAME]


def test_streamed_path_dequantizes_the_same_way(tmp_path):
    q, scales = _block_quantize(_weight(), torch.float8_e4m3fn)
    quantization = {"quant_method": "fp8", "weight_block_size": list(BLOCK)}
    folder = _write(tmp_path / "m", {NAME: q, NAME + "_scale_inv": scales}, quantization)
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    [unit] = checkpoint.plan(8).units
    whole = checkpoint.read_matrix(unit)
    for chunk in (1, 50, 128, 299):  # chunks that cut blocks anywhere
        assert np.array_equal(np.concatenate(list(checkpoint.iter_rows(unit, chunk))), whole)
    # an audit that streams it (budget 0) reports the in-memory numbers
    _, _, _, streamed = _audit_one(folder, AnalysisSettings(seed=0, memory_budget_mb=0))
    _same_numbers(streamed, analyze_matrix(whole, seed=0, matrix_id=unit.id))


@pytest.mark.parametrize(
    ("scale_shape", "label"),
    [((SHAPE[0], 1), "per-channel"), ((SHAPE[0],), "per-channel"), ((), "per-tensor")],
)
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_compressed_tensors_weight_scale(scale_shape, label, dtype, tmp_path):
    w = _weight()
    channel = w.abs().amax(dim=1, keepdim=True) / FP8_MAX[dtype]
    scale = channel if scale_shape else w.abs().max() / FP8_MAX[dtype]
    q = (w / scale).to(dtype)
    tensors = {
        NAME: q,
        NAME + "_scale": scale.reshape(scale_shape).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.input_scale": torch.tensor([0.5]),
    }
    quantization = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    folder = _write(tmp_path / "m", tensors, quantization)
    checkpoint, plan, unit, row = _audit_one(folder, AnalysisSettings(seed=0))
    # the documented formula: W = q * weight_scale (per output row, or one for all)
    s = scale.to(torch.bfloat16).float().numpy().reshape(-1, 1)
    expected = (q.float().numpy() * s).astype(np.float32)
    assert np.array_equal(checkpoint.read_matrix(unit), expected)
    _same_numbers(row, analyze_matrix(expected, seed=0, matrix_id=unit.id))
    assert row["source_dtype"].endswith(f"{label} scaled")
    top = {(e["row"], e["col"]) for e in row["trap_entries"][: len(PLANTED)]}
    assert top == set(PLANTED)
    reasons = {s.name: s.reason for s in plan.skipped}
    assert "never audited alone" in reasons[NAME + "_scale"]
    assert reasons["model.layers.0.self_attn.q_proj.input_scale"].startswith("activation scale")
    # without the scales the spectrum would be off by orders of magnitude
    raw = analyze_matrix(q.float().numpy(), seed=0, randomize=False)
    assert raw["lambda_max"] > 100 * row["lambda_max"]


@pytest.mark.parametrize(
    ("scale_shape", "label"),
    [((SHAPE[0], 1), "per-channel"), ((1, 1), "per-tensor"), ((3, 2), "block 100x100")],
)
def test_torchao_float8_is_dequantized_and_named_by_its_weight(scale_shape, label, tmp_path):
    """torchao's safetensors (transformers' TorchAoHfQuantizer, torchao's
    flatten_tensor_state_dict): Float8Tensor `P.weight` is stored as `P._weight_qdata` and
    `P._weight_scale`, the scale being the weight's shape over its block_size (per row,
    per tensor, 2-D blocks); dequantized W = qdata * scale."""
    w = _weight()
    rows, cols = SHAPE[0] // scale_shape[0], SHAPE[1] // scale_shape[1]
    blocks = w.reshape(scale_shape[0], rows, scale_shape[1], cols)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX[torch.float8_e4m3fn]
    full = torch.kron(scale, torch.ones(rows, cols))
    q = (w / full).to(torch.float8_e4m3fn)
    prefix = NAME.removesuffix("weight")
    tensors = {prefix + "_weight_qdata": q, prefix + "_weight_scale": scale}
    folder = _write(tmp_path / "m", tensors, {"quant_method": "torchao"})
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    plan = checkpoint.plan(8)
    [unit] = plan.units
    assert (unit.id, unit.tensor, unit.kind) == (NAME, prefix + "_weight_qdata", "q_proj")
    expected = (q.float() * full).numpy()
    assert np.array_equal(checkpoint.read_matrix(unit), expected)
    [row] = analyze_units(checkpoint, [unit], AnalysisSettings(seed=0))
    _same_numbers(row, analyze_matrix(expected, seed=0, matrix_id=unit.id))
    assert row["matrix"] == NAME and row["source_dtype"] == f"F8_E4M3 {label} scaled"
    assert {s.name: s.reason for s in plan.skipped}[prefix + "_weight_scale"] == (
        f"torchao quantization state of {NAME} (never audited alone)"
    )


def test_scales_that_do_not_fit_are_skipped_with_a_reason(tmp_path):
    q, scales = _block_quantize(_weight(), torch.float8_e4m3fn)
    tensors = {NAME: q, NAME + "_scale_inv": scales}
    no_block = _write(tmp_path / "a", tensors, {"quant_method": "fp8"})
    plan = open_checkpoint(resolve_model(str(no_block))).plan(8)
    assert not plan.units
    assert "weight_block_size" in dict((s.name, s.reason) for s in plan.skipped)[NAME]
    wrong = _write(tmp_path / "b", tensors, {"quant_method": "fp8", "weight_block_size": [64, 64]})
    plan = open_checkpoint(resolve_model(str(wrong))).plan(8)
    assert not plan.units
    assert "fit no known layout" in dict((s.name, s.reason) for s in plan.skipped)[NAME]


def test_fp8_expert_stack_with_scales_is_not_audited_raw():
    from llm_audit.source.plan import build_plan

    stack = "model.layers.0.mlp.experts.down_proj"
    tensors = {
        stack: SimpleNamespace(dtype="F8_E4M3", shape=(4, 256, 128)),
        stack + "_scale_inv": SimpleNamespace(dtype="F32", shape=(4, 2, 1)),
    }
    plan = build_plan(tensors, min_evals=8)
    assert not plan.units
    assert "FP8 expert stack with scales" in {s.name: s.reason for s in plan.skipped}[stack]


def test_fused_qkv_rows_read_their_own_scale_rows(tmp_path):
    """Phi-3's qkv_proj in FP8 with 16x16 blocks: each of q, k, v reads its rows and the
    scale rows that cover them, nothing more, and equals those rows of the whole."""
    w = torch.from_numpy(np.random.default_rng(1).standard_normal((96, 40)) * 0.02).float()
    block = (16, 16)
    grid = (6, 3)
    scales = torch.stack(
        [
            torch.stack(
                [
                    w[i * 16 : i * 16 + 16, j * 16 : j * 16 + 16].abs().max() / 448
                    for j in range(grid[1])
                ]
            )
            for i in range(grid[0])
        ]
    )
    q = (w / torch.kron(scales, torch.ones(block))[:, :40]).to(torch.float8_e4m3fn)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    folder = tmp_path / "phi3"
    folder.mkdir()
    save_file({name: q, name + "_scale_inv": scales}, folder / "model.safetensors")
    config = {
        "model_type": "phi3",
        "hidden_size": 40,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)},
    }
    (folder / "config.json").write_text(json.dumps(config))
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    units = checkpoint.plan(8).units
    assert [(u.kind, u.row_start, u.row_stop, u.layout) for u in units] == [
        ("q_proj", 0, 64, "rows"),
        ("k_proj", 64, 80, "rows"),
        ("v_proj", 80, 96, "rows"),
    ]
    whole = _dequantize_fp8_weight(q, scales, list(block), torch.float32).numpy()
    for unit in units:
        checkpoint.bytes_read = 0
        part = checkpoint.read_matrix(unit)
        assert np.array_equal(part, whole[unit.row_start : unit.row_stop])
        scale_rows = (unit.row_stop - 1) // 16 + 1 - unit.row_start // 16
        assert checkpoint.bytes_read == unit.nbytes == part.size + scale_rows * 3 * 4


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_llama_quantized_by_transformers_own_fp8_code(scale_fmt, tmp_path):
    """A Llama checkpoint whose linear layers are quantized by transformers' own FP8
    quantizer op (`Fp8Quantize`, what `save_pretrained` of an FP8 model runs; its
    environment check wants a GPU, the op itself is plain torch): every layer is audited
    on the weight transformers' own load-time dequantization (`Fp8Dequantize`) gives."""
    from transformers import FineGrainedFP8Config, LlamaConfig, LlamaForCausalLM
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    state = {
        k: v.detach().to(torch.bfloat16) for k, v in LlamaForCausalLM(config).state_dict().items()
    }
    planted = "model.layers.1.mlp.up_proj.weight"
    state[planted][30, 7] = 1.0  # before quantization
    fp8 = FineGrainedFP8Config(weight_block_size=(16, 16), scale_fmt=scale_fmt)
    quantizer = Fp8Quantize(SimpleNamespace(quantization_config=fp8))
    tensors = {}
    for name, value in state.items():
        is_linear = ".layers." in name and name.endswith("proj.weight")
        tensors.update(quantizer._quantize_one(name, value) if is_linear else {name: value})
    folder = tmp_path / "llama-fp8"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(
        json.dumps(config.to_dict() | {"quantization_config": json.loads(fp8.to_json_string())})
    )

    checkpoint = open_checkpoint(resolve_model(str(folder)))
    plan = checkpoint.plan(8)
    linear = [u for u in plan.units if u.tensor.endswith("proj.weight")]
    assert len(linear) == 14 and all(u.scales_tensor for u in linear)
    dequantize = Fp8Dequantize(None)
    rows = analyze_units(checkpoint, plan.units, AnalysisSettings(seed=0))
    for unit, row in zip(plan.units, rows, strict=True):
        if unit.scales_tensor is None:
            continue
        reference = dequantize._dequantize_one(
            tensors[unit.tensor], tensors[unit.scales_tensor], torch.float32
        ).numpy()
        assert np.array_equal(checkpoint.read_matrix(unit), reference), unit.id
        _same_numbers(row, analyze_matrix(reference, seed=0, matrix_id=unit.id))
    found = {r["matrix"]: r for r in rows if r["rand_num_spikes"]}
    assert planted in found
    assert (found[planted]["trap_entries"][0]["row"], found[planted]["trap_entries"][0]["col"]) == (
        30,
        7,
    )
    scale_dtype = "F8_E8M0" if scale_fmt == "ue8m0" else "F32"
    assert checkpoint.tensors[planted + "_scale_inv"].dtype == scale_dtype


def _scaled(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 codes of `w` and one scale per `block` (the last blocks partial)."""
    grid = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
    scales = torch.zeros(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            part = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            scales[i, j] = part.abs().max() / 448
    big = torch.kron(scales, torch.ones(block))[: w.shape[0], : w.shape[1]]
    return (w / big).to(torch.float8_e4m3fn), scales


PREFIX = NAME[: -len("weight")]
# How real producers name and configure FP8 scales. transformers' own FP8 loader renames
# `.qscale_weight` (Mistral Large) and a bare `.scale` (DeepSeek-V4) to `weight_scale_inv`;
# `weight_block_size: null` is its per-tensor mode; compressed-tensors' FP8_BLOCK preset puts
# the block in `config_groups.*.weights.block_structure`.
FP8_128 = {"quant_method": "fp8", "weight_block_size": [128, 128]}
SCALE_LAYOUTS = {
    "mistral qscale_weight": ("qscale_weight", BLOCK, FP8_128),
    "deepseek-v4 scale": ("scale", BLOCK, FP8_128),
    "transformers per-tensor": ("weight_scale_inv", SHAPE, FP8_128 | {"weight_block_size": None}),
    "compressed-tensors block": (
        "weight_scale",
        BLOCK,
        {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"strategy": "block", "block_structure": [128, 128], "num_bits": 8},
                }
            },
        },
    ),
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(SCALE_LAYOUTS))
def test_scales_under_every_producers_name_are_applied(layout, tmp_path):
    suffix, block, quantization = SCALE_LAYOUTS[layout]
    q, scales = _scaled(_weight(), block)
    if block == SHAPE:
        scales = scales.reshape(())  # one scale, 0-d as transformers writes it
    folder = _write(tmp_path / "m", {NAME: q, PREFIX + suffix: scales}, quantization)
    checkpoint, plan, unit, row = _audit_one(folder, AnalysisSettings(seed=0))
    reference = _dequantize_fp8_weight(q, scales.reshape(-1, 1) if block == SHAPE else scales,
                                       list(block), torch.float32).numpy()  # fmt: skip
    assert np.array_equal(checkpoint.read_matrix(unit), reference)
    _same_numbers(row, analyze_matrix(reference, seed=0, matrix_id=unit.id))
    assert [s.name for s in plan.skipped] == [PREFIX + suffix]  # the scales, not a matrix
    assert "never audited alone" in plan.skipped[0].reason


@pytest.mark.parametrize(
    "quantization",
    [
        {"quant_method": "fp8", "weight_block_size": [1, 32], "scale_fmt": "ue8m0"},
        {"quant_method": "compressed-tensors", "format": "mxfp8-quantized"},
    ],
)
def test_u8_scales_of_mx_checkpoints_are_e8m0_exponents(quantization, tmp_path):
    """MXFP8 (compressed-tensors) and transformers' ue8m0 checkpoints store their scales as
    plain bytes: 2^(byte - 127), as compressed-tensors' mx_utils and transformers decode."""
    w = _weight()[:, :192]  # 6 groups of 32 per row
    exponents = torch.ceil(torch.log2(w.abs().reshape(SHAPE[0], 6, 32).amax(-1) / 448))
    q = (w / torch.repeat_interleave(2.0**exponents, 32, dim=1)).to(torch.float8_e4m3fn)
    stored = (exponents + 127).to(torch.uint8)
    name = "weight_scale" if "format" in quantization else "weight_scale_inv"
    folder = _write(tmp_path / "m", {NAME: q, PREFIX + name: stored}, quantization)
    checkpoint, _, unit, row = _audit_one(folder, AnalysisSettings(seed=0))
    reference = q.float() * torch.repeat_interleave(2.0**exponents, 32, dim=1)
    assert np.array_equal(checkpoint.read_matrix(unit), reference.numpy())
    label = "group 32" if "format" in quantization else "block 1x32"
    assert row["source_dtype"] == f"F8_E4M3 {label} scaled"
    # without the config saying so, bytes are not taken for exponents
    plain = _write(tmp_path / "p", {NAME: q, PREFIX + name: stored}, {"quant_method": "fp8"})
    plan = open_checkpoint(resolve_model(str(plain))).plan(8)
    assert not plan.units
    assert "scales are U8 (not decoded)" in {s.name: s.reason for s in plan.skipped}[NAME]


def test_fp8_weights_whose_scales_are_not_found_are_not_read_as_codes(tmp_path):
    """A quantized checkpoint whose FP8 weight has no scale under a name we know would be
    audited on its raw codes (lambda_max off by 10^5): skipped, with the names looked for.
    Without a quantization config, FP8 values are plain numbers and audited."""
    q, scales = _scaled(_weight(), BLOCK)
    tensors = {NAME: q, PREFIX + "weight.unknown_scale_name": scales}
    skipped = _write(tmp_path / "a", tensors, FP8_128)
    plan = open_checkpoint(resolve_model(str(skipped))).plan(8)
    assert NAME not in [u.tensor for u in plan.units]
    reason = {s.name: s.reason for s in plan.skipped}[NAME]
    assert "without scales under a known name" in reason and "declares fp8" in reason
    plain = tmp_path / "b"
    plain.mkdir()
    save_file({NAME: q}, plain / "model.safetensors")
    assert [u.tensor for u in open_checkpoint(resolve_model(str(plain))).plan(8).units] == [NAME]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.01])
def test_a_corrupt_scale_fails_its_matrix_naming_the_scale_and_block(bad, tmp_path):
    q, scales = _block_quantize(_weight(), torch.float8_e4m3fn)
    scales[2, 1] = bad
    quantization = {"quant_method": "fp8", "weight_block_size": list(BLOCK)}
    folder = _write(tmp_path / "m", {NAME: q, NAME + "_scale_inv": scales}, quantization)
    for budget in ({}, {"memory_budget_mb": 0}):  # in memory and streamed
        _, _, _, row = _audit_one(folder, AnalysisSettings(seed=0, **budget))
        assert row["status"] == "error" and row["error_kind"] == "data"
        assert f"scale tensor '{NAME}_scale_inv'" in row["error"]
        assert "at block (2, 1)" in row["error"]
