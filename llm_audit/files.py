"""Writing result files so that a reader sees all of a file or none of it.

Why here, at the top: reports, grok timelines, checkpoints of a training run and the
MNIST cache are all results that a killed process must not leave half-written, and none
of those writers should import another stage just for this.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp_path)`, then rename onto `path`: readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """`data` as indented JSON, atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))
