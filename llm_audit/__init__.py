"""llm-audit: spectral (HTSR) auditing and correlation-trap detection for neural-network weights.

The package follows the data flow: `source` (checkpoints, headers, decoders, the plan) →
`spectral` (one matrix's ESD, fits, shuffles and traps) → `report` (the row schema,
writer, readers, check, diff, HTML) ← `run` (the Ray audit that turns a plan into a
report); `grok` is a client of `run` and `report`. Each imports only the stages before it.
"""

from importlib.metadata import PackageNotFoundError, version

from .errors import AuditError, CheckpointError
from .spectral.analyze import analyze_batch, analyze_matrix
from .spectral.columns import COLUMN_NAMES, COLUMNS
from .spectral.settings import AnalysisSettings

try:
    __version__ = version("llm-audit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from .run.watcher import WeightWatcher  # after __version__: the run stage reads it

_API = ("audit", "AuditReport", "read_report")


def __getattr__(name: str) -> object:
    """`audit`, `AuditReport`, `read_report`, imported on first use (they import Ray)."""
    if name in _API:
        from .run import api

        return getattr(api, name)
    raise AttributeError(f"module 'llm_audit' has no attribute {name!r}")


__all__ = [
    "COLUMNS",
    "COLUMN_NAMES",
    "AnalysisSettings",
    "AuditError",
    "AuditReport",
    "CheckpointError",
    "WeightWatcher",
    "__version__",
    "analyze_batch",
    "analyze_matrix",
    "audit",
    "read_report",
]
