"""Model references resolve offline: folders, files, hub ids in the cache; pickles refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from llm_audit.errors import AuditError, CheckpointError
from llm_audit.source.reference import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _two_shards(folder):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {"a.weight": np.ones((4, 4), np.float32)}, folder / "model-00000-of-00001.safetensors"
    )
    save_file(
        {"b.weight": np.ones((4, 4), np.float32)}, folder / "model-00001-of-00001.safetensors"
    )
    index = {
        "weight_map": {
            "a.weight": "model-00000-of-00001.safetensors",
            "b.weight": "model-00001-of-00001.safetensors",
        }
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_folder_with_index(tmp_path):
    model = resolve_model(str(_two_shards(tmp_path / "m")))
    assert [p.name for p in model.files] == [
        "model-00000-of-00001.safetensors",
        "model-00001-of-00001.safetensors",
    ]
    assert model.weight_map["b.weight"] == "model-00001-of-00001.safetensors"
    assert model.repo_id is None and model.revision is None


def test_folder_without_index_and_single_file(tmp_path):
    save_file({"w": np.ones((2, 2), np.float32)}, tmp_path / "model.safetensors")
    assert resolve_model(str(tmp_path)).files == (tmp_path / "model.safetensors",)
    model = resolve_model(str(tmp_path / "model.safetensors"))
    assert model.files == (tmp_path / "model.safetensors",) and model.weight_map is None


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "x.ckpt"])
def test_pickle_checkpoints_are_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle-based checkpoints are refused"):
        resolve_model(str(tmp_path / name))
    with pytest.raises(CheckpointError, match="pickle-based"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("shard", ["../evil.safetensors", "sub/x.safetensors", "..", ""])
def test_index_shard_names_must_be_plain(tmp_path, shard):
    folder = _two_shards(tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": shard}})
    )
    with pytest.raises(CheckpointError, match="not a plain file name"):
        resolve_model(str(folder))


def test_missing_shard_and_bad_index(tmp_path):
    folder = _two_shards(tmp_path / "m")
    (folder / "model-00001-of-00001.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"shard named in model\.safetensors\.index\.json is missing"
    ):
        resolve_model(str(folder))
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        resolve_model(str(folder))
    (folder / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(CheckpointError, match="no 'weight_map'"):
        resolve_model(str(folder))


def _hub_cache(root, repo="openai/gpt-oss-20b", ref="main"):
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / ref).write_text(COMMIT)
    _two_shards(repo_dir / "snapshots" / COMMIT)
    return repo_dir


def test_hub_id_found_in_the_cache(tmp_path, monkeypatch):
    _hub_cache(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model = resolve_model("openai/gpt-oss-20b")
    assert model.repo_id == "openai/gpt-oss-20b" and model.revision == COMMIT
    assert len(model.files) == 2
    assert resolve_model("openai/gpt-oss-20b", revision=COMMIT).revision == COMMIT
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_model("openai/gpt-oss-20b").root.name == COMMIT


def test_missing_hub_model_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(AuditError) as err:
        resolve_model("openai/gpt-oss-120b")
    message = str(err.value)
    assert str(tmp_path / "hub" / "models--openai--gpt-oss-120b") in message
    assert "hf download openai/gpt-oss-120b --exclude 'original/*' 'metal/*'" in message
    assert "\n" not in message
    with pytest.raises(AuditError, match="not a branch, tag or commit"):
        resolve_model("openai/gpt-oss-120b", revision="../../etc")
    with pytest.raises(AuditError, match="no such file or folder"):
        resolve_model("./does-not-exist")
