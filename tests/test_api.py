"""`llm_audit.run.api.audit` and `WeightWatcher(model=path)`: the real audit from Python."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from llm_audit.errors import AuditError
from llm_audit.run.api import audit, read_report
from llm_audit.run.watcher import WeightWatcher


def _mlp_file(folder):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 120), torch.nn.ReLU(), torch.nn.Linear(120, 96))
    with torch.no_grad():
        model[2].weight[7, 11] = 40 * model[2].weight.std()
    folder.mkdir()
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_audit_returns_the_report_table_and_watcher_reads_paths(tmp_path):
    model, path = _mlp_file(tmp_path / "m")
    report = audit(path.parent, out=tmp_path / "out", seed=0)
    on_disk = pq.read_table(tmp_path / "out" / "layers.parquet")
    assert report.layers.column("matrix").to_pylist() == ["0.weight", "2.weight"]
    assert report.layers.column("alpha").to_pylist() == on_disk.column("alpha").to_pylist()
    assert report.failed == 0 and report.summary == read_report(tmp_path / "out").summary
    frame = report.to_pandas()
    assert list(frame["matrix"]) == ["0.weight", "2.weight"]
    assert frame.set_index("matrix").loc["2.weight", "rand_num_spikes"] >= 1

    by_path = WeightWatcher(model=str(path)).analyze(randomize=True, seed=0)
    by_module = WeightWatcher(model=model).analyze(randomize=True, seed=0)
    assert list(by_path.layer_id) == [1, 2] and list(by_path.name) == ["0.weight", "2.weight"]
    np.testing.assert_allclose(by_path.alpha, by_module.alpha, rtol=1e-6)
    np.testing.assert_allclose(by_path.log_norm, by_module.log_norm, rtol=1e-6)
    assert list(by_path.num_spikes) == list(by_module.num_spikes)


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    _, path = _mlp_file(tmp_path / "m")
    with pytest.raises(AuditError, match="colour"):
        audit(path, out=tmp_path / "out", colour="red")
    with pytest.raises(AuditError):
        audit(path, out=tmp_path / "out", seed="one")
    assert not (tmp_path / "out").exists()
