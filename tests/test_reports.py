"""The committed validation reports agree with themselves: every figure in the phase
tables of reports/README.md and each run's phases.md is recomputed here from that run's
committed timeline.parquet, and the timeline holds exactly the rows of metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from llm_audit.grok.compare import (
    divergence,
    divergence_markdown,
    measure_keys,
    separation,
    separation_markdown,
)
from llm_audit.grok.timeline import layers_of, phases_markdown, run_phases
from llm_audit.grok.train import read_metrics

REPORTS = Path(__file__).resolve().parent.parent / "reports"
RUNS = sorted(p.parent for p in REPORTS.glob("grok-*/timeline.parquet"))


def test_the_validation_runs_are_committed():
    assert {p.name for p in RUNS} >= {
        "grok-mlp-mnist-s4-wd0",
        "grok-mlp-mnist-s4-wd0.01",
        "grok-modadd-wd1",
        "grok-mlp-mnist-s8-wd0",
        "grok-mlp-mnist-s8-wd0.01",
        "grok-mlp-mnist-s8-wd0-f32",
    }


@pytest.mark.parametrize("run", RUNS, ids=lambda p: p.name)
def test_phase_tables_come_from_the_committed_timeline(run: Path):
    rows = pq.read_table(run / "timeline.parquet").to_pylist()
    metrics = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in metrics]
    # every column of every metrics row (the ablations start at a layer's first trap)
    for row, line in zip(rows, metrics, strict=True):
        assert {k: row[k] for k in line} == line
    config = json.loads((run / "run.json").read_text())["config"]
    expected = phases_markdown(run_phases(rows, config), layers_of(rows))
    assert (run / "phases.md").read_text() == expected
    readme = (REPORTS / "README.md").read_text()
    assert f"(`{run.name}`)" in readme
    section = readme.split(f"(`{run.name}`)", 1)[1].split("\n## ", 1)[0]
    assert expected.strip() in section


def test_the_separation_table_comes_from_the_committed_timelines():
    """The open question's evidence: from which shared checkpoint each measure keeps the
    init-8 run on one side of its control (`llm-audit grok mlp-mnist --summary-only
    --out reports/grok-mlp-mnist-s8-wd0 --control reports/grok-mlp-mnist-s8-wd0.01`)."""
    main, control = (
        pq.read_table(REPORTS / f"grok-mlp-mnist-s8-{wd}" / "timeline.parquet").to_pylist()
        for wd in ("wd0", "wd0.01")
    )
    table = separation_markdown(separation(main, control, measure_keys(main)))
    section = (REPORTS / "README.md").read_text().split("\n## The open question at init 8")[1]
    assert table.strip() in section


def test_the_twin_table_comes_from_the_committed_timelines():
    """What float64 changes: the init-8 run against its float32 twin (`llm-audit grok
    mlp-mnist --summary-only --out reports/grok-mlp-mnist-s8-wd0 --twin
    reports/grok-mlp-mnist-s8-wd0-f32`)."""
    main, twin = (
        pq.read_table(REPORTS / f"grok-mlp-mnist-s8-{name}" / "timeline.parquet").to_pylist()
        for name in ("wd0", "wd0-f32")
    )
    table = divergence_markdown(divergence(main, twin, measure_keys(main)))
    section = (REPORTS / "README.md").read_text().split("(`grok-mlp-mnist-s8-wd0-f32`)")[1]
    assert table.strip() in section.split("\n## ", 1)[0]


CROSSCHECK = REPORTS / "grok-mlp-mnist-s4-wd0" / "crosscheck"


@pytest.mark.parametrize(
    "weights", sorted(CROSSCHECK.glob("step-*.safetensors")), ids=lambda p: p.stem
)
def test_weightwatcher_counts_the_same_traps_in_the_committed_checkpoints(weights: Path):
    """WeightWatcher 0.7.7's own analyze(randomize=True) on a few checkpoints of the
    weight-decay-0 run (before the first trap, at it, during grokking, at the peak, in the
    collapse) finds the FC1/FC2 traps our timeline reports, including those *before* the
    collapse. fc3 (10 eigenvalues) is left out: one shuffle of a 10x200 matrix is too
    noisy to compare (WeightWatcher's own count varies between its shuffles)."""
    import weightwatcher

    from .conftest import quiet

    tensors = {k: v for k, v in load_file(weights).items() if v.ndim == 2}
    layers = []
    for w in tensors.values():
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        layer.weight.data = w.double()
        layers.append(layer)
    np.random.seed(0)  # WeightWatcher shuffles with numpy's global generator
    with quiet():
        found = weightwatcher.WeightWatcher(model=torch.nn.Sequential(*layers)).analyze(
            randomize=True
        )
    theirs = dict(zip(tensors, found["rand_num_spikes"].tolist(), strict=True))
    step = int(weights.stem.removeprefix("step-"))
    run = weights.parent.parent
    row = next(r for r in read_metrics(run / "metrics.jsonl") if r["step"] == step)
    assert (row["traps.fc1"], row["traps.fc2"]) == (theirs["fc1.weight"], theirs["fc2.weight"])
