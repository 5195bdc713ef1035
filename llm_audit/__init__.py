"""llm-audit: spectral (HTSR) auditing and correlation-trap detection for neural-network weights."""

from importlib.metadata import PackageNotFoundError, version

from .analyze import analyze_batch, analyze_matrix
from .columns import COLUMN_NAMES, COLUMNS

try:
    __version__ = version("llm-audit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["COLUMNS", "COLUMN_NAMES", "__version__", "analyze_batch", "analyze_matrix"]
