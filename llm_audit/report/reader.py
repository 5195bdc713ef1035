"""Reading a report folder back: for `report show`, `check` and `diff`.

Why its own module: every reader must refuse the same things the same way — a folder that
is not a report, a schema version it does not know, a missing file — with one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..errors import ReportError
from .schema import LAYERS_SCHEMA, READABLE_VERSIONS, conform


@dataclass(frozen=True)
class Report:
    """A finished report: its rows (plan order), manifest and summary."""

    folder: Path
    rows: list[dict[str, Any]]
    manifest: dict[str, Any]
    summary: dict[str, Any]


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path.parent}: not a report folder (no {path.name})") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: not a JSON object")
    return data


def load_report(folder: str | Path) -> Report:
    """Load `folder`'s layers.parquet, manifest.json and summary.json, checked."""
    folder = Path(folder)
    manifest = _json(folder / "manifest.json")
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise ReportError(
            f"{folder}: report schema {version!r}, this llm-audit reads "
            f"{', '.join(map(repr, READABLE_VERSIONS))}"
        )
    layers = folder / "layers.parquet"
    if not layers.is_file():
        raise ReportError(
            f"{folder}: no layers.parquet (a run still going, or killed before "
            "its first result? --resume completes it)"
        )
    rows = conform(pq.read_table(layers), LAYERS_SCHEMA).to_pylist()
    return Report(folder, rows, manifest, _json(folder / "summary.json"))
