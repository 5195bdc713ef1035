"""The bundled demo model, audited by `llm-audit demo` / `make demo`.

Why: the main job must run on a fresh machine with no download, on a model whose truth is
known. The bundled model is a miniature gpt-oss written by `synth` from a fixed seed —
real tensor names, MXFP4 experts, layers across two shards — with large entries planted
in three named matrices; the Ray audit must report traps there and nowhere else.
"""

from __future__ import annotations

from pathlib import Path

from .synth import SynthConfig, synth_gpt_oss

PLANTED = {
    "model.layers.1.mlp.experts.down_proj[5]": 4,
    "model.layers.0.mlp.experts.gate_up_proj[2]": 2,
    "model.layers.1.self_attn.o_proj.weight": 3,
}
BUNDLED = SynthConfig(seed=2026, traps=PLANTED)


def write_bundled_model(folder: str | Path) -> Path:
    """Write the bundled model (byte-identical on every machine) into `folder`."""
    return synth_gpt_oss(folder, BUNDLED)
