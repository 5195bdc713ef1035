"""An exact uniform shuffle of a matrix too large to hold, streamed in row chunks.

Why: the shuffled ESD of a 201088 x 2880 embedding needs a uniformly random permutation of
its 579 M entries, 2.3 GB as float32 — more than the memory bound of a worker. Two passes
give exactly the same distribution as `rng.permutation` with one chunk and one bucket in
memory at a time:

1. The output rows are cut into buckets of `bucket_rows` rows. For each input chunk, in
   order, draw how many of its entries go to each bucket from a multivariate
   hypergeometric law over the buckets' remaining capacities, permute the chunk, split it
   by those counts and append each part to its bucket's spill file. This assigns every
   entry to a uniformly random output slot set, exactly.
2. For each bucket, in order: load it, permute it uniformly, and yield it as rows.

Spill files live in a temporary folder (`spill_dir`, default the system's) and hold one
copy of the matrix as float32; they are removed when the iteration ends.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np


def streamed_shuffle(
    chunks: Callable[[], Iterable[np.ndarray]],
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    bucket_rows: int,
    spill_dir: str | Path | None = None,
) -> Iterator[np.ndarray]:
    """Row blocks of a uniformly shuffled copy of the matrix that `chunks()` streams."""
    rows, cols = shape
    starts = list(range(0, rows, bucket_rows))
    capacity = np.array([min(bucket_rows, rows - s) * cols for s in starts], dtype=np.int64)
    with tempfile.TemporaryDirectory(dir=spill_dir, prefix="llm-audit-shuffle-") as tmp:
        paths = [Path(tmp) / f"bucket-{b:06d}.f32" for b in range(len(starts))]
        handles = [path.open("wb") for path in paths]
        try:
            for chunk in chunks():
                flat = rng.permutation(np.asarray(chunk, dtype=np.float32).ravel())
                counts = rng.multivariate_hypergeometric(capacity, flat.size)
                capacity -= counts
                for handle, part in zip(
                    handles, np.split(flat, np.cumsum(counts)[:-1]), strict=True
                ):
                    part.tofile(handle)
        finally:
            for handle in handles:
                handle.close()
        if capacity.any():
            raise ValueError(f"streamed {capacity.sum()} fewer entries than shape {shape}")
        for path in paths:
            bucket = np.fromfile(path, dtype=np.float32)
            path.unlink()
            rng.shuffle(bucket)
            yield bucket.reshape(-1, cols)
