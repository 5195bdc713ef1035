"""Resolve what the user typed (a folder, a file, or a hub repo id) to safetensors files, offline.

Why offline: an audit must run where the weights already are (a cluster's shared disk, a
CI cache) and must never fetch gigabytes as a side effect; a model that is not there gets
one message saying where we looked and the command that would fetch it. Pickle-based
checkpoints are refused by name, before anything opens them: loading them runs code.

Accepted references:
- a folder with an index (`model.safetensors.index.json`, diffusers'
  `diffusion_pytorch_model.safetensors.index.json`: its `weight_map` names the shards), or
  with `*.safetensors` files (all of them, sorted). The plain files are read, not a
  variant beside them (`model.fp16.safetensors`); a PEFT adapter beside a model is not
  read with it; models in subfolders (sentence-transformers modules, a diffusers
  pipeline's components) are audited each on its own. What is not read is listed, with why;
- one `.safetensors` file, or one index file (a variant's);
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
from ..inputs import read_capped

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_INDEX_BYTES = 64 * 2**20
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHORT_COMMIT = re.compile(r"^[0-9a-f]{4,39}$")
# transformers' and diffusers' variants: model.fp16.safetensors, its shards
# model.fp16-00001-of-00002.safetensors, their index model.safetensors.index.fp16.json
_VARIANT_FILE = re.compile(
    r"^[^.]+\.(?P<variant>[A-Za-z][\w-]*?)(?:-\d{5}-of-\d{5})?\.safetensors$"
)
_VARIANT_INDEX = re.compile(r"^[^.]+\.safetensors\.index\.(?P<variant>[A-Za-z][\w-]*)\.json$")
_INDEX_FILE = re.compile(r"^[^.]+\.safetensors\.index(?:\.[A-Za-z][\w-]*)?\.json$")
# the single file and the index transformers and diffusers look for, in their order
_LIBRARY_NAMES = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
)
_CONSOLIDATED = "consolidated"  # mistral_inference's copy of the weights, other names
# a PEFT adapter's weights (adapter_model.safetensors), and why one beside a model is not read
_ADAPTER = "adapter_model"
_ADAPTER_REASON = (
    "a PEFT adapter beside the model: audit the model merged with it (peft's "
    "merge_and_unload), or the adapter on its own"
)
# files that say what a folder's subfolders are
_SUBFOLDER_OWNERS = (
    ("model_index.json", "a diffusers pipeline"),
    ("modules.json", "a sentence-transformers model"),
)


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model's safetensors files are, and what the user called it.

    `weight_map` is the index's tensor -> shard file name mapping (None without an index);
    `revision` is the commit id of a hub snapshot (None for local paths); `not_read` the
    folder's other .safetensors files (and those one folder down), each with why it is
    not part of the model read (an index leaves it out, another variant, a subfolder's
    model, a PEFT adapter beside the model).
    """

    reference: str
    root: Path
    files: tuple[Path, ...]
    weight_map: dict[str, str] | None
    repo_id: str | None = None
    revision: str | None = None
    not_read: tuple[tuple[Path, str], ...] = ()

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
    try:
        return json.loads(read_capped(path, max_bytes).decode("utf-8"))
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


def _variant(path: Path) -> str | None:
    """The variant a weights file belongs to (`fp16` of `model.fp16.safetensors` or
    `diffusion_pytorch_model.fp16-00001-of-00002.safetensors`, of the index
    `model.safetensors.index.fp16.json`), None for the plain files."""
    match = _VARIANT_FILE.match(path.name) or _VARIANT_INDEX.match(path.name)
    return match.group("variant") if match else None


def _owner(root: Path) -> str:
    """What the folder is, as the file that lists its subfolders says (or nothing)."""
    found = ((name, what) for name, what in _SUBFOLDER_OWNERS if (root / name).is_file())
    return next((f" ({name}: {what})" for name, what in found), "")


def _subfolder_files(root: Path) -> list[tuple[Path, str]]:
    """The .safetensors files one folder down, with why they are not read: they are other
    models (a sentence-transformers module such as `2_Dense/`, a diffusers pipeline's
    `unet/`, gpt-oss's `original/`), each audited on its own."""
    found = []
    for path in sorted(root.glob("*/*.safetensors")):
        sub = path.parent.name
        found.append((path, f"in the subfolder {sub}/{_owner(root)}: audit that folder on its own"))
    return found


def _choose_files(root: Path) -> tuple[Path | None, list[Path]]:
    """The index (or None) and the .safetensors files of the model in `root`, in the order
    transformers and diffusers look: their single file, else their index; else the one
    other index there is; else every plain file (not an adapter, not mistral_inference's
    consolidated copy beside others), else the one variant there is. Several indexes or
    variants to choose from are refused."""
    for single, index in _LIBRARY_NAMES:
        if (root / single).is_file():
            return None, [root / single]
        if (root / index).is_file():
            return root / index, []
    indexes = sorted(root.glob("*.safetensors.index*.json"))
    plain_indexes = [p for p in indexes if _variant(p) is None]
    if len(plain_indexes) > 1:
        names = ", ".join(p.name for p in plain_indexes)
        raise CheckpointError(root, f"holds several indexes ({names}): pass the one to audit")
    if plain_indexes:
        return plain_indexes[0], []
    files = sorted(root.glob("*.safetensors"))
    weights = [p for p in files if not p.name.startswith(_ADAPTER)]
    plain = [p for p in weights if _variant(p) is None]
    if plain:
        copies = [p for p in plain if p.name.startswith(_CONSOLIDATED)]
        return None, [p for p in plain if p not in copies] or copies
    variants = sorted({v for p in [*indexes, *weights] if (v := _variant(p)) is not None})
    if len(variants) > 1:
        raise CheckpointError(
            root, f"holds the variants {', '.join(variants)} and no plain files: pass one"
        )
    variant_files = [p for p in weights if _variant(p) is not None]
    if indexes:
        return indexes[0], []
    return None, variant_files or files


def _not_read(root: Path, chosen: tuple[Path, ...], index: Path | None) -> list[tuple[Path, str]]:
    """Every .safetensors file of the folder (and one folder down) that is not read, and why."""
    reading = _variant(chosen[0]) if chosen else None
    left = []
    for path in sorted(root.glob("*.safetensors")):
        variant = _variant(path)
        if path in chosen:
            continue
        if variant is not None and variant != reading:
            reason = f"variant {variant!r} of the weights (to audit it, pass its file or index)"
        elif path.name.startswith(_ADAPTER):
            reason = _ADAPTER_REASON
        elif index is not None:
            reason = f"a .safetensors file the index does not name ({index.name}: not loaded)"
        elif path.name.startswith(_CONSOLIDATED):
            reason = "mistral_inference's consolidated copy of the weights (pass it to audit it)"
        else:
            reason = f"not loaded: transformers reads {chosen[0].name} alone (pass this file)"
        left.append((path, reason))
    return left + _subfolder_files(root)


def _resolve_folder(reference: str, root: Path, **hub: str | None) -> ResolvedModel:
    index, files = _choose_files(root)
    if index is not None:
        return _resolve_index(reference, index, **hub)
    if files:
        not_read = tuple(_not_read(root, tuple(files), None))
        return ResolvedModel(reference, root, tuple(files), None, **hub, not_read=not_read)
    pickles = sorted(p.name for p in root.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        _refuse_pickle(root / pickles[0])
    held = ""
    if subfolders := sorted({p.parent.name + "/" for p, _ in _subfolder_files(root)}):
        held = (
            f"; its subfolders {', '.join(subfolders)} hold models{_owner(root)}: "
            "audit each on its own"
        )
    elif ggufs := sorted(p.name for p in root.glob("*.gguf")):
        held = f" (it holds GGUF files, e.g. {ggufs[0]}: {_GGUF})"
    raise CheckpointError(root, f"no *.safetensors file or index in this folder{held}")


def _resolve_index(reference: str, index: Path, **hub: str | None) -> ResolvedModel:
    """The model an index describes: its shards, each checked to be there."""
    root = index.parent
    weight_map = _load_index(index)
    files = tuple(root / name for name in sorted(set(weight_map.values())))
    for path in files:
        if not path.is_file():
            raise CheckpointError(path, f"shard named in {index.name} is missing")
    not_read = tuple(_not_read(root, files, index))
    return ResolvedModel(reference, root, files, weight_map, **hub, not_read=not_read)


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
        if _INDEX_FILE.match(path.name):
            return _resolve_index(reference, path)
        if path.suffix.lower() == ".gguf":
            raise CheckpointError(path, f"a GGUF file: {_GGUF}")
        if path.suffix != ".safetensors":
            raise CheckpointError(path, "not a .safetensors file")
        return ResolvedModel(reference, path.parent, (path,), None)
    if _REPO_ID.match(reference) and not reference.startswith((".", "/")):
        return _resolve_hub(reference, revision)
    raise AuditError(f"{reference}: no such file or folder, and not a hub repo id (owner/name)")
