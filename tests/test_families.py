"""Real checkpoints of the major open-weight families, written by transformers' own
`save_pretrained` (tiny random configs, bf16, sharded): every matrix planned once with its
role, layer and expert, and a trap planted in one matrix found there and only there."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from llm_audit.errors import AuditError
from llm_audit.run.config import load_config
from llm_audit.run.units import analyze_units
from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.reference import resolve_model
from llm_audit.spectral.settings import AnalysisSettings

SMALL = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 16}
ATTN = {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2}
MLP = {"gate_proj": 2, "up_proj": 2, "down_proj": 2}
EXPERTS = {"expert_gate": 8, "expert_up": 8, "expert_down": 8}
HEADS = {"embedding": 1, "lm_head": 1}

# family -> (config class, config, expected units per kind, planted: (tensor, stored
# coordinates), the unit holding them and where they land in it (audited (out, in) rows)).
FAMILIES = {
    "llama": (
        "LlamaConfig",
        SMALL,
        ATTN | MLP | HEADS,
        ("model.layers.1.mlp.down_proj.weight", [(3, 5), (20, 40)]),
        ("model.layers.1.mlp.down_proj.weight", [(3, 5), (20, 40)]),
    ),
    "mixtral": (
        "MixtralConfig",
        SMALL | {"num_local_experts": 4, "num_experts_per_tok": 2},
        ATTN | {"expert_gate": 8, "expert_up": 8, "expert_down": 8} | HEADS,
        ("model.layers.1.block_sparse_moe.experts.2.w2.weight", [(3, 5), (20, 40)]),
        ("model.layers.1.block_sparse_moe.experts.2.w2.weight", [(3, 5), (20, 40)]),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        SMALL | MOE | {"num_experts": 4, "shared_expert_intermediate_size": 24},
        ATTN | EXPERTS | {"shared_gate": 2, "shared_up": 2, "shared_down": 2} | HEADS,
        ("model.layers.1.mlp.experts.3.down_proj.weight", [(3, 5), (20, 11)]),
        ("model.layers.1.mlp.experts.3.down_proj.weight", [(3, 5), (20, 11)]),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        SMALL | MOE | {"num_experts": 4, "head_dim": 8},
        ATTN | EXPERTS | HEADS,
        ("model.layers.0.mlp.experts.1.gate_proj.weight", [(3, 5), (12, 30)]),
        ("model.layers.0.mlp.experts.1.gate_proj.weight", [(3, 5), (12, 30)]),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        SMALL
        | MOE
        | {
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "first_k_dense_replace": 1,
            "q_lora_rank": 16,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 8,
            "n_group": 1,
            "topk_group": 1,
        },
        {"q_a_proj": 2, "q_b_proj": 2, "kv_a_proj": 2, "kv_b_proj": 2, "o_proj": 2}
        | {"gate_proj": 1, "up_proj": 1, "down_proj": 1}
        | {"expert_gate": 4, "expert_up": 4, "expert_down": 4}
        | {"shared_gate": 1, "shared_up": 1, "shared_down": 1}
        | HEADS,
        ("model.layers.1.mlp.experts.2.up_proj.weight", [(3, 5), (12, 30)]),
        ("model.layers.1.mlp.experts.2.up_proj.weight", [(3, 5), (12, 30)]),
    ),
    "gpt2": (  # Conv1D [in, out]: c_attn's column 40 is k's row 8
        "GPT2Config",
        {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32},
        {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2, "up_proj": 2, "down_proj": 2}
        | {"embedding": 1, "position_embedding": 1},
        ("transformer.h.1.attn.c_attn.weight", [(4, 40), (25, 60)]),
        ("transformer.h.1.attn.c_attn.weight:k", [(8, 4), (28, 25)]),
    ),
    "phi3": (  # qkv_proj rows: q 0-31, k 32-47, v 48-63
        "Phi3Config",
        SMALL | {"pad_token_id": 0},
        ATTN | {"gate_up_proj": 2, "down_proj": 2} | HEADS,
        ("model.layers.0.self_attn.qkv_proj.weight", [(40, 7), (33, 20)]),
        ("model.layers.0.self_attn.qkv_proj.weight:k", [(8, 7), (1, 20)]),
    ),
    "falcon": (  # per kv group of 32 rows: q 16, k 8, v 8; row 50 is group 1's k row 2
        "FalconConfig",
        {
            "vocab_size": 64,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "new_decoder_architecture": True,
            "num_kv_heads": 2,
        },
        {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2, "up_proj": 2, "down_proj": 2}
        | {"embedding": 1},
        ("transformer.h.0.self_attention.query_key_value.weight", [(50, 3), (18, 30)]),
        ("transformer.h.0.self_attention.query_key_value.weight:k", [(10, 3), (2, 30)]),
    ),
    "gemma2": (
        "Gemma2Config",
        SMALL | {"head_dim": 8},
        ATTN | MLP | {"embedding": 1},
        ("model.layers.0.self_attn.o_proj.weight", [(3, 5), (20, 30)]),
        ("model.layers.0.self_attn.o_proj.weight", [(3, 5), (20, 30)]),
    ),
    "gpt_oss": (  # experts stored [E, in, out]: expert 2's (in 10, out 20) is row 20, col 10
        "GptOssConfig",
        SMALL | {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8},
        ATTN | {"expert_gate_up": 8, "expert_down": 8} | HEADS,
        ("model.layers.1.mlp.experts.down_proj", [(2, 10, 20), (2, 40, 3)]),
        ("model.layers.1.mlp.experts.down_proj[2]", [(20, 10), (3, 40)]),
    ),
    "granitemoe": (  # experts stored [E, out, in]: expert 2's (out 10, in 20) is row 10
        "GraniteMoeConfig",
        SMALL | {"num_local_experts": 4, "num_experts_per_tok": 2},
        ATTN | {"expert_gate_up": 8, "expert_down": 8} | HEADS,
        ("model.layers.1.block_sparse_moe.output_linear.weight", [(2, 10, 20), (2, 3, 40)]),
        ("model.layers.1.block_sparse_moe.output_linear.weight[2]", [(10, 20), (3, 40)]),
    ),
    "aria_text": (  # experts stored [E, in, out] as `experts.fc1/fc2.weight`
        "AriaTextConfig",
        SMALL | {"moe_num_experts": 4, "moe_topk": 2, "moe_num_shared_experts": 1},
        ATTN
        | {"expert_gate_up": 8, "expert_down": 8}
        | {"shared_gate": 2, "shared_up": 2, "shared_down": 2}
        | HEADS,
        ("model.layers.1.mlp.experts.fc2.weight", [(2, 10, 20), (2, 40, 3)]),
        ("model.layers.1.mlp.experts.fc2.weight[2]", [(20, 10), (3, 40)]),
    ),
    "dbrx": (  # experts flattened [E * ffn, d]; w2 is stored (in, out) per expert
        "DbrxConfig",
        {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 32}
        | {"attn_config": {"kv_n_heads": 1, "rope_theta": 1e4}}
        | {"ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 4, "moe_top_k": 2}},
        {"qkv_proj": 2, "o_proj": 2} | EXPERTS | HEADS,
        ("transformer.blocks.1.ffn.experts.mlp.w2", [(2 * 48 + 10, 20), (2 * 48 + 30, 3)]),
        ("transformer.blocks.1.ffn.experts.mlp.w2[2]", [(20, 10), (3, 30)]),
    ),
}
PLANTED = (1.0, -0.75)


def _save(family: str, folder: Path) -> transformers.PretrainedConfig:
    config_class, values, _, (tensor, coords), _ = FAMILIES[family]
    config = getattr(transformers, config_class)(**values)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][tensor]
    tensors = load_file(shard)
    for value, where in zip(PLANTED, coords, strict=True):
        tensors[tensor][where] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    return config


def _expected_index(pattern: str, name: str) -> int | None:
    match = re.search(pattern, name)
    return int(match.group(1)) if match else None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_roles_experts_and_planted_trap(family, tmp_path):
    _, _, kinds, _, (trap_unit, trap_coords) = FAMILIES[family]
    config = _save(family, tmp_path / family)
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / family)))
    assert len(checkpoint.model.files) > 1  # sharded
    plan = checkpoint.plan(8)

    # every 2-D weight (and every expert of a stack) with >= 8 eigenvalues: planned exactly
    # once, its parts covering it
    assert len({u.id for u in plan.units}) == len(plan.units)
    covered = Counter()
    for unit in plan.units:
        covered[unit.tensor] += unit.shape[0] * unit.shape[1]
    for name, info in checkpoint.tensors.items():
        matrix = info.shape[-2:]
        if len(info.shape) in (2, 3) and min(matrix) >= 8 and not name.endswith("bias"):
            assert covered.pop(name) == int(np.prod(info.shape)), name
    assert not covered  # nothing else planned

    # roles: the expected kinds and counts, nothing left as `linear`
    assert plan.counts_by_kind() == kinds

    # layer and expert indices from the names
    for unit in plan.units:
        layer = _expected_index(r"\.(?:layers|h|blocks)\.(\d+)\.", unit.tensor)
        assert unit.layer == layer, unit.id
        expert = _expected_index(r"\.experts\.(\d+)\.", unit.tensor)
        expert = expert if expert is not None else _expected_index(r"\[(\d+)\]$", unit.id)
        assert unit.expert == expert, unit.id
        assert (unit.expert is not None) == unit.kind.startswith("expert_"), unit.id

    # transformers' own modules agree: embeddings are embeddings, Conv1D is transposed
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    by_tensor = {u.tensor: u for u in plan.units}
    for module_name, module in skeleton.named_modules():
        unit = by_tensor.get(f"{module_name}.weight")
        if unit is None:
            continue
        if isinstance(module, torch.nn.Embedding):
            assert unit.kind in ("embedding", "position_embedding"), unit.id
        assert unit.transpose == isinstance(module, transformers.pytorch_utils.Conv1D), unit.id

    # the planted trap: found in exactly its matrix, its largest entries the planted ones.
    # A random matrix this small (8-32 eigenvalues) shows a genuine correlation trap in
    # about one shuffle of 200 (seeds 0-15 here: 0 to 3 false traps among these ~300
    # matrices, each well past its edge); with run seed 6 there is none.
    rows = analyze_units(checkpoint, plan.units, AnalysisSettings(seed=6))
    assert all(r["status"] == "ok" for r in rows)
    trapped = {r["matrix"]: r for r in rows if r["rand_num_spikes"]}
    assert list(trapped) == [trap_unit]
    planted = trapped[trap_unit]
    assert planted["rand_num_spikes"] >= len(trap_coords)
    entries = planted["trap_entries"][: len(trap_coords)]
    assert [(e["row"], e["col"]) for e in entries] == trap_coords
    assert [e["value"] for e in entries] == list(PLANTED)
    assert planted["source_dtype"] == "BF16"


def test_user_kind_rules_from_the_config_come_first(tmp_path):
    _save("mixtral", tmp_path / "m")
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "m")))
    (tmp_path / "audit.yaml").write_text(
        "kinds:\n"
        "  - {pattern: 'experts\\.(?P<e>\\d+)\\.w2\\.weight$', kind: my_down, expert: e}\n"
        "  - {pattern: 'self_attn\\.o_proj', kind: my_out}\n"
    )
    plan = checkpoint.plan(8, load_config(tmp_path / "audit.yaml").kind_rules())
    counts = plan.counts_by_kind()
    assert counts["my_down"] == 8 and counts["my_out"] == 2 and "expert_down" not in counts
    mine = [u for u in plan.units if u.kind == "my_down"]
    assert sorted({u.expert for u in mine}) == [0, 1, 2, 3]
    (tmp_path / "bad.yaml").write_text("kinds:\n  - {pattern: '(', kind: x}\n")
    with pytest.raises(AuditError, match=r"bad\.yaml: kinds\[0\]: bad regex"):
        load_config(tmp_path / "bad.yaml")


def test_qwen3_vl_moe_stacks_resaved_by_transformers_are_out_in(tmp_path):
    """transformers 5 holds Qwen3-VL-MoE's experts [E, out, in] and saves them so; the hub's
    checkpoints are [E, in, out] under the same names (tests/test_plan.py). An entry
    planted at a module's (out, in) is reported at that (row, col), not transposed."""
    text = SMALL | {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
    text |= {"head_dim": 8, "rope_scaling": {"rope_type": "default", "mrope_section": [1, 1, 2]}}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 48, "num_heads": 4}
    vision |= {"out_hidden_size": 32, "patch_size": 8, "deepstack_visual_indexes": [0]}
    config = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    experts = model.model.language_model.layers[1].mlp.experts
    assert tuple(experts.down_proj.shape) == (4, 32, 16)  # [E, out = hidden, in]
    with torch.no_grad():
        experts.down_proj[2, 29, 9] = 1.0
        experts.down_proj[2, 3, 14] = -0.75
    model.save_pretrained(tmp_path / "m")
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "m")))
    plan = checkpoint.plan(8)
    name = "model.language_model.layers.1.mlp.experts.down_proj"
    unit = next(u for u in plan.units if u.id == f"{name}[2]")
    assert (unit.shape, unit.transpose) == ((32, 16), False)
    [row] = analyze_units(checkpoint, [unit], AnalysisSettings(seed=6))
    entries = row["trap_entries"][:2]
    assert [(e["row"], e["col"], e["value"]) for e in entries] == [(29, 9, 1.0), (3, 14, -0.75)]


ENCODERS = {  # family -> (config class, config, auto class, kinds planned)
    "bert": (
        "BertConfig",
        SMALL | {"num_attention_heads": 2},
        "AutoModel",
        ATTN
        | {"up_proj": 2, "down_proj": 2, "embedding": 1, "position_embedding": 1}
        | {"linear": 1},  # the pooler
    ),
    "deberta_v2": (
        "DebertaV2Config",
        SMALL | {"num_attention_heads": 2},
        "AutoModel",
        ATTN | {"up_proj": 2, "down_proj": 2, "embedding": 1, "position_embedding": 1},
    ),
    "distilbert": (
        "DistilBertConfig",
        {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 48},
        "AutoModel",
        ATTN | {"up_proj": 2, "down_proj": 2, "embedding": 1, "position_embedding": 1},
    ),
    "t5": (  # encoder self, decoder self and cross attention; gated MLP wi_0 / wi_1 / wo
        "T5Config",
        {"vocab_size": 64, "d_model": 32, "d_kv": 16, "d_ff": 48, "num_layers": 2}
        | {"num_heads": 2, "feed_forward_proj": "gated-gelu"},
        "AutoModelForSeq2SeqLM",
        {"q_proj": 6, "k_proj": 6, "v_proj": 6, "o_proj": 6}
        | {"gate_proj": 4, "up_proj": 4, "down_proj": 4, "embedding": 1},
    ),
    "bart": (
        "BartConfig",
        {"vocab_size": 64, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1}
        | {"encoder_attention_heads": 2, "decoder_attention_heads": 2}
        | {"encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "max_position_embeddings": 64},
        "AutoModelForSeq2SeqLM",
        {"q_proj": 3, "k_proj": 3, "v_proj": 3, "o_proj": 3, "up_proj": 2, "down_proj": 2}
        | {"embedding": 1, "position_embedding": 2},
    ),
    "gptj": (
        "GPTJConfig",
        {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 2, "rotary_dim": 8},
        "AutoModelForCausalLM",
        ATTN | {"up_proj": 2, "down_proj": 2} | HEADS,
    ),
    "openai-gpt": (  # Conv1D, like GPT-2
        "OpenAIGPTConfig",
        {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32},
        "AutoModelForCausalLM",
        ATTN | {"up_proj": 2, "down_proj": 2, "embedding": 1, "position_embedding": 1},
    ),
    "gpt2-cross": (  # a decoder with cross-attention: c_attn is k|v there, q is q_attn
        "GPT2Config",
        {"vocab_size": 64, "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32}
        | {"add_cross_attention": True},
        "AutoModelForCausalLM",
        {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 4, "up_proj": 2, "down_proj": 2}
        | {"embedding": 1, "position_embedding": 1},
    ),
    "whisper": (  # Conv1d front end [out, in, 3]: one matrix per kernel position
        "WhisperConfig",
        {"vocab_size": 64, "d_model": 32, "encoder_layers": 1, "decoder_layers": 1}
        | {"encoder_attention_heads": 2, "decoder_attention_heads": 2, "num_mel_bins": 16}
        | {"encoder_ffn_dim": 48, "decoder_ffn_dim": 48, "max_source_positions": 16}
        | {"max_target_positions": 16, "pad_token_id": 0, "decoder_start_token_id": 1},
        "AutoModelForSpeechSeq2Seq",
        {"q_proj": 3, "k_proj": 3, "v_proj": 3, "o_proj": 3, "up_proj": 2, "down_proj": 2}
        | {"embedding": 1, "position_embedding": 2, "conv": 6},
    ),
    "rwkv": (  # channel mix key/value is an MLP; receptance gates and the head stay linear
        "RwkvConfig",
        {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2}
        | {"attention_hidden_size": 32, "intermediate_size": 48, "context_length": 32},
        "AutoModelForCausalLM",
        {"k_proj": 2, "v_proj": 2, "o_proj": 2, "up_proj": 2, "down_proj": 2}
        | {"embedding": 1, "linear": 5},
    ),
}


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_encoder_and_other_families_get_their_kinds(family, tmp_path):
    """Encoders, encoder-decoders and older decoders (real names from save_pretrained):
    attention and MLP matrices get their kinds, Conv1D is transposed, nothing is split
    wrongly. Each matrix is planned once, with the layer its name gives."""
    config_class, values, auto, kinds = ENCODERS[family]
    config = getattr(transformers, config_class)(**values)
    torch.manual_seed(0)
    getattr(transformers, auto).from_config(config).save_pretrained(tmp_path / family)
    plan = open_checkpoint(resolve_model(str(tmp_path / family))).plan(8)
    assert plan.counts_by_kind() == kinds
    with torch.device("meta"):
        skeleton = getattr(transformers, auto).from_config(config)
    modules = dict(skeleton.named_modules())
    for unit in plan.units:
        module = modules[unit.tensor.removesuffix(".weight")]
        conv1d = isinstance(module, transformers.pytorch_utils.Conv1D)
        assert unit.transpose == conv1d, unit.id
        if isinstance(module, torch.nn.Embedding):
            assert unit.kind in ("embedding", "position_embedding"), unit.id
        if unit.kind not in ("embedding", "position_embedding", "linear"):
            assert unit.layer == _expected_index(
                r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.", unit.tensor
            )


def test_an_encoder_decoder_pair_follows_each_models_config(tmp_path):
    """VisionEncoderDecoder (ViT + GPT-2, the layout of nlpconnect/vit-gpt2-image-captioning):
    under the pair's own model_type the GPT-2 decoder's Conv1D is still [in, out] and its
    c_attn still q|k|v; its cross-attention c_attn is k|v (q is q_attn). Each part reads
    exactly its rows of the stored weight's transpose."""
    encoder = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=48,
        image_size=16,
        patch_size=8,
    )
    decoder = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)
    pair = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    torch.manual_seed(0)
    transformers.VisionEncoderDecoderModel(config=pair).save_pretrained(tmp_path / "m")
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "m")))
    units = {u.id: u for u in checkpoint.plan(8).units}
    stored = load_file(tmp_path / "m" / "model.safetensors")
    block = "decoder.transformer.h.0."
    for tensor, parts in (
        (block + "attn.c_attn.weight", "qkv"),
        (block + "crossattention.c_attn.weight", "kv"),
    ):
        audited = stored[tensor].float().T.numpy()  # (out, in)
        for k, part in enumerate(parts):
            unit = units[f"{tensor}:{part}"]
            assert (unit.kind, unit.transpose, unit.shape) == (f"{part}_proj", True, (32, 32))
            assert np.array_equal(checkpoint.read_matrix(unit), audited[32 * k : 32 * (k + 1)])
    assert units[block + "crossattention.q_attn.weight"].kind == "q_proj"
    assert units[block + "crossattention.q_attn.weight"].transpose
    assert units[block + "mlp.c_fc.weight"].shape == (128, 32)  # (out, in): transposed
    query = units["encoder.encoder.layer.0.attention.attention.query.weight"]
    assert (query.kind, query.transpose) == ("q_proj", False)  # ViT's nn.Linear
