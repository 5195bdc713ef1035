"""The analysis settings: one frozen object, built once and passed down whole.

Why one object: a setting that changes numbers (seed, route, min_evals) must mean the
same thing in the CLI, the YAML config, the Ray workers and the Python API, and adding
one must not mean editing five signatures. Each default is written here and nowhere else;
the audit config (`llm_audit.run.config`) takes its analysis keys from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AuditError
from .backends import BACKEND_NAMES, GPU_BACKENDS

RAND_ROUTES = ("full", "topk")


@dataclass(frozen=True)
class AnalysisSettings:
    """How each matrix is analyzed (every key documented in configs/default.yaml)."""

    seed: int = 0  # with the matrix id, fixes every shuffle
    randomize: bool = True  # shuffled ESD and correlation traps
    rand_route: str = "full"  # shuffled spectrum: full ESD, or Lanczos top-k
    min_evals: int = 8  # WeightWatcher's DEFAULT_MIN_EVALS: smaller matrices are skipped
    backend: str = "auto"  # numpy, torch, cuda, cupy; auto: a GPU if one works, else numpy
    gpu_batch_size: int = 32  # same-shape matrices (a layer's experts) per GPU stack
    memory_budget_mb: int = 512  # matrices larger than this (float32) are streamed
    spill_dir: str | None = None  # where the streamed shuffle spills; default: system temp

    def __post_init__(self) -> None:
        if self.rand_route not in RAND_ROUTES:
            raise AuditError(
                f"rand_route must be one of {', '.join(RAND_ROUTES)}, got {self.rand_route!r}"
            )
        if self.backend not in BACKEND_NAMES:
            raise AuditError(
                f"backend must be one of {', '.join(BACKEND_NAMES)}, got {self.backend!r}"
            )

    @property
    def stream_above_bytes(self) -> int:
        """A float32 matrix larger than this is analyzed in row chunks."""
        return self.memory_budget_mb * 2**20

    def batch_size(self, backend_name: str) -> int:
        """Matrices per backend call: a GPU stack, or one at a time (memory one matrix deep)."""
        return self.gpu_batch_size if backend_name in GPU_BACKENDS else 1
