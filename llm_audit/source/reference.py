"""Resolve what the user typed (a folder, a file, or a hub repo id) to safetensors files, offline.

Why offline: an audit must run where the weights already are (a cluster's shared disk, a
CI cache) and must never fetch gigabytes as a side effect; a model that is not there gets
one message saying where we looked and the command that would fetch it. Pickle-based
checkpoints are refused by name, before anything opens them: loading them runs code.

Accepted references:
- a folder with `model.safetensors.index.json` (its `weight_map` names the shards), or
  with `*.safetensors` files (all of them, sorted);
- one `.safetensors` file;
- a hub repo id `owner/name` (optional revision: a branch or tag under `refs/`, or a commit
  id) found in the Hugging Face cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
  `~/.cache/huggingface/hub`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AuditError, CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_INDEX_BYTES = 64 * 2**20
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's safetensors files are, and what the user called it.

    `weight_map` is the index's tensor -> shard file name mapping (None without an index);
    `revision` is the commit id of a hub snapshot (None for local paths).
    """

    reference: str
    root: Path
    files: tuple[Path, ...]
    weight_map: dict[str, str] | None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def config_path(self) -> Path | None:
        path = self.root / "config.json"
        return path if path.is_file() else None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub computes it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            path,
            "pickle-based checkpoints are refused (loading one can run arbitrary code); "
            "convert it to safetensors first",
        )


def load_json_file(path: Path, max_bytes: int) -> Any:
    """A small JSON file from a checkpoint folder (index, config), size-capped and checked."""
    if path.stat().st_size > max_bytes:
        raise CheckpointError(path, f"larger than {max_bytes} bytes")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(path, f"not valid UTF-8 JSON ({err})") from None


def _load_index(index: Path) -> dict[str, str]:
    """The index's weight_map, checked: shard names must be plain file names that exist."""
    data = load_json_file(index, MAX_INDEX_BYTES)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(index, "index has no 'weight_map' object")
    for tensor, shard in weight_map.items():
        if not isinstance(tensor, str) or not isinstance(shard, str):
            raise CheckpointError(index, "weight_map must map tensor names to file names")
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard or "\0" in shard:
            raise CheckpointError(
                index, f"shard name {shard!r} is not a plain file name in the folder", tensor
            )
        _refuse_pickle(Path(shard))
    return weight_map


def _resolve_folder(reference: str, root: Path, **hub: str | None) -> ResolvedModel:
    index = root / INDEX_NAME
    if index.is_file():
        weight_map = _load_index(index)
        files = tuple(root / name for name in sorted(set(weight_map.values())))
        for path in files:
            if not path.is_file():
                raise CheckpointError(path, f"shard named in {INDEX_NAME} is missing")
        return ResolvedModel(reference, root, files, weight_map, **hub)
    files = tuple(sorted(root.glob("*.safetensors")))
    if files:
        return ResolvedModel(reference, root, files, None, **hub)
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(root / pickles[0])
    raise CheckpointError(root, f"no {INDEX_NAME} and no *.safetensors file in this folder")


def _fetch_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"hf download {repo_id}{rev} --exclude 'original/*' 'metal/*'"
        " (or huggingface-cli download with the same arguments)"
    )


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedModel:
    cache = hub_cache_dir()
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    wanted = revision or "main"
    if ".." in wanted.split("/") or not re.fullmatch(r"[\w.\-/]+", wanted):
        raise AuditError(f"revision {wanted!r} is not a branch, tag or commit id")
    commit = wanted if _COMMIT.match(wanted) else None
    ref_file = repo_dir / "refs" / wanted
    if commit is None and ref_file.is_file():
        commit = ref_file.read_text().strip()
    snapshot = repo_dir / "snapshots" / commit if commit and _COMMIT.match(commit) else None
    if snapshot is None or not snapshot.is_dir():
        raise AuditError(
            f"model {repo_id!r} (revision {wanted}) is not in the local Hugging Face cache: "
            f"looked in {repo_dir}; nothing is downloaded at run time — fetch it with: "
            f"{_fetch_hint(repo_id, revision)}"
        )
    return _resolve_folder(repo_id, snapshot, repo_id=repo_id, revision=commit)


def resolve_model(reference: str, revision: str | None = None) -> ResolvedModel:
    """Find the safetensors files of `reference` without touching the network."""
    path = Path(reference).expanduser()
    if path.exists():
        if revision:
            raise AuditError(f"--revision applies to hub repo ids, not to the path {reference}")
        if path.is_dir():
            return _resolve_folder(reference, path)
        _refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointError(path, "not a .safetensors file")
        return ResolvedModel(reference, path.parent, (path,), None)
    if _REPO_ID.match(reference) and not reference.startswith((".", "/")):
        return _resolve_hub(reference, revision)
    raise AuditError(f"{reference}: no such file or folder, and not a hub repo id (owner/name)")
