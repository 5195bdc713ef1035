"""The audit plan: real gpt-oss tensor lists give 1,658 and 9,398 matrices; other layouts;
absurd headers refused or skipped at once; user kind rules."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from llm_audit.errors import AuditError
from llm_audit.source.plan import build_plan
from llm_audit.source.roles import parse_kind_rules

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")


def _meta(dtype: str, *shape: int) -> SimpleNamespace:
    return SimpleNamespace(dtype=dtype, shape=tuple(shape))


def _real(model: str) -> dict[str, SimpleNamespace]:
    tensors = json.loads((SHARED / model / "tensors.json").read_text())
    return {name: _meta(t["dtype"], *t["shape"]) for name, t in tensors.items()}


@needs_shared
@pytest.mark.parametrize(
    ("model", "layers", "experts", "total"),
    [("gpt-oss-20b", 24, 32, 1658), ("gpt-oss-120b", 36, 128, 9398)],
)
def test_real_gpt_oss_tensor_lists(model, layers, experts, total):
    plan = build_plan(_real(model), min_evals=8)
    assert len(plan.units) == total
    per_layer = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 1, "router": 1}
    expected = {k: v * layers for k, v in per_layer.items()}
    expected |= {
        "expert_gate_up": layers * experts,
        "expert_down": layers * experts,
        "embedding": 1,
        "lm_head": 1,
    }
    assert plan.counts_by_kind() == expected
    largest = plan.largest()
    assert largest.kind == "embedding" and largest.shape == (201088, 2880)
    gate_up = next(u for u in plan.units if u.kind == "expert_gate_up")
    assert gate_up.shape == (5760, 2880) and gate_up.source_dtype == "MXFP4"
    assert gate_up.nbytes == 5760 * 90 * 17
    reasons = plan.skipped_reasons()
    assert reasons["MXFP4 scales (read with their blocks)"] == 2 * layers
    assert reasons["attention sinks (vector)"] == layers
    assert reasons["norm (vector)"] == 2 * layers + 1
    assert reasons["bias (vector)"] == 7 * layers  # q k v o router + 2 stacked expert biases


def test_openai_original_layout_splits_fused_qkv():
    tensors = {
        "embedding.weight": _meta("BF16", 1000, 64),
        "block.0.attn.norm.scale": _meta("BF16", 64),
        "block.0.attn.qkv.weight": _meta("BF16", 256, 64),
        "block.0.attn.out.weight": _meta("BF16", 64, 128),
        "block.0.mlp.gate.weight": _meta("BF16", 16, 64),
        "block.0.mlp.mlp1_weight.blocks": _meta("U8", 16, 256, 2, 16),
        "block.0.mlp.mlp1_weight.scales": _meta("U8", 16, 256, 2),
        "block.0.mlp.mlp2_weight.blocks": _meta("U8", 16, 64, 4, 16),
        "block.0.mlp.mlp2_weight.scales": _meta("U8", 16, 64, 4),
        "unembedding.weight": _meta("BF16", 1000, 64),
    }
    config = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}
    plan = build_plan(tensors, config, min_evals=8)
    qkv = {u.kind: (u.row_start, u.row_stop) for u in plan.units if u.layout == "rows"}
    assert qkv == {"q_proj": (0, 128), "k_proj": (128, 192), "v_proj": (192, 256)}
    kinds = plan.counts_by_kind()
    assert kinds["expert_gate_up"] == kinds["expert_down"] == 16
    assert kinds["o_proj"] == kinds["router"] == kinds["embedding"] == kinds["lm_head"] == 1
    # The name alone does not fix the layout: timm ViTs and vision towers (Qwen2-VL) use it
    # too, without heads in config.json or with the text model's. Such a qkv stays whole.
    for config in ({}, {"num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32}):
        units = build_plan(tensors, config, min_evals=8).units
        whole = [(u.kind, u.layout, u.shape) for u in units if "qkv" in u.tensor]
        assert whole == [("qkv_proj", "dense", (256, 64))]
    # Without num_key_value_heads the heads are not grouped (a ViT's [q; k; v], 3 x 64 rows).
    vit = {"blocks.0.attn.qkv.weight": _meta("F32", 192, 64)}
    units = build_plan(vit, {"num_attention_heads": 2, "hidden_size": 64}, min_evals=8).units
    parts = {u.kind: (u.row_start, u.row_stop) for u in units}
    assert parts == {"q_proj": (0, 64), "k_proj": (64, 128), "v_proj": (128, 192)}


def test_transformers_dense_experts_are_transposed_per_expert():
    plan = build_plan(
        {
            "model.layers.3.mlp.experts.gate_up_proj": _meta("F32", 4, 64, 256),
            "model.layers.3.mlp.experts.down_proj": _meta("F32", 4, 128, 64),
        },
        min_evals=8,
    )
    gate_up = [u for u in plan.units if u.kind == "expert_gate_up"]
    assert [u.expert for u in gate_up] == [0, 1, 2, 3]
    assert gate_up[0].shape == (256, 64) and gate_up[0].transpose and gate_up[0].layer == 3
    assert gate_up[0].id == "model.layers.3.mlp.experts.gate_up_proj[0]"
    assert gate_up[0].nbytes == 64 * 256 * 4


def test_generic_layers_conv_and_skips():
    plan = build_plan(
        {
            "encoder.layer.2.dense.weight": _meta("F16", 64, 32),
            "conv1.weight": _meta("F32", 16, 8, 3, 3),
            "tiny.weight": _meta("F32", 4, 100),
            "ids": _meta("I64", 10, 10),
            "model.layers.0.mlp.experts.down_proj_bias": _meta("BF16", 4, 64),
        },
        min_evals=8,
    )
    linear = [u for u in plan.units if u.kind == "linear"]
    assert [(u.id, u.layer) for u in linear] == [("encoder.layer.2.dense.weight", 2)]
    assert sum(u.kind == "conv" for u in plan.units) == 9
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["tiny.weight"].startswith("too small")
    assert reasons["ids"] == "not a float tensor (I64)"
    assert reasons["model.layers.0.mlp.experts.down_proj_bias"] == "bias (vector)"


def test_broken_mxfp4_pairs_are_errors():
    blocks = {"model.layers.0.mlp.experts.down_proj_blocks": _meta("U8", 2, 64, 2, 16)}
    with pytest.raises(AuditError, match="without their scales"):
        build_plan(blocks, min_evals=8)
    scales = {"model.layers.0.mlp.experts.down_proj_scales": _meta("U8", 2, 64, 2)}
    with pytest.raises(AuditError, match="without their blocks"):
        build_plan(scales, min_evals=8)
    mismatched = blocks | {"model.layers.0.mlp.experts.down_proj_scales": _meta("U8", 2, 64, 3)}
    with pytest.raises(AuditError, match="scales must be U8"):
        build_plan(mismatched, min_evals=8)


def test_zero_size_expert_stack_plans_at_once():
    tensors = {
        "model.layers.0.mlp.experts.down_proj": _meta("BF16", 10**12, 0, 64),
        "model.layers.0.mlp.experts.gate_up_proj_blocks": _meta("U8", 10**12, 0, 2, 16),
        "model.layers.0.mlp.experts.gate_up_proj_scales": _meta("U8", 10**12, 0, 2),
        "model.layers.0.mlp.experts.up_proj": _meta("BF16", 10**12, 4, 4),
    }
    start = time.perf_counter()
    plan = build_plan(tensors, min_evals=8)
    assert time.perf_counter() - start < 1.0
    assert not plan.units
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["model.layers.0.mlp.experts.down_proj"].startswith("empty")
    assert reasons["model.layers.0.mlp.experts.gate_up_proj_blocks"].startswith("empty")


def test_absurd_dimensions_and_unit_counts_are_refused():
    with pytest.raises(AuditError, match="dimension above"):
        build_plan({"lm_head.weight": _meta("BF16", 2**41, 0)}, min_evals=8)
    with pytest.raises(AuditError, match="would give 2097152 matrices"):
        build_plan(
            {"model.layers.0.mlp.experts.down_proj": _meta("BF16", 2**21, 8, 8)}, min_evals=8
        )
    with pytest.raises(AuditError, match="would give"):
        build_plan({"conv.weight": _meta("F32", 8, 8, 2**11, 2**10)}, min_evals=8)


def test_conv_slices_cost_their_share_of_the_kernel():
    plan = build_plan({"conv1.weight": _meta("F32", 16, 8, 3, 3)}, min_evals=8)
    assert len(plan.units) == 9
    assert plan.bytes_to_read() == 16 * 8 * 3 * 3 * 4  # the kernel, read once


def test_skipped_list_names_every_tensor_and_reason():
    plan = build_plan(
        {
            "a.norm.weight": _meta("BF16", 8),
            "transformer.h.0.ln_1.weight": _meta("BF16", 8),
            "ids": _meta("I64", 10, 10),
        },
        min_evals=8,
    )
    assert plan.skipped_list() == [
        {"name": "a.norm.weight", "reason": "norm (vector)"},
        {"name": "transformer.h.0.ln_1.weight", "reason": "norm (vector)"},
        {"name": "ids", "reason": "not a float tensor (I64)"},
    ]


def test_kind_rules_from_a_config_are_validated():
    rules = parse_kind_rules(
        [{"pattern": r"\.ffn\.(\d+)\.lin\.weight$", "kind": "ffn_expert", "expert": 1}], "c.yaml"
    )
    plan = build_plan(
        {"blocks.3.ffn.5.lin.weight": _meta("BF16", 16, 16)}, min_evals=8, kind_rules=rules
    )
    [unit] = plan.units
    assert (unit.kind, unit.layer, unit.expert) == ("ffn_expert", 3, 5)
    for bad, message in [
        ({"kind": "x"}, "with 'pattern' and 'kind'"),
        ({"pattern": "(", "kind": "x"}, "bad regex"),
        ({"pattern": "a", "kind": "Not Snake"}, "lower_snake_case"),
        ({"pattern": "a", "kind": "x", "expert": 2}, "no group 2"),
        ({"pattern": "a", "kind": "x", "colour": 1}, "unknown key"),
    ]:
        with pytest.raises(AuditError, match=re.escape(message)):
            parse_kind_rules([bad], "c.yaml")
    letters = parse_kind_rules([{"pattern": r"ffn\.(\w+)\.", "kind": "x", "expert": 1}], "c.yaml")
    with pytest.raises(AuditError, match="not an expert index"):
        build_plan({"ffn.ab.w": _meta("BF16", 16, 16)}, min_evals=8, kind_rules=letters)


@pytest.mark.parametrize(
    ("name", "kind", "layer", "expert"),
    [
        ("gpt_neox.embed_in.weight", "embedding", None, None),
        ("embed_out.weight", "lm_head", None, None),
        ("gpt_neox.layers.3.attention.query_key_value.weight", "qkv_proj", 3, None),
        ("gpt_neox.layers.3.attention.dense.weight", "o_proj", 3, None),
        ("transformer.blocks.2.attn.Wqkv.weight", "qkv_proj", 2, None),
        ("transformer.blocks.2.attn.out_proj.weight", "o_proj", 2, None),
        ("transformer.blocks.2.ffn.up_proj.weight", "up_proj", 2, None),
        ("layers.7.attention.wq.weight", "q_proj", 7, None),
        ("layers.7.feed_forward.w1.weight", "gate_proj", 7, None),
        ("layers.7.feed_forward.w2.weight", "down_proj", 7, None),
        ("output.weight", "lm_head", None, None),
        ("tok_embeddings.weight", "embedding", None, None),
        ("model.layers.61.shared_head.head.weight", "lm_head", 61, None),
        ("model.layers.5.block_sparse_moe.experts.11.w3.weight", "expert_up", 5, 11),
        ("encoder.layer.4.attention.self.query.weight", "q_proj", 4, None),
        ("model.layers.0.mlp.experts.3.up_proj.weight", "expert_up", 0, 3),
        ("model.layers.0.mlp.shared_expert.up_proj.weight", "shared_up", 0, None),
        ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "kv_a_proj", 0, None),
        # names found in families the table did not know (transformers 5.24's own)
        ("backbone.layers.2.mixer.o_proj.weight", "o_proj", 2, None),  # NemotronH
        ("backbone.layers.1.mixer.gate.weight", "router", 1, None),
        ("backbone.layers.0.mixer.out_proj.weight", "linear", 0, None),  # Mamba's, not attention
        ("model.layers.0.self_attn.1.o_proj.weight", "o_proj", 0, None),  # LongCat-Flash
        ("model.layers.0.mlp.router.classifier.weight", "router", 0, None),
        ("model.layers.0.shared_mlp.input_linear.weight", "shared_gate_up", 0, None),  # Granite
        ("model.layers.0.shared_mlp.output_linear.weight", "shared_down", 0, None),
        ("model.embed_tokens_per_layer.weight", "embedding", None, None),  # Gemma-3n
        ("vision_tower.encoder.layer.1.attention.projection_layer.weight", "o_proj", 1, None),
        ("vision_model.gated_positional_embedding.embedding", "position_embedding", None, None),
        ("audio.encoder.encoders.3.self_attn.linear_q.weight", "q_proj", 3, None),  # Phi-4-MM
        # audio and vision families of transformers 5.24 (their modeling files' names)
        ("conformer_layers.2.self_attn.linear_v.weight", "v_proj", None, None),  # FS2-Conformer
        ("conformer_layers.2.self_attn.linear_out.weight", "o_proj", None, None),
        ("conformer_layers.2.self_attn.linear_pos.weight", "linear", None, None),
        ("encoder.layers.1.feed_forward.intermediate_dense.weight", "up_proj", 1, None),  # wav2vec2
        ("encoder.layers.1.feed_forward.output_dense.weight", "down_proj", 1, None),
        ("encoder.stages.1.layers.2.pwconv1.weight", "up_proj", None, None),  # ConvNeXt
        ("encoder.stages.1.layers.2.pwconv2.weight", "down_proj", None, None),
        ("encoder.block.1.0.mlp.dense1.weight", "up_proj", None, None),  # SegFormer (nested)
        ("encoder.block.1.0.mlp.dense2.weight", "down_proj", None, None),
        ("encoder.layers.1.blocks.0.attention.self.query.weight", "q_proj", None, None),  # Swin
        ("semantic.layers.3.attn.att_proj.weight", "qkv_proj", 3, None),  # Bark
        ("semantic.layers.3.mlp.in_proj.weight", "up_proj", 3, None),
        ("semantic.layers.3.mlp.out_proj.weight", "down_proj", 3, None),
        ("semantic.input_embeds_layer.weight", "embedding", None, None),
        ("semantic.position_embeds_layer.weight", "position_embedding", None, None),
        (
            "mask_decoder.transformer.layers.0.cross_attn_token_to_image.out_proj.weight",
            "o_proj",
            0,
            None,
        ),  # SAM
        ("model.query_position_embeddings.weight", "position_embedding", None, None),  # DETR
        ("model.transformer_module.queries_embedder.weight", "embedding", None, None),
        (
            "encoder.layers.0.blocks.1.attention.self.relative_position_bias_table",
            "position_embedding",
            None,
            None,
        ),
        ("vision_encoder.layers.1.attn.rel_pos_h", "position_embedding", 1, None),
        ("encoder.encoder.rel_embeddings.weight", "position_embedding", None, None),  # SEW-D
        ("quantizer.layers.0.codebook.embed", "embedding", 0, None),  # EnCodec: its VQ stage
        ("quantizer.quantizers.0.codebook.weight", "embedding", None, None),  # DAC
    ],
)
def test_naming_table_beyond_the_tested_families(name, kind, layer, expert):
    [unit] = build_plan({name: _meta("BF16", 64, 64)}, min_evals=8).units
    assert (unit.kind, unit.layer, unit.expert) == (kind, layer, expert)


def test_llama4_stacked_experts_under_feed_forward():
    plan = build_plan(
        {
            "language_model.model.layers.1.feed_forward.experts.gate_up_proj": _meta(
                "BF16", 2, 32, 96
            )
        },
        min_evals=8,
    )
    assert [(u.kind, u.expert, u.shape) for u in plan.units] == [
        ("expert_gate_up", 0, (96, 32)),
        ("expert_gate_up", 1, (96, 32)),
    ]


@pytest.mark.parametrize(
    ("gate_up", "down", "stored_in_out"),
    [
        ((4, 32, 96), (4, 48, 32), True),  # gpt-oss, Llama 4, Aria on the hub: [E, in, out]
        ((4, 96, 32), (4, 32, 48), False),  # transformers 5 saving Qwen3-VL-MoE: [E, out, in]
        ((4, 96, 32), (4, 32, 32), False),  # a square down stack goes with its gate_up
        ((4, 32, 64), (4, 32, 32), True),
    ],
)
def test_expert_stack_orientation_follows_the_hidden_size(gate_up, down, stored_in_out):
    """The same names hold [E, in, out] on the hub and [E, out, in] once transformers 5
    re-saves a model (Qwen3-VL-MoE): the side that is config.json's hidden size (also
    under `text_config`) decides, where it is one side only."""
    base = "model.language_model.layers.0.mlp.experts."
    tensors = {
        base + "gate_up_proj": _meta("BF16", *gate_up),
        base + "down_proj": _meta("BF16", *down),
    }
    config = {"model_type": "qwen3_vl_moe", "text_config": {"hidden_size": 32}}
    units = build_plan(tensors, config, min_evals=8).units
    for unit in units:
        assert unit.transpose is stored_in_out, unit.id
        stored = tensors[unit.tensor].shape[1:]
        assert unit.shape == (stored[::-1] if stored_in_out else stored), unit.id
    down_units = [u for u in units if u.kind == "expert_down"]
    assert {u.shape[0] for u in down_units} == {32}  # a down projection's output: hidden


def test_decay_buffers_and_conv1d_kernels():
    """MiniMax saves its attention decay constants with the weights: not weights. A Conv1d
    kernel [out, in, k] (Whisper's, wav2vec2's feature extractor) is k matrices."""
    plan = build_plan(
        {
            "model.layers.0.self_attn.diagonal_decay": _meta("F32", 1, 4, 256, 256),
            "model.layers.0.self_attn.slope_rate": _meta("F32", 4, 1, 1),
            "model.encoder.conv1.weight": _meta("F32", 64, 80, 3),
            "model.layers.0.mixer.conv1d.weight": _meta("F32", 64, 1, 4),
        },
        min_evals=8,
    )
    assert [(u.id, u.kind, u.shape, u.position) for u in plan.units] == [
        (f"model.encoder.conv1.weight[{k}]", "conv", (64, 80), (k,)) for k in range(3)
    ]
    skipped = {s.name: s for s in plan.skipped}
    decay = skipped["model.layers.0.self_attn.diagonal_decay"]
    assert "decay constants" in decay.reason and not decay.weight
    assert not skipped["model.layers.0.self_attn.slope_rate"].weight
    assert skipped["model.layers.0.mixer.conv1d.weight"].reason.startswith("too small")


def test_phi4_multimodal_splits_its_language_models_qkv_only():
    """Phi-4-multimodal's language model keeps Phi-3's [q; k; v] rows (split by the
    config's heads); a tower's qkv_proj the heads do not add up to is kept whole."""
    config = {"model_type": "phi4_multimodal", "hidden_size": 64, "num_attention_heads": 4}
    config |= {"num_key_value_heads": 2}  # head_dim 16: q 64 rows, k 32, v 32
    plan = build_plan(
        {
            "model.layers.0.self_attn.qkv_proj.weight": _meta("BF16", 128, 64),
            "model.embed_tokens_extend.image_embed.qkv_proj.weight": _meta("BF16", 96, 32),
        },
        config,
        min_evals=8,
    )
    assert [(u.kind, u.row_start, u.row_stop) for u in plan.units] == [
        ("q_proj", 0, 64),
        ("k_proj", 64, 96),
        ("v_proj", 96, 128),
        ("qkv_proj", None, None),
    ]
