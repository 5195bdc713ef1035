"""Seeded element shuffles: the randomized copy of W whose outlier eigenvalues are traps.

Why seeded per matrix: WeightWatcher shuffles with numpy's global, unseeded generator, so
two runs disagree on the trap count of a borderline matrix. Here each matrix gets its own
generator from (run seed, matrix id), so a report is reproducible whatever order, worker
or node computed it. The permutation is always drawn on the host with numpy's PCG64, so
CPU and GPU backends shuffle identically.

Streamed (`BucketShuffle`): an exact uniform shuffle of a matrix too large to hold. The
shuffled ESD of a 201088 x 2880 embedding needs a uniformly random permutation of
its 579 M entries, 2.3 GB as float32 — more than the memory bound of a worker. Two passes
give exactly the same distribution as `rng.permutation` with one chunk and one bucket in
memory at a time:

1. `add`, for each input chunk in order: the output rows are cut into buckets of
   `bucket_rows` rows; draw how many of the chunk's entries go to each bucket from a
   multivariate hypergeometric law over the buckets' remaining capacities, permute the
   chunk, split it by those counts and append each part to its bucket's spill file. This
   assigns every entry to a uniformly random set of output slots, exactly.
2. `blocks`: for each bucket in order, load it, permute it uniformly and yield its rows.

Pass 1 consumes the same chunks as W's own Gram, so the checkpoint is read once. Spill
files live in a temporary folder (`spill_dir`, default the system's) and hold one float32
copy of the matrix; they are removed by `close` (or leaving the `with` block), also when
the analysis fails. A killed worker cannot clean up, and its spill folder can be GBs (an
embedding), so each folder is named `llm-audit-shuffle-HOST-PID-XXXXXXXX`, and every new
shuffle first removes the folders of processes of this host that no longer run: only
folders so named, owned by this user, and in them only bucket files.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np


def shuffle_generator(seed: int, matrix_id: str) -> np.random.Generator:
    """Generator for one matrix's shuffles, fixed by the run seed and the matrix id."""
    digest = hashlib.blake2b(matrix_id.encode("utf-8"), digest_size=8).digest()
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int.from_bytes(digest, "little")]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def shuffled(matrix: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of `matrix` with all its entries uniformly permuted (same shape)."""
    return rng.permutation(matrix.ravel()).reshape(matrix.shape)


_SPILL = "llm-audit-shuffle-"
_BUCKET = re.compile(r"^bucket-\d{6}\.f32$")


def _prefix() -> str:
    host = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
    return f"{_SPILL}{host}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: running
        return True
    return True


def remove_stale_spills(spill_dir: str | Path | None = None) -> list[Path]:
    """Remove the spill folders that shuffles of dead processes on this host left in
    `spill_dir` (default: the system's temp folder); returns them."""
    folder = Path(spill_dir if spill_dir is not None else tempfile.gettempdir())
    stale = re.compile(re.escape(_prefix()) + r"(\d+)-[A-Za-z0-9_]{8}$")
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = stale.match(path.name)
        if not match or path.is_symlink() or not path.is_dir() or _running(int(match[1])):
            continue
        if path.stat().st_uid != os.getuid():
            continue
        for bucket in path.iterdir():
            if _BUCKET.match(bucket.name) and bucket.is_file() and not bucket.is_symlink():
                bucket.unlink(missing_ok=True)
        try:
            path.rmdir()  # only when nothing else was in it
        except OSError:
            continue
        removed.append(path)
    return removed


class BucketShuffle:
    """Stream rows in with `add`, then read the uniformly shuffled matrix from `blocks`."""

    def __init__(
        self,
        shape: tuple[int, int],
        rng: np.random.Generator,
        *,
        bucket_rows: int,
        spill_dir: str | Path | None = None,
    ) -> None:
        rows, self.cols = shape
        self.shape = shape
        self.rng = rng
        starts = range(0, rows, bucket_rows)
        self.capacity = np.array(
            [min(bucket_rows, rows - s) * self.cols for s in starts], dtype=np.int64
        )
        remove_stale_spills(spill_dir)
        self._tmp = tempfile.TemporaryDirectory(dir=spill_dir, prefix=f"{_prefix()}{os.getpid()}-")
        self.paths = [Path(self._tmp.name) / f"bucket-{b:06d}.f32" for b in range(len(starts))]
        self.handles = []
        try:
            self.handles += [path.open("wb") for path in self.paths]
        except BaseException:
            self.close()
            raise

    def add(self, chunk: np.ndarray) -> None:
        """Scatter the next rows of the matrix over the buckets."""
        flat = self.rng.permutation(np.asarray(chunk, dtype=np.float32).ravel())
        counts = self.rng.multivariate_hypergeometric(self.capacity, flat.size)
        self.capacity -= counts
        for handle, part in zip(self.handles, np.split(flat, np.cumsum(counts)[:-1]), strict=True):
            part.tofile(handle)

    def blocks(self) -> Iterator[np.ndarray]:
        """Row blocks of the shuffled matrix, in order; call once, after every `add`."""
        for handle in self.handles:
            handle.close()
        if self.capacity.any():
            raise ValueError(f"{self.capacity.sum()} fewer entries than shape {self.shape}")
        for path in self.paths:
            bucket = np.fromfile(path, dtype=np.float32)
            path.unlink()
            self.rng.shuffle(bucket)
            yield bucket.reshape(-1, self.cols)

    def close(self) -> None:
        for handle in self.handles:
            handle.close()
        self._tmp.cleanup()

    def __enter__(self) -> BucketShuffle:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
