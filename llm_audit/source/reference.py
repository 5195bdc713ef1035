"""Resolve what the user typed (a folder, a file, or a hub repo id) to safetensors files, offline.

Why offline: an audit must run where the weights already are (a cluster's shared disk, a
CI cache) and must never fetch gigabytes as a side effect; a model that is not there gets
one message saying where we looked and the command that would fetch it. Pickle-based
checkpoints are refused by name, before anything opens them: loading them runs code.

Accepted references:
- a folder with `model.safetensors.index.json` (its `weight_map` names the shards), or
  with `*.safetensors` files (all of them, sorted);
- one `.safetensors` file;
- a hub repo id `owner/name` (optional revision: a branch, a tag, a full commit hash, or
  an unambiguous prefix of one) found in the Hugging Face cache.

Why huggingface_hub's own functions: the cache is huggingface_hub's, and so are its rules —
where it is (`HF_HUB_CACHE`, the legacy `HUGGINGFACE_HUB_CACHE`, `HF_HOME`,
`XDG_CACHE_HOME`, read when huggingface_hub is imported), how a branch or tag maps to a
commit (`refs/`), and when a cached snapshot is incomplete. A hand-written copy of those
rules looked in `~/.cache` when `XDG_CACHE_HOME` said otherwise. So a hub id goes through
`snapshot_download(..., local_files_only=True)`, which never touches the network; only
short commit hashes, which huggingface_hub does not take, are matched here against the
snapshot folders it made. The fetch hint names what to leave out only from what that
repo is known to hold: the file listing huggingface_hub caches beside a download
(`get_cached_repo_tree`); with no listing, it asks for the top-level safetensors and JSON
files, which are all an audit reads.
"""

from __future__ import annotations

import json
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
_SHORT_COMMIT = re.compile(r"^[0-9a-f]{4,39}$")


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's safetensors files are, and what the user called it.

    `weight_map` is the index's tensor -> shard file name mapping (None without an index);
    `revision` is the commit id of a hub snapshot (None for local paths); `unindexed` the
    folder's .safetensors files its index does not name (transformers does not load them).
    """

    reference: str
    root: Path
    files: tuple[Path, ...]
    weight_map: dict[str, str] | None
    repo_id: str | None = None
    revision: str | None = None
    unindexed: tuple[Path, ...] = ()

    @property
    def config_path(self) -> Path | None:
        path = self.root / "config.json"
        return path if path.is_file() else None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub computed it at import."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


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
        unindexed = tuple(p for p in sorted(root.glob("*.safetensors")) if p not in files)
        return ResolvedModel(reference, root, files, weight_map, **hub, unindexed=unindexed)
    files = tuple(sorted(root.glob("*.safetensors")))
    if files:
        return ResolvedModel(reference, root, files, None, **hub)
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(root / pickles[0])
    ggufs = sorted(p.name for p in root.glob("*.gguf"))
    held = f" (it holds GGUF files, e.g. {ggufs[0]}: {_GGUF})" if ggufs else ""
    raise CheckpointError(root, f"no {INDEX_NAME} and no *.safetensors file in this folder{held}")


_GGUF = "llama.cpp's format is not read; audit the model's safetensors release"

# what an audit reads from a snapshot: its top-level safetensors and JSON (index, config)
_READ_PATTERNS = ["*.safetensors", "*.json"]
_SUBFOLDERS = ["*/*"]


def _unread_paths(repo_id: str, revision: str | None) -> list[str] | None:
    """--exclude patterns for what the repo holds and an audit never reads (subfolders, such
    as gpt-oss's `original/` and `metal/`, and pickle files), from the file listing
    huggingface_hub cached for it; None when it cached none."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        files = get_cached_repo_tree(repo_id, revision=revision, cache_dir=hub_cache_dir())
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None
    patterns = set()
    for entry in files:
        top, _, rest = entry.path.partition("/")
        if rest:
            patterns.add(f"{top}/*")
        elif Path(top).suffix.lower() in PICKLE_SUFFIXES:
            patterns.add(f"*{Path(top).suffix}")
    return sorted(patterns)


def _quoted(patterns: list[str]) -> str:
    return " ".join(f"'{p}'" for p in patterns)


def _fetch_hint(repo_id: str, revision: str | None) -> str:
    """The download command: with the repo's file listing cached, it excludes exactly the
    folders and pickles it holds; without, it asks for the top-level files we read."""
    rev = f" --revision {revision}" if revision else ""
    unread = _unread_paths(repo_id, revision)
    if unread is None:
        only = f" --include {_quoted(_READ_PATTERNS)} --exclude {_quoted(_SUBFOLDERS)}"
    else:
        only = f" --exclude {_quoted(unread)}" if unread else ""
    return f"hf download {repo_id}{rev}{only} (or huggingface-cli download with the same arguments)"


def _full_commit(repo_dir: Path, short: str) -> str | None:
    """The one snapshot commit starting with `short` (a hex prefix of 4-39 digits)."""
    snapshots = repo_dir / "snapshots"
    if not _SHORT_COMMIT.match(short) or not snapshots.is_dir():
        return None
    found = sorted(p.name for p in snapshots.iterdir() if p.name.startswith(short))
    if len(found) > 1:
        raise AuditError(f"revision {short!r} of {repo_dir.name} is ambiguous: {', '.join(found)}")
    return found[0] if found and _COMMIT.match(found[0]) else None


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
    )
    from huggingface_hub.file_download import repo_folder_name

    wanted = revision or "main"
    if ".." in wanted.split("/") or not re.fullmatch(r"[\w.\-/]+", wanted):
        raise AuditError(f"revision {wanted!r} is not a branch, tag or commit id")
    repo_dir = hub_cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")
    if not (repo_dir / "refs" / wanted).is_file():
        wanted = _full_commit(repo_dir, wanted) or wanted
    try:
        snapshot = snapshot_download(
            repo_id,
            revision=wanted,
            cache_dir=hub_cache_dir(),
            local_files_only=True,
            allow_patterns=_READ_PATTERNS,
            ignore_patterns=_SUBFOLDERS,
        )
    except (LocalEntryNotFoundError, HFValidationError) as err:
        state = "is incomplete in" if isinstance(err, IncompleteSnapshotError) else "is not in"
        raise AuditError(
            f"model {repo_id!r} (revision {revision or 'main'}) {state} the local Hugging Face "
            f"cache: looked in {repo_dir}; nothing is downloaded at run time — fetch it with: "
            f"{_fetch_hint(repo_id, revision)}"
        ) from None
    root = Path(snapshot)
    if root.parent != repo_dir / "snapshots" or not _COMMIT.match(root.name):
        raise CheckpointError(root, f"{repo_dir / 'refs' / wanted} does not name a commit")
    return _resolve_folder(repo_id, root, repo_id=repo_id, revision=root.name)


def resolve_model(reference: str, revision: str | None = None) -> ResolvedModel:
    """Find the safetensors files of `reference` without touching the network."""
    path = Path(reference).expanduser()
    if path.exists():
        if revision:
            raise AuditError(f"--revision applies to hub repo ids, not to the path {reference}")
        if path.is_dir():
            return _resolve_folder(reference, path)
        _refuse_pickle(path)
        if path.suffix.lower() == ".gguf":
            raise CheckpointError(path, f"a GGUF file: {_GGUF}")
        if path.suffix != ".safetensors":
            raise CheckpointError(path, "not a .safetensors file")
        return ResolvedModel(reference, path.parent, (path,), None)
    if _REPO_ID.match(reference) and not reference.startswith((".", "/")):
        return _resolve_hub(reference, revision)
    raise AuditError(f"{reference}: no such file or folder, and not a hub repo id (owner/name)")
