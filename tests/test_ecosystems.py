"""Checkpoints from outside transformers' language models, laid out as their libraries
save them: diffusers (its own index name, fp16 variants, pipeline folders),
sentence-transformers (modules in subfolders), PEFT adapters, MLX and TF/Flax kernels,
BatchNorm counters, torch.nn.MultiheadAttention (OpenCLIP), weight norm. Each must be
audited, or listed with why it is not: never dropped.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from llm_audit import analyze_matrix
from llm_audit.errors import CheckpointError
from llm_audit.run.ablate import stored_index
from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.header import read_header
from llm_audit.source.plan import build_plan
from llm_audit.source.reference import resolve_model
from llm_audit.source.roles import layer_of, parse_kind_rules, role_of

RNG = np.random.default_rng(0)


def _gauss(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _skipped(folder) -> dict[str, str]:
    plan = open_checkpoint(resolve_model(str(folder))).plan(8)
    return {s.name: s.reason for s in plan.skipped}


def _diffusers_shards(folder, variant: str = "") -> None:
    """Two shards and their index, named as diffusers' save_pretrained names them."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"diffusion_pytorch_model{'.' + variant if variant else ''}"
    shards = {f"{stem}-0000{i}-of-00002.safetensors": f"block{i}.to_q.weight" for i in (1, 2)}
    for shard, tensor in shards.items():
        save_file({tensor: _gauss(16, 16)}, folder / shard)
    index = f"diffusion_pytorch_model.safetensors.index{'.' + variant if variant else ''}.json"
    weight_map = {tensor: shard for shard, tensor in shards.items()}
    (folder / index).write_text(json.dumps({"weight_map": weight_map}))


def test_diffusers_index_is_read_and_a_missing_shard_refused(tmp_path):
    _diffusers_shards(tmp_path / "unet")
    model = resolve_model(str(tmp_path / "unet"))
    assert [p.name for p in model.files] == [
        "diffusion_pytorch_model-00001-of-00002.safetensors",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ]
    assert model.weight_map is not None and model.not_read == ()
    (tmp_path / "unet" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard named in diffusion_pytorch_model\.saf"):
        resolve_model(str(tmp_path / "unet"))


def test_a_variant_beside_the_plain_files_is_listed_and_read_when_asked(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    save_file({"conv_in.weight": _gauss(16, 16)}, unet / "diffusion_pytorch_model.safetensors")
    save_file({"conv_in.weight": _gauss(16, 16)}, unet / "diffusion_pytorch_model.fp16.safetensors")
    model = resolve_model(str(unet))  # was refused: the same tensor in two files
    assert [p.name for p in model.files] == ["diffusion_pytorch_model.safetensors"]
    assert "variant 'fp16'" in _skipped(unet)["diffusion_pytorch_model.fp16.safetensors"]
    alone = resolve_model(str(unet / "diffusion_pytorch_model.fp16.safetensors"))
    assert [p.name for p in alone.files] == ["diffusion_pytorch_model.fp16.safetensors"]
    # a sharded variant beside the plain model: its index, passed as the model, reads it
    _diffusers_shards(unet, "fp16")
    (unet / "diffusion_pytorch_model.fp16.safetensors").unlink()
    index = unet / "diffusion_pytorch_model.safetensors.index.fp16.json"
    assert all(".fp16-" in p.name for p in resolve_model(str(index)).files)
    assert resolve_model(str(unet)).files == (unet / "diffusion_pytorch_model.safetensors",)
    # only variants, and more than one: which to read is the user's choice
    two = tmp_path / "two"
    two.mkdir()
    for variant in ("fp16", "bf16"):
        save_file({"w": _gauss(16, 16)}, two / f"model.{variant}.safetensors")
    with pytest.raises(CheckpointError, match="holds the variants bf16, fp16 and no plain"):
        resolve_model(str(two))


def test_files_are_chosen_in_transformers_order(tmp_path):
    """transformers reads model.safetensors before an index; a Mistral release holds its
    consolidated copy beside the HF shards (with or without their indexes): one model,
    read once, the rest listed."""
    w = {"model.layers.0.self_attn.q_proj.weight": _gauss(16, 16)}
    stale = tmp_path / "stale"  # a re-save over a sharded folder left its old shards
    stale.mkdir()
    save_file(w, stale / "model.safetensors")
    for i in (1, 2):
        save_file(
            w if i == 1 else {"x": _gauss(16, 16)}, stale / f"model-0000{i}-of-00002.safetensors"
        )
    (stale / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {next(iter(w)): "model-00001-of-00002.safetensors"}})
    )
    assert resolve_model(str(stale)).files == (stale / "model.safetensors",)
    assert (
        "transformers reads model.safetensors alone"
        in _skipped(stale)["model-00002-of-00002.safetensors"]
    )
    (stale / "model.safetensors.index.json").unlink()  # was: 'also in', refused
    assert resolve_model(str(stale)).files == (stale / "model.safetensors",)
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    save_file(w, mistral / "model-00001-of-00001.safetensors")
    save_file(
        {"layers.0.attention.wq.weight": _gauss(16, 16)}, mistral / "consolidated.safetensors"
    )
    assert [p.name for p in resolve_model(str(mistral)).files] == [
        "model-00001-of-00001.safetensors"
    ]
    assert "consolidated copy" in _skipped(mistral)["consolidated.safetensors"]
    for stem in ("model", "consolidated"):
        shard = (
            "consolidated.safetensors"
            if stem == "consolidated"
            else "model-00001-of-00001.safetensors"
        )
        weight_map = {"w": shard}
        (mistral / f"{stem}.safetensors.index.json").write_text(
            json.dumps({"weight_map": weight_map})
        )
    model = resolve_model(str(mistral))  # was: refused, 'holds several indexes'
    assert model.weight_map == {"w": "model-00001-of-00001.safetensors"}


def test_a_variant_only_model_beside_an_adapter_is_the_model(tmp_path):
    save_file(
        {"model.layers.0.mlp.up_proj.weight": _gauss(64, 16)}, tmp_path / "model.fp16.safetensors"
    )
    save_file({"x.lora_A.weight": _gauss(8, 64)}, tmp_path / "adapter_model.safetensors")
    assert resolve_model(str(tmp_path)).files == (tmp_path / "model.fp16.safetensors",)


def test_models_in_subfolders_are_listed_and_a_pipeline_is_named(tmp_path):
    # sentence-transformers: the transformer in the root, a Dense module in 2_Dense/
    st = tmp_path / "st"
    (st / "2_Dense").mkdir(parents=True)
    save_file(
        {"encoder.layer.0.attention.self.query.weight": _gauss(16, 16)}, st / "model.safetensors"
    )
    save_file({"linear.weight": _gauss(16, 32)}, st / "2_Dense" / "model.safetensors")
    (st / "modules.json").write_text(json.dumps([{"idx": 2, "path": "2_Dense"}]))
    reason = _skipped(st)["2_Dense/model.safetensors"]
    assert reason == (
        "in the subfolder 2_Dense/ (modules.json: a sentence-transformers model): "
        "audit that folder on its own"
    )
    # a diffusers pipeline: components only
    pipe = tmp_path / "pipe"
    for component in ("unet", "vae"):
        (pipe / component).mkdir(parents=True)
        save_file({"w": _gauss(16, 16)}, pipe / component / "diffusion_pytorch_model.safetensors")
    (pipe / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet"]}))
    with pytest.raises(CheckpointError, match=r"subfolders unet/, vae/ hold models \(model_index"):
        resolve_model(str(pipe))


def test_peft_adapters(tmp_path):
    """An adapter's rank-r factors are not layers: skipped with the reason, whether the
    adapter is audited alone or sits beside its model (which is then read alone)."""
    adapter = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _gauss(16, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": _gauss(64, 16),
        "base_model.model.model.embed_tokens.lora_embedding_A": _gauss(16, 100),
        "base_model.model.model.embed_tokens.base_layer.weight": _gauss(100, 64),
    }
    (tmp_path / "lora").mkdir()
    save_file(adapter, tmp_path / "lora" / "adapter_model.safetensors")
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "lora")))
    plan = checkpoint.plan(8)
    assert [(u.tensor, u.kind) for u in plan.units] == [
        ("base_model.model.model.embed_tokens.base_layer.weight", "embedding")
    ]
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (
        "LoRA factor (rank 16) of an adapter: audit the model merged with it"
    )
    assert len(reasons) == 3
    kohya = {"lora_unet_down_blocks_0.lora_down.weight": _gauss(16, 320)}  # kohya, diffusers
    assert build_plan(_metas(kohya), min_evals=8).skipped[0].reason.startswith("LoRA factor (rank")
    save_file(
        {"model.layers.0.mlp.up_proj.weight": _gauss(64, 16)},
        tmp_path / "lora" / "model.safetensors",
    )
    assert resolve_model(str(tmp_path / "lora")).files == (tmp_path / "lora" / "model.safetensors",)
    assert (
        "PEFT adapter beside the model" in _skipped(tmp_path / "lora")["adapter_model.safetensors"]
    )


def test_null_metadata_as_mlx_writes_it(tmp_path):
    """mx.save_safetensors without metadata writes "__metadata__": null; safetensors reads it."""
    header = json.dumps(
        {"__metadata__": None, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    )
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(16))
    assert read_header(path).metadata == {}


def _metas(tensors: dict[str, np.ndarray]) -> dict[str, object]:
    return {
        name: type("M", (), {"dtype": "F32", "shape": t.shape})() for name, t in tensors.items()
    }


def _planted(matrix: np.ndarray, row: int, col: int, value: float = 50.0) -> np.ndarray:
    matrix[row, col] = value
    return matrix


@pytest.mark.parametrize(
    ("fmt", "axes"),
    [("pt", "oihw"), ("mlx", "ohwi"), ("tf", "hwio"), ("flax", "hwio")],
)
def test_conv_kernels_in_each_libraries_layout(tmp_path, fmt, axes):
    """A kernel with a trap planted at out 10, in 20, position (1, 2), stored as each
    library stores kernels (the header's `format` says which): the unit at (1, 2) reads
    the (out, in) matrix, its trap is found there, and the ablation maps it back."""
    per_position = _gauss(3, 3, 64, 32)  # [kh, kw, out, in]
    per_position[1, 2] = _planted(per_position[1, 2], 10, 20)
    order = {"o": 2, "i": 3, "h": 0, "w": 1}
    kernel = np.ascontiguousarray(per_position.transpose([order[a] for a in axes]))
    (tmp_path / fmt).mkdir()
    save_file(
        {"conv2.weight": kernel}, tmp_path / fmt / "model.safetensors", metadata={"format": fmt}
    )
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / fmt)))
    units = {u.id: u for u in checkpoint.plan(8).units}
    assert len(units) == 9 and all(u.shape == (64, 32) for u in units.values())
    unit = units["conv2.weight[1,2]"]
    assert np.array_equal(checkpoint.read_matrix(unit), per_position[1, 2])
    row = analyze_matrix(checkpoint.read_matrix(unit), seed=0, matrix_id=unit.id)
    assert row["rand_num_spikes"] >= 1
    assert row["trap_entries"][0] | {"value": 50.0} == {"row": 10, "col": 20, "value": 50.0}
    assert kernel[stored_index(unit, kernel.shape, 10, 20)] == 50.0


def test_tf_dense_kernels_are_audited_as_out_by_in(tmp_path):
    weights = {"dense.kernel": _planted(_gauss(32, 64), 20, 10)}  # [in, out]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "tf"})
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "model.safetensors")))
    (unit,) = checkpoint.plan(8).units
    assert unit.shape == (64, 32) and unit.transpose
    assert checkpoint.read_matrix(unit)[10, 20] == 50.0


def test_conv3d_and_mlx_conv1d_kernels(tmp_path):
    conv3d = _gauss(16, 8, 2, 3, 2)  # [out, in, kd, kh, kw]
    conv1d = _gauss(16, 4, 8)  # MLX [out, k, in]
    save_file({"conv3d.weight": conv3d}, tmp_path / "video.safetensors")
    save_file({"conv1d.weight": conv1d}, tmp_path / "mlx.safetensors", metadata={"format": "mlx"})
    video = open_checkpoint(resolve_model(str(tmp_path / "video.safetensors")))
    units = video.plan(8).units
    assert len(units) == 12 and units[-1].id == "conv3d.weight[1,2,1]"
    assert np.array_equal(video.read_matrix(units[-1]), conv3d[:, :, 1, 2, 1])
    mlx = open_checkpoint(resolve_model(str(tmp_path / "mlx.safetensors")))
    units = mlx.plan(8).units
    assert [u.id for u in units] == [f"conv1d.weight[{k}]" for k in range(4)]
    assert np.array_equal(mlx.read_matrix(units[3]), conv1d[:, 3, :])


def test_mlx_switch_mlp_expert_stacks(tmp_path):
    """mlx-lm's SwitchGLU stores each expert [out, in]; the kinds follow the part."""
    hidden, ffn = 32, 48
    stacks = {
        "model.layers.0.mlp.switch_mlp.gate_proj.weight": _gauss(4, ffn, hidden),
        "model.layers.0.mlp.switch_mlp.up_proj.weight": _gauss(4, ffn, hidden),
        "model.layers.0.mlp.switch_mlp.down_proj.weight": _gauss(4, hidden, ffn),
    }
    save_file(stacks, tmp_path / "model.safetensors", metadata={"format": "mlx"})
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    checkpoint = open_checkpoint(resolve_model(str(tmp_path)))
    units = checkpoint.plan(8).units
    kinds = {(u.kind, u.shape) for u in units}
    assert kinds == {
        ("expert_gate", (ffn, hidden)),
        ("expert_up", (ffn, hidden)),
        ("expert_down", (hidden, ffn)),
    }
    down = next(u for u in units if u.kind == "expert_down" and u.expert == 3)
    assert np.array_equal(checkpoint.read_matrix(down), stacks[down.tensor][3])


def test_user_kind_rules_reach_stacks_and_kernels():
    tensors = {
        "model.layers.0.mlp.experts.down_proj": type(
            "M", (), {"dtype": "F32", "shape": (2, 16, 16)}
        )(),
        "encoder.conv.weight": type("M", (), {"dtype": "F32", "shape": (16, 16, 1, 1)})(),
    }
    rules = parse_kind_rules(
        [
            {"pattern": r"experts\.down_proj", "kind": "my_down"},
            {"pattern": "conv", "kind": "my_conv"},
        ],
        "rules.yaml",
    )
    plan = build_plan(tensors, min_evals=8, kind_rules=rules)
    assert plan.counts_by_kind() == {"my_conv": 1, "my_down": 2}


def test_batchnorm_counters_are_not_unaudited_weights():
    tensors = {"bn1.num_batches_tracked": type("M", (), {"dtype": "I64", "shape": ()})()}
    (skip,) = build_plan(tensors, min_evals=8).skipped
    assert not skip.weight


def test_timm_tokens_and_position_tables_are_not_unaudited_weights():
    """timm ViTs' cls_token [1, 1, D] and pos_embed [1, N, D], SigLIP's head.probe: named
    for what they are, not counted as weights of an unknown layout."""
    meta = type("M", (), {"dtype": "F32"})
    shapes = {"cls_token": (1, 1, 64), "pos_embed": (1, 17, 64), "head.probe": (1, 1, 64)}
    plan = build_plan(
        {n: type("T", (meta,), {"shape": s})() for n, s in shapes.items()}, min_evals=8
    )
    reasons = {s.name: (s.reason, s.weight) for s in plan.skipped}
    assert reasons["pos_embed"][0].startswith("a parameter table (position table")
    assert reasons["cls_token"][0] == "vector of shape [1, 1, 64], not a layer's weight"
    assert not any(weight for _, weight in reasons.values())


def test_multihead_attention_in_proj_is_split_into_q_k_v(tmp_path):
    """torch.nn.MultiheadAttention keeps q|k|v in one [3E, E] `in_proj_weight` (OpenCLIP's
    `transformer.resblocks.N.attn`, SigLIP's pooling head), and apart as `q/k/v_proj_weight`
    where the key and value widths differ: each part its kind, the block its layer."""
    torch.manual_seed(0)
    attentions = (
        torch.nn.MultiheadAttention(32, 2),
        torch.nn.MultiheadAttention(32, 2, 0, kdim=16, vdim=24),
    )
    blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"attn": a}) for a in attentions)
    model = torch.nn.ModuleDict({"resblocks": blocks})
    state = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    (tmp_path / "m").mkdir()
    save_torch(state, tmp_path / "m" / "model.safetensors")
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "m")))
    units = {u.id: u for u in checkpoint.plan(8).units}
    fused = "transformer.resblocks.0.attn.in_proj_weight"
    for k, part in enumerate("qkv"):
        unit = units[f"{fused}:{part}"]
        assert (unit.kind, unit.layer, unit.shape) == (f"{part}_proj", 0, (32, 32))
        rows = state[fused][32 * k : 32 * (k + 1)].numpy()
        assert np.array_equal(checkpoint.read_matrix(unit), rows)
    apart = "transformer.resblocks.1.attn."
    widths = {"q": 32, "k": 16, "v": 24}
    for part, width in widths.items():
        unit = units[f"{apart}{part}_proj_weight"]
        assert (unit.kind, unit.layer, unit.shape) == (f"{part}_proj", 1, (32, width))
    assert units[apart + "out_proj.weight"].kind == "o_proj"


def test_clip_projections_used_as_x_at_p_are_read_as_their_transpose(tmp_path):
    """OpenAI CLIP and OpenCLIP keep `visual.proj` [width, embed] and `text_projection`
    [width, embed] as bare parameters used as `x @ P`: the audited (out, in) matrix is the
    transpose, so trap coordinates name the stored entry; transformers' CLIP's
    `text_projection.weight` is an nn.Linear, [out, in], and is read as stored."""
    stored = {"visual.proj": _gauss(48, 16), "text_projection": _gauss(32, 16)}
    stored["model.text_projection.weight"] = _gauss(16, 32)
    save_file(stored, tmp_path / "model.safetensors")
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "model.safetensors")))
    units = {u.id: u for u in checkpoint.plan(8).units}
    for name, weight in stored.items():
        bare = not name.endswith(".weight")
        want = weight.T if bare else weight
        unit = units[name]
        assert (unit.transpose, unit.shape) == (bare, want.shape), name
        assert np.array_equal(checkpoint.read_matrix(unit), want)
        r, c = 3, 5
        assert weight[stored_index(unit, weight.shape, r, c)] == want[r, c]


def _weight_normed(parametrized: bool, dtype: torch.dtype) -> torch.nn.ModuleDict:
    """Layers weight-normed as torch does it: dim 0 (the default), wav2vec2's dim 2, and
    the whole-tensor norm (dim=None)."""
    norm = (
        torch.nn.utils.parametrizations.weight_norm if parametrized else torch.nn.utils.weight_norm
    )
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "conv": norm(torch.nn.Conv1d(16, 32, 3), dim=0),
            "pos_conv": norm(torch.nn.Conv1d(32, 32, 5, groups=2), dim=2),
            "linear": norm(torch.nn.Linear(16, 32)),
            "whole": norm(torch.nn.Linear(24, 16), dim=None),
        }
    )
    with torch.no_grad():  # g apart from |v|, channel by channel: W is not v's direction
        for name, p in model.named_parameters():
            if name.endswith(("weight_g", "original0")):
                p.mul_(torch.linspace(0.5, 3, p.numel()).reshape(p.shape))
    return model.to(dtype)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("parametrized", [True, False], ids=["parametrize", "legacy"])
def test_weight_normed_layers_are_audited_as_torch_computes_them(parametrized, dtype, tmp_path):
    """torch's weight norm stores W = g * v / |v| as g and v (wav2vec2's position conv,
    audio codecs, vocoders). The audited matrix is W, the weight the module computes, named
    as the model names it; v alone (other norms, another spectrum) is never audited."""
    model = _weight_normed(parametrized, dtype)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    assert len(state) == 12  # g, v and bias of each layer
    (tmp_path / "m").mkdir()
    save_torch(state, tmp_path / "m" / "model.safetensors")
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "m")))
    plan = checkpoint.plan(8)
    ids = [u.id for u in plan.units]
    assert len(ids) == 3 + 5 + 1 + 1
    assert {u.id.split("[")[0] for u in plan.units} == {
        f"{layer}.weight" for layer in ("conv", "pos_conv", "linear", "whole")
    }
    assert not [s for s in plan.skipped if s.weight], plan.skipped
    magnitudes = [s for s in plan.skipped if "magnitude g" in s.reason]
    assert len(magnitudes) == 4
    for module in model.values():  # torch folds W = g * v / |v| into the weight
        if parametrized:
            torch.nn.utils.parametrize.remove_parametrizations(module, "weight")
        else:
            torch.nn.utils.remove_weight_norm(module)
    for unit in plan.units:
        layer = unit.id.split(".")[0]
        weight = getattr(model, layer).weight.detach().double().numpy()
        want = weight[:, :, unit.position[0]] if unit.position else weight
        got = checkpoint.read_matrix(unit)
        assert got.dtype == (np.float64 if dtype == torch.float64 else np.float32)
        assert got.shape == unit.shape == want.shape
        # torch computes W in the stored dtype, the reader in float64: a rounding apart
        tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * np.abs(want).max())
        v = state[unit.tensor].double().numpy()
        v_slice = v[:, :, unit.position[0]] if unit.position else v
        assert not np.allclose(got, v_slice, rtol=0.1), "W, not v"


def test_wav2vec2_position_conv_is_audited_from_its_weight_norm(tmp_path):
    """transformers' own save_pretrained of wav2vec2: its position conv is weight-normed
    over the kernel axis (dim=2, g [1, 1, k]); every kernel position's matrix is the slice
    of the weight the model computes."""
    import transformers

    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(8, 8),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    torch.manual_seed(0)
    model = transformers.Wav2Vec2Model(config)
    model.save_pretrained(tmp_path / "w2v")
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "w2v")))
    units = [u for u in checkpoint.plan(8).units if "pos_conv_embed" in u.id]
    assert [u.position for u in units] == [(k,) for k in range(16)]
    weight = model.encoder.pos_conv_embed.conv.weight.detach().numpy()
    for unit in units:
        assert unit.id == f"encoder.pos_conv_embed.conv.weight[{unit.position[0]}]"
        assert unit.kind == "conv" and unit.norm_tensor.endswith("original0")
        np.testing.assert_allclose(
            checkpoint.read_matrix(unit), weight[:, :, unit.position[0]], rtol=1e-5, atol=1e-7
        )


def test_weight_norm_pairs_that_are_not_torchs_are_listed(tmp_path):
    """A g that is not torch's keep-dims norm of v, or a direction with a zero channel
    (W = g * 0 / 0), is never audited as if it were the layer."""
    v = _gauss(16, 24)
    save_file(
        {
            "bad.weight_g": np.ones((16, 24, 1), np.float32),  # more axes than v
            "bad.weight_v": v,
            "zero.weight_g": np.ones((16, 1), np.float32),
            "zero.weight_v": np.concatenate([v[:15], np.zeros((1, 24), np.float32)]),
        },
        tmp_path / "model.safetensors",
    )
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "model.safetensors")))
    plan = checkpoint.plan(8)
    skipped = {s.name: s for s in plan.skipped}
    assert "is not torch's keep-dims norm of v [16, 24]" in skipped["bad.weight_v"].reason
    assert skipped["bad.weight_v"].weight and not skipped["bad.weight_g"].weight
    (unit,) = plan.units
    assert unit.id == "zero.weight"
    with pytest.raises(CheckpointError, match=r"zero.weight_v.*v is all zero at \[15, 0\]"):
        checkpoint.read_matrix(unit)


@pytest.mark.parametrize(
    ("name", "kind", "layer"),
    [
        ("transformer_blocks.3.attn.to_q.weight", "q_proj", 3),  # DiT, SD3, Flux double
        ("transformer_blocks.3.attn.add_k_proj.weight", "k_proj", 3),
        ("transformer_blocks.3.attn.to_out.0.weight", "o_proj", 3),
        ("transformer_blocks.3.attn.to_add_out.weight", "o_proj", 3),
        ("transformer_blocks.3.ff.net.0.proj.weight", "up_proj", 3),
        ("transformer_blocks.3.ff_context.net.2.weight", "down_proj", 3),
        ("single_transformer_blocks.7.attn.to_v.weight", "v_proj", None),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight", "k_proj", None),
        ("blocks.5.attn.proj.weight", "o_proj", 5),  # timm ViT
        ("stages.1.blocks.2.mlp.fc1.weight", "up_proj", None),  # ConvNeXt: no single depth
        ("model.layers.4.mlp.experts.7.w2.weight", "expert_down", 4),
        ("transformer.h.11.attn.c_proj.weight", "o_proj", 11),
        ("visual.transformer.resblocks.2.mlp.c_fc.weight", "up_proj", 2),  # OpenCLIP
        ("visual.positional_embedding", "position_embedding", None),
    ],
)
def test_kinds_and_layers_of_diffusers_and_vision_names(name, kind, layer):
    assert (role_of(name).kind, layer_of(name)) == (kind, layer)


def test_audio_and_vision_tables_and_buffers_are_not_unaudited_weights(tmp_path):
    """Names from transformers' audio and vision models: a codebook's running statistics
    (EnCodec's embed_avg, Mimi's embed_sum), Conformer's per-head position biases, YOLOS's
    and SAM's position tables (4-D parameters, no module's weight) and Bark's causal mask
    (BOOL) are listed as not weights; the codebook itself is an embedding, a 4-D module
    weight a conv kernel."""
    tensors = {
        "quantizer.layers.0.codebook.embed": _gauss(64, 32),
        "quantizer.layers.0.codebook.embed_avg": _gauss(64, 32),
        "quantizer.semantic_rvq.layers.0.codebook.embed_sum": _gauss(64, 32),
        "conformer_layers.0.self_attn.pos_bias_u": _gauss(16, 16),
        "vit.encoder.mid_position_embeddings": _gauss(1, 1, 27, 32),
        "vision_encoder.pos_embed": _gauss(1, 8, 8, 32),
        "vision_encoder.neck.conv1.weight": _gauss(32, 16, 1, 1),
        "semantic.layers.0.attn.bias": np.ones((1, 1, 16, 16), bool),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    plan = open_checkpoint(resolve_model(str(tmp_path / "model.safetensors"))).plan(8)
    units = {u.id: u.kind for u in plan.units}
    assert units == {
        "quantizer.layers.0.codebook.embed": "embedding",
        "vision_encoder.neck.conv1.weight[0,0]": "conv",
    }
    skipped = {s.name: s for s in plan.skipped}
    assert set(skipped) == set(tensors) - {"quantizer.layers.0.codebook.embed"} - {
        "vision_encoder.neck.conv1.weight"
    }
    assert not [s for s in skipped.values() if s.weight], skipped
    assert "running statistics" in skipped["quantizer.layers.0.codebook.embed_avg"].reason
    assert "no module's weight" in skipped["vision_encoder.pos_embed"].reason
