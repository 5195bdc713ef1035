"""Model references resolve offline: folders, files, hub ids in the cache; pickles refused."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

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


HF_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.fixture
def hf_env(monkeypatch):
    """Set the cache environment variables and have huggingface_hub read them again: its
    `constants` are computed when it is imported, as in a fresh process."""
    constants = importlib.import_module("huggingface_hub.constants")

    def set_env(**values):
        for name in HF_VARIABLES:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(values.pop("HOME", "/nonexistent-home")))
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
        importlib.reload(constants)

    yield set_env
    monkeypatch.undo()
    importlib.reload(constants)


def _hub_repo(cache, repo="openai/gpt-oss-20b", refs=None, commit=COMMIT):
    """A repo in huggingface_hub's cache layout: refs/<name> -> commit, snapshots/<commit>."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs if refs is not None else ["main"]:
        (repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    _two_shards(repo_dir / "snapshots" / commit)
    return repo_dir


@pytest.mark.parametrize(
    ("variable", "cache"),
    [
        ("HF_HUB_CACHE", "x"),
        ("HUGGINGFACE_HUB_CACHE", "x"),
        ("HF_HOME", "x/hub"),
        ("XDG_CACHE_HOME", "x/huggingface/hub"),
        ("HOME", "x/.cache/huggingface/hub"),
    ],
)
def test_each_cache_variable_is_followed(tmp_path, hf_env, variable, cache):
    _hub_repo(tmp_path / cache)
    hf_env(**{variable: tmp_path / "x"})
    model = resolve_model("openai/gpt-oss-20b")
    assert model.root == tmp_path / cache / "models--openai--gpt-oss-20b" / "snapshots" / COMMIT
    assert model.repo_id == "openai/gpt-oss-20b" and model.revision == COMMIT
    assert len(model.files) == 2


def test_hub_cache_beats_hf_home(tmp_path, hf_env):
    _hub_repo(tmp_path / "hub-cache")
    hf_env(HF_HUB_CACHE=tmp_path / "hub-cache", HF_HOME=tmp_path / "home")
    assert resolve_model("openai/gpt-oss-20b").revision == COMMIT
    hf_env(HF_HOME=tmp_path / "home", XDG_CACHE_HOME=tmp_path / "hub-cache")
    with pytest.raises(AuditError, match=str(tmp_path / "home" / "hub")):
        resolve_model("openai/gpt-oss-20b")


def test_branches_tags_and_commits(tmp_path, hf_env):
    other = "89abcdef0123456789abcdef0123456789abcdef"
    _hub_repo(tmp_path, refs=["main", "v1.0"])
    _hub_repo(tmp_path, refs=["dev", "refs/pr/1"], commit=other)
    hf_env(HF_HUB_CACHE=tmp_path)
    for revision, commit in [
        (None, COMMIT),
        ("main", COMMIT),
        ("v1.0", COMMIT),
        ("dev", other),
        ("refs/pr/1", other),
        (other, other),
        (COMMIT[:7], COMMIT),
        (other[:12], other),
    ]:
        model = resolve_model("openai/gpt-oss-20b", revision=revision)
        assert model.revision == commit and model.root.name == commit, revision
    with pytest.raises(AuditError, match=r"\(revision nope\) is not in"):
        resolve_model("openai/gpt-oss-20b", revision="nope")
    third = COMMIT[:7] + "f" * 33
    _hub_repo(tmp_path, refs=[], commit=third)
    with pytest.raises(AuditError, match=f"'{COMMIT[:7]}' .* is ambiguous: {COMMIT}, {third}"):
        resolve_model("openai/gpt-oss-20b", revision=COMMIT[:7])


def test_a_ref_that_is_not_a_commit_is_refused(tmp_path, hf_env):
    repo = _hub_repo(tmp_path)
    (repo / "refs" / "main").write_text("../../../outside")
    (tmp_path.parent / "outside").mkdir(exist_ok=True)
    hf_env(HF_HUB_CACHE=tmp_path)
    with pytest.raises(CheckpointError, match="does not name a commit"):
        resolve_model("openai/gpt-oss-20b")


def _listing(repo_dir, commit, paths):
    """The file listing huggingface_hub caches beside a download, written by its own writer."""
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    entries = {path: TreeCacheEntry(size=1, blob_id="0" * 40) for path in paths}
    write_tree_cache(str(repo_dir), commit, entries)


def test_fetch_hint_excludes_what_the_model_has(tmp_path, hf_env):
    hf_env(HF_HUB_CACHE=tmp_path)
    with pytest.raises(AuditError) as err:
        resolve_model("openai/gpt-oss-120b")
    message = str(err.value)
    assert str(tmp_path / "models--openai--gpt-oss-120b") in message
    assert "is not in the local Hugging Face cache" in message and "\n" not in message
    # nothing known about the repo: ask for exactly the files an audit reads
    assert (
        "hf download openai/gpt-oss-120b --include '*.safetensors' '*.json' --exclude '*/*'"
        in message
    )

    # an interrupted gpt-oss download: its listing has original/ and metal/
    repo = _hub_repo(tmp_path, repo="openai/gpt-oss-120b")
    _listing(
        repo,
        COMMIT,
        ["config.json", "model.safetensors", "original/model.safetensors", "metal/model.bin"],
    )
    with pytest.raises(AuditError) as err:
        resolve_model("openai/gpt-oss-120b")
    message = str(err.value)
    assert "is incomplete in the local Hugging Face cache" in message
    assert "hf download openai/gpt-oss-120b --exclude 'metal/*' 'original/*' (or" in message

    # a model with neither folder: nothing excluded but its pickle copy
    repo = _hub_repo(tmp_path, repo="acme/tiny-lm", refs=["v2"])
    _listing(repo, COMMIT, ["config.json", "model.safetensors", "pytorch_model.bin"])
    with pytest.raises(AuditError) as err:
        resolve_model("acme/tiny-lm", revision="v2")
    assert "hf download acme/tiny-lm --revision v2 --exclude '*.bin' (or" in str(err.value)

    # a listing the snapshot satisfies: the model resolves, subfolders not required
    (repo / "snapshots" / COMMIT / "model.safetensors").write_bytes(
        (repo / "snapshots" / COMMIT / "model-00000-of-00001.safetensors").read_bytes()
    )
    _listing(repo, COMMIT, ["model.safetensors", "model.safetensors.index.json", "original/x.pt"])
    assert resolve_model("acme/tiny-lm", revision="v2").revision == COMMIT


def test_bad_revisions_and_paths(tmp_path, hf_env):
    hf_env(HF_HUB_CACHE=tmp_path)
    with pytest.raises(AuditError, match="not a branch, tag or commit"):
        resolve_model("openai/gpt-oss-120b", revision="../../etc")
    with pytest.raises(AuditError, match="no such file or folder"):
        resolve_model("./does-not-exist")


def test_plan_command_finds_the_xdg_cache(tmp_path):
    """The issue's case, in a fresh process: `llm-audit plan acme/tiny-lm` with only
    XDG_CACHE_HOME saying where the cache is."""
    _hub_repo(tmp_path / "xdg" / "huggingface" / "hub", repo="acme/tiny-lm")
    env = {k: v for k, v in os.environ.items() if k not in HF_VARIABLES}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [sys.executable, "-m", "llm_audit", "plan", "acme/tiny-lm", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert COMMIT in done.stdout and "a.weight" in done.stdout


def test_gguf_files_are_named_not_taken_for_broken_safetensors(tmp_path):
    (tmp_path / "model-q8_0.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(CheckpointError, match=r"a GGUF file: llama\.cpp's format is not read"):
        resolve_model(str(tmp_path / "model-q8_0.gguf"))
    with pytest.raises(CheckpointError, match=r"it holds GGUF files, e\.g\. model-q8_0\.gguf"):
        resolve_model(str(tmp_path))
