"""Writing result files so that a reader sees all of a file or none of it, even after a
power cut.

Why here, at the top: reports, grok timelines, checkpoints of a training run and the
MNIST cache are all results that a killed process must not leave half-written, and none
of those writers should import another stage just for this. A rename alone is atomic
only for a running system: after a crash the new name may point at blocks never written.
So the temporary file is fsync'ed before the rename, and its folder after it (the rename
itself lives in the folder).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import AuditError


def fsync_path(path: Path) -> None:
    """Flush `path` (a file or a folder) to stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp_path)`, fsync it, rename it onto `path`, fsync the folder: readers
    see all of it or nothing, before and after a crash."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """`data` as indented JSON, atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def output_path(path: str | Path, suffixes: tuple[str, ...], what: str) -> Path:
    """`path` checked as where to write a new `what` (an HTML page, a JUnit file): its
    folder exists, and it is not an existing file of another kind. `-o bc/manifest.json`
    or `--junit layers.parquet` would otherwise replace a report's own file, or a shard."""
    out = Path(path)
    if not out.parent.is_dir():
        raise AuditError(f"{out}: no such folder {out.parent}")
    if out.exists() and not (out.is_file() and out.suffix.lower() in suffixes):
        raise AuditError(
            f"{out}: exists and is not a {what} file ({', '.join(suffixes)}); refusing to "
            "replace it"
        )
    return out
