"""The bundled demo model and its in-process audit, run by `llm-audit demo` / `make demo`.

Why: the main job must run on a fresh machine with no download, on a model whose truth is
known. The bundled model is a miniature gpt-oss written by `synth` from a fixed seed —
real tensor names, MXFP4 experts, layers across two shards — with large entries planted
in three named matrices; the audit must report traps there and nowhere else. Until the
Ray-distributed `audit` exists (issue #4), the matrices are read and analyzed here, one
at a time, in this process (`unit_analysis.analyze_units`, as workers will).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .synth import SynthConfig, synth_gpt_oss
from .unit_analysis import analyze_units

PLANTED = {
    "model.layers.1.mlp.experts.down_proj[5]": 4,
    "model.layers.0.mlp.experts.gate_up_proj[2]": 2,
    "model.layers.1.self_attn.o_proj.weight": 3,
}
BUNDLED = SynthConfig(seed=2026, traps=PLANTED)


def write_bundled_model(folder: str | Path) -> Path:
    """Write the bundled model (byte-identical on every machine) into `folder`."""
    return synth_gpt_oss(folder, BUNDLED)


def audit_in_process(
    checkpoint: Checkpoint,
    *,
    seed: int = 0,
    backend: str | None = None,
    rand_route: str = "full",
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows for every planned matrix (plan order), with unit id, kind, layer and expert."""
    units = checkpoint.plan().units
    rows: list[dict[str, Any]] = []
    for done, unit in enumerate(units, 1):
        rows += analyze_units(checkpoint, [unit], seed=seed, backend=backend, rand_route=rand_route)
        if progress:
            progress(done, len(units))
    return rows
