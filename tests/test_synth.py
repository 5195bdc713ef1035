"""The synthetic checkpoints are written without torch, yet exactly as torch would write them.

`llm_audit.source.synth` rounds float32 to bfloat16 itself and calls safetensors' own
serializer; torch (a test dependency) is the reference: its `.to(torch.bfloat16)` for the
rounding, its `safetensors.torch.save` for the files.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save

from llm_audit.errors import AuditError
from llm_audit.source.synth import (
    BUNDLED,
    SynthConfig,
    bf16_bits,
    synth_gpt_oss,
    synth_tensors,
)


def _torch_bits(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_bf16_rounding_is_torchs_on_every_boundary():
    # every bfloat16 pattern (upper half), each with the lower halves that decide rounding:
    # exact, just above, just below and exactly at the tie, above it, all ones
    high = np.arange(2**16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    values = (high[:, None] | low[None, :]).ravel().view(np.float32)
    ours, theirs = bf16_bits(values), _torch_bits(values)
    nan = np.isnan(values)
    assert np.array_equal(ours[~nan], theirs[~nan])
    assert np.all(ours[nan] == 0x7FC0)  # NaN stays NaN (torch's vector path may pick 0xFFFF)
    assert np.all((theirs[nan] & 0x7F80 == 0x7F80) & (theirs[nan] & 0x7F != 0))
    # the rules, written out: ties to even, overflow to infinity, signed zeros and infinities
    cases = {
        0x3F808000: 0x3F80,  # 1 + 2^-8: a tie, the even neighbour is 1.0
        0x3F818000: 0x3F82,  # 1 + 3 * 2^-8: a tie, the even neighbour is above
        0x3F808001: 0x3F81,  # just past the tie: up
        0x7F7FFFFF: 0x7F80,  # float32's largest finite value: +inf in bfloat16
        0xFF800000: 0xFF80,  # -inf
        0x80000000: 0x8000,  # -0
        0x00000001: 0x0000,  # the smallest subnormal rounds to zero
    }
    got = bf16_bits(np.array(list(cases), np.uint32).view(np.float32))
    assert got.tolist() == list(cases.values())


@pytest.mark.parametrize(
    "cfg",
    [
        BUNDLED,
        # dense experts, three shards, planted entries that are bfloat16 ties
        SynthConfig(
            mxfp4=False,
            layers=1,
            seed=5,
            shards=3,
            trap_scale=1 + 2**-8,
            traps={"model.layers.0.mlp.experts.down_proj[1]": 2, "lm_head.weight": 1},
        ),
        # planted entries that overflow to infinity in bfloat16
        SynthConfig(layers=1, experts=2, trap_scale=3.4e38, traps={"lm_head.weight": 2}),
        SynthConfig(mxfp4=False, dtype="f32", layers=1, experts=2, seed=3),
    ],
    ids=["bundled", "bf16-ties", "bf16-overflow", "f32"],
)
def test_each_file_is_what_torch_and_safetensors_torch_write(cfg, tmp_path):
    folder = synth_gpt_oss(tmp_path / "model", cfg)
    values = synth_tensors(cfg)
    dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert list(weight_map) == list(values)
    for file_name in sorted(set(weight_map.values())):
        part = {}
        for name in (n for n, f in weight_map.items() if f == file_name):
            tensor = torch.from_numpy(values[name])
            part[name] = tensor if tensor.dtype == torch.uint8 else tensor.to(dtype)
        expected = save(part, metadata={"format": "pt"})
        assert (folder / file_name).read_bytes() == expected, file_name


def test_the_bundled_model_keeps_its_planted_traps():
    # the traps are where PLANTED says, each of size 1 (50 std), and nowhere else
    values = synth_tensors(BUNDLED)
    o_proj = values["model.layers.1.self_attn.o_proj.weight"]
    assert np.count_nonzero(np.abs(o_proj) == 1.0) == 3
    clean = synth_tensors(replace(BUNDLED, traps={}))
    changed = {n for n in values if not np.array_equal(values[n], clean[n])}
    assert changed == {
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.experts.down_proj_blocks",
        "model.layers.1.mlp.experts.down_proj_scales",
        "model.layers.0.mlp.experts.gate_up_proj_blocks",
        "model.layers.0.mlp.experts.gate_up_proj_scales",
    }


@pytest.mark.parametrize("scale", [float("inf"), float("nan")])
def test_a_trap_scale_that_is_not_finite_is_refused(scale, tmp_path):
    with pytest.raises(AuditError, match="trap scale must be a finite number"):
        synth_gpt_oss(tmp_path, SynthConfig(trap_scale=scale))
