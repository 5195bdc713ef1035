"""`llm_audit.audit(model, out=...)`: the checkpoint audit as one Python call.

Why a function and not only a command: notebooks and training scripts want the report's
rows as a table without a subprocess or parsing stdout. This is the same run the CLI
does — `run_audit` (plan from headers, Ray tasks, Parquet report written to `out`) — and
the same reader `report show` uses, so the table is exactly `layers.parquet` as checked
against the report schema. Settings are validated the way a YAML config is: an unknown
key or a bad value is one `AuditError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..report.reader import load_report
from ..report.schema import LAYERS_SCHEMA
from .audit import run_audit
from .config import load_config

if TYPE_CHECKING:  # pandas is optional: imported only by `to_pandas`
    import pandas as pd


@dataclass(frozen=True)
class AuditReport:
    """A finished report folder, read back.

    `layers` is `layers.parquet` (one row per matrix, plan order) as a pyarrow Table with
    the report schema; `manifest` and `summary` are `manifest.json` and `summary.json`.
    """

    folder: Path
    layers: pa.Table
    manifest: dict[str, Any]
    summary: dict[str, Any]

    @property
    def failed(self) -> int:
        """Matrices whose analysis failed (`status == "error"`)."""
        return sum(1 for s in self.layers.column("status").to_pylist() if s == "error")

    def to_pandas(self) -> pd.DataFrame:
        """`layers` as a pandas DataFrame (needs pandas installed)."""
        try:
            import pandas  # noqa: F401  (pyarrow's to_pandas needs it)
        except ImportError:
            raise ImportError(
                "AuditReport.to_pandas needs pandas (pip install pandas); "
                "report.layers is the same data as a pyarrow Table"
            ) from None
        return self.layers.to_pandas()


def read_report(folder: str | Path) -> AuditReport:
    """An existing report folder as an `AuditReport` (checked as `report show` checks it)."""
    report = load_report(folder)
    table = pa.Table.from_pylist(report.rows, schema=LAYERS_SCHEMA)
    return AuditReport(Path(folder), table, report.manifest, report.summary)


def audit(
    model: str | Path,
    out: str | Path,
    *,
    config: str | Path | None = None,
    revision: str | None = None,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = True,
    **settings: Any,
) -> AuditReport:
    """Audit `model` (a folder, a .safetensors file or a hub id in the local cache) into
    the report folder `out` and return the report.

    `config` is a YAML config file (configs/default.yaml documents the keys); `settings`
    are config keys that override it (`seed=1`, `randomize=False`, `include=[...]`,
    `backend="numpy"`, ...). `address` joins a Ray cluster, else a local Ray is started.
    `out` must be missing, empty, or (with `resume` or `overwrite`) an earlier report.
    A matrix that fails is a row with `status == "error"` (`report.failed` counts them);
    user errors raise `AuditError`.
    """
    cfg = load_config(config).with_overrides(**settings)
    run_audit(
        str(model),
        out,
        cfg,
        revision=revision,
        address=address,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
    )
    return read_report(out)
