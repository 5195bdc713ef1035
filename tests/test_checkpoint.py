"""Opening checkpoints and reading one matrix: real gpt-oss layouts, synthetic ones, bad ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from llm_audit import analyze_matrix
from llm_audit.errors import CheckpointError
from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.dtypes import DTYPE_SIZES
from llm_audit.source.reference import resolve_model
from llm_audit.source.synth import SynthConfig, synth_gpt_oss

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")


def _headers_only(folder: Path, shards: dict[str, dict[str, dict]]) -> None:
    """Real names and shapes, no weights: a valid header, then a sparse hole to full size."""
    folder.mkdir(parents=True)
    weight_map = {}
    for shard, tensors in shards.items():
        header, offset = {}, 0
        for name, meta in tensors.items():
            size = int(np.prod(meta["shape"])) * DTYPE_SIZES[meta["dtype"]]
            header[name] = {
                "dtype": meta["dtype"],
                "shape": meta["shape"],
                "data_offsets": [offset, offset + size],
            }
            offset += size
            weight_map[name] = shard
        text = json.dumps(header).encode()
        with open(folder / shard, "wb") as handle:
            handle.write(len(text).to_bytes(8, "little") + text)
            handle.truncate(8 + len(text) + offset)  # sparse: takes no disk space
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@needs_shared
def test_plan_of_headers_only_gpt_oss_20b_with_its_real_sharding(tmp_path):
    tensors = json.loads((SHARED / "gpt-oss-20b" / "tensors.json").read_text())
    index = json.loads((SHARED / "gpt-oss-20b" / "model.safetensors.index.json").read_text())
    shards: dict[str, dict] = {}
    for name, shard in index["weight_map"].items():
        shards.setdefault(shard, {})[name] = tensors[name]
    _headers_only(tmp_path / "20b", shards)
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "20b")))
    assert len(checkpoint.model.files) == 3
    assert (
        checkpoint.bytes_on_disk() - sum(h.data_start for h in checkpoint.headers.values())
        == index["metadata"]["total_size"]
        == 13_761_264_768
    )
    plan = checkpoint.plan(8)
    assert len(plan.units) == 1658
    assert checkpoint.bytes_read == 0  # planning reads headers only


@needs_shared
def test_plan_of_headers_only_gpt_oss_120b(tmp_path):
    tensors = json.loads((SHARED / "gpt-oss-120b" / "tensors.json").read_text())
    names = list(tensors)
    shards = {
        f"model-{k:05d}-of-00014.safetensors": {n: tensors[n] for n in names[k::15]}
        for k in range(15)
    }  # the real shard assignment is not published
    _headers_only(tmp_path / "120b", shards)
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "120b")))
    assert len(checkpoint.plan(8).units) == 9398
    assert sum(t.nbytes for t in checkpoint.tensors.values()) == 65_248_815_744


@pytest.fixture(scope="module")
def synth_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "mini"
    cfg = SynthConfig(
        traps={
            "model.layers.1.mlp.experts.down_proj[2]": 3,
            "model.layers.0.self_attn.q_proj.weight": 2,
        }
    )
    return synth_gpt_oss(folder, cfg)


def test_synth_is_deterministic(tmp_path, synth_model):
    again = synth_gpt_oss(
        tmp_path / "again",
        SynthConfig(
            traps={
                "model.layers.1.mlp.experts.down_proj[2]": 3,
                "model.layers.0.self_attn.q_proj.weight": 2,
            }
        ),
    )
    for path in sorted(synth_model.iterdir()):
        assert path.read_bytes() == (again / path.name).read_bytes(), path.name


def test_reading_a_unit_reads_only_its_bytes(synth_model):
    checkpoint = open_checkpoint(resolve_model(str(synth_model)))
    plan = checkpoint.plan(8)
    assert plan.counts_by_kind() == {
        "q_proj": 2,
        "k_proj": 2,
        "v_proj": 2,
        "o_proj": 2,
        "router": 2,
        "expert_gate_up": 16,
        "expert_down": 16,
        "embedding": 1,
        "lm_head": 1,
    }
    expert = next(u for u in plan.units if u.id == "model.layers.1.mlp.experts.down_proj[2]")
    matrix = checkpoint.read_matrix(expert)
    assert matrix.shape == (256, 256) and matrix.dtype == np.float32
    assert checkpoint.bytes_read == expert.nbytes == 256 * 8 * 17
    for unit in plan.units:
        checkpoint.read_matrix(unit)
    assert checkpoint.bytes_read == plan.bytes_to_read() + expert.nbytes


def test_planted_traps_are_found_where_planted(synth_model):
    checkpoint = open_checkpoint(resolve_model(str(synth_model)))
    traps = {}
    for unit in checkpoint.plan(8).units:
        traps[unit.id] = analyze_matrix(checkpoint.read_matrix(unit), matrix_id=unit.id)[
            "rand_num_spikes"
        ]
    assert traps.pop("model.layers.1.mlp.experts.down_proj[2]") == 3
    assert traps.pop("model.layers.0.self_attn.q_proj.weight") == 2
    assert set(traps.values()) == {0}


def test_transformers_loads_synth_and_dequantizes_to_our_values(synth_model):
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(str(synth_model), dtype=torch.float32)
    state = model.state_dict()
    checkpoint = open_checkpoint(resolve_model(str(synth_model)))
    for unit in checkpoint.plan(8).units:
        ours = checkpoint.read_matrix(unit)
        if unit.expert is not None:  # transformers keeps experts as [E, in, out]
            theirs = state[unit.tensor.removesuffix("_blocks")][unit.expert].T
        else:
            theirs = state[unit.tensor]
        assert np.array_equal(ours, theirs.numpy()), unit.id


def test_dense_experts_layout(tmp_path):
    """transformers' own layout, [E, in, out]: each expert is read and transposed."""
    from safetensors import safe_open

    folder = synth_gpt_oss(tmp_path / "dense", SynthConfig(mxfp4=False, dtype="f32", layers=1))
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    units = [u for u in checkpoint.plan(8).units if u.kind == "expert_gate_up"]
    assert len(units) == 8 and units[3].layout == "expert" and units[3].transpose
    matrix = checkpoint.read_matrix(units[3])
    with safe_open(checkpoint.where[units[3].tensor], framework="numpy") as handle:
        stacked = handle.get_tensor(units[3].tensor)
    assert stacked.shape == (8, 256, 512)
    assert matrix.shape == (512, 256) and np.array_equal(matrix, stacked[3].T)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path, synth_model):
    folder = tmp_path / "broken"
    folder.mkdir()
    for path in synth_model.iterdir():
        os.symlink(path, folder / path.name)
    (folder / "model.safetensors.index.json").unlink()
    index = json.loads((synth_model / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00000-of-00001.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="named in the index but not in this shard"):
        open_checkpoint(resolve_model(str(folder)))


def test_nan_tensor_and_bad_scale_are_reported_not_crashes(tmp_path):
    folder = tmp_path / "nan"
    folder.mkdir()
    weights = torch.ones(64, 32)
    weights[5, 5] = float("nan")
    blocks = torch.zeros(2, 64, 1, 16, dtype=torch.uint8)
    scales = torch.full((2, 64, 1), 127, dtype=torch.uint8)
    scales[1, 3, 0] = 255
    save_file(
        {
            "model.layers.0.mlp.experts.down_proj_blocks": blocks,
            "model.layers.0.mlp.experts.down_proj_scales": scales,
            "model.layers.0.self_attn.q_proj.weight": weights,
        },
        folder / "model.safetensors",
    )
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    units = {u.id: u for u in checkpoint.plan(8).units}
    row = analyze_matrix(checkpoint.read_matrix(units["model.layers.0.self_attn.q_proj.weight"]))
    assert row["status"] == "error" and "1 NaN" in row["reason"]
    checkpoint.read_matrix(units["model.layers.0.mlp.experts.down_proj[0]"])
    with pytest.raises(CheckpointError, match=r"down_proj_blocks'.*scale byte 255"):
        checkpoint.read_matrix(units["model.layers.0.mlp.experts.down_proj[1]"])


def test_openai_original_layout_reads_q_k_v_rows(tmp_path):
    folder = tmp_path / "original"
    folder.mkdir()
    qkv = torch.arange(256 * 64, dtype=torch.float32).reshape(256, 64).to(torch.bfloat16)
    save_file({"block.0.attn.qkv.weight": qkv}, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32})
    )
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    units = {u.kind: u for u in checkpoint.plan(8).units}
    full = qkv.float().numpy()
    assert np.array_equal(checkpoint.read_matrix(units["q_proj"]), full[:128])
    assert np.array_equal(checkpoint.read_matrix(units["k_proj"]), full[128:192])
    assert np.array_equal(checkpoint.read_matrix(units["v_proj"]), full[192:])
    assert checkpoint.bytes_read == qkv.numel() * 2


def test_conv_kernel_is_read_once_for_all_its_positions(tmp_path):
    kernel = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 8, 3, 3))).float()
    (tmp_path / "conv").mkdir()
    save_file({"conv1.weight": kernel}, tmp_path / "conv" / "model.safetensors")
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "conv")))
    units = checkpoint.plan(8).units
    assert len(units) == 9
    for unit in units:
        i, j = unit.position
        assert np.array_equal(checkpoint.read_matrix(unit), kernel[:, :, i, j].numpy())
    assert checkpoint.bytes_read == kernel.numel() * 4


def test_tensors_the_index_leaves_out_are_still_audited(tmp_path):
    """transformers loads every tensor of an index's shards, listed or not: an index that
    omits a (trapped) tensor must not hide it from the audit. A .safetensors file the
    index does not name is not loaded by transformers, and is listed as not audited."""
    hidden = torch.randn(16, 16)
    save_file({"a.weight": torch.randn(16, 16), "hidden.weight": hidden},
              tmp_path / "model-1.safetensors")  # fmt: skip
    save_file({"stray.weight": torch.randn(16, 16)}, tmp_path / "extra.safetensors")
    index = {"weight_map": {"a.weight": "model-1.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    checkpoint = open_checkpoint(resolve_model(str(tmp_path)))
    plan = checkpoint.plan(8)
    assert [u.id for u in plan.units] == ["a.weight", "hidden.weight"]
    assert np.array_equal(checkpoint.read_matrix(plan.units[1]), hidden.numpy())
    skipped = {s.name: s.reason for s in plan.skipped}
    assert "index does not name" in skipped["extra.safetensors"]
