"""Decode raw safetensors bytes into numpy arrays the spectral code can use, exactly.

Why not `safetensors.numpy`: it cannot represent BF16 or the FP8 formats, and it reads
whole tensors; here the caller reads exactly the bytes of one matrix and this module turns
them into float32 (float64 for F64) without rounding: every BF16, F16 and FP8 value is
exactly representable in float32, so a spectrum computed from the result is the spectrum
of the stored weights, not of a re-rounded copy.

Bytes are little-endian, as the safetensors format prescribes, whatever the host order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Bytes per element of every whole-byte dtype the safetensors 0.8 header parser accepts
# (its `Dtype` enum; tests/test_dtypes.py checks the set and the sizes against the
# installed parser). Readers use it to validate `data_offsets` against `shape`.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
# Sub-byte dtypes safetensors 0.8 also accepts (packed; a tensor must end on a byte
# boundary). They have no whole-byte size, so they are kept out of DTYPE_SIZES: a reader
# that only knows DTYPE_SIZES rejects them instead of mis-sizing them.
SUBBYTE_DTYPE_BITS: dict[str, int] = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}

# The dtypes that hold weights this project analyzes, and that `decode` accepts.
# F8_E8M0 (scales only), the FNUZ variants and C64 are valid safetensors but are not
# weights of the models we audit; they are reported as skipped, never guessed at.
FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})


def _fp8_table(exponent_bits: int, mantissa_bits: int, *, fn: bool) -> np.ndarray:
    """float32 value of each of the 256 bytes of an FP8 format, from its definition.

    E5M2 is IEEE-like (all-ones exponent: inf for mantissa 0, else NaN). E4M3 is the "fn"
    variant used by safetensors and torch.float8_e4m3fn: no infinities, only S.1111.111 is
    NaN, so the all-ones exponent holds normal numbers and the maximum is 448.
    A table rather than bit arithmetic because 256 entries cover every case, subnormals and
    specials included, and one lookup per byte is as fast as any formula.
    """
    bias = 2 ** (exponent_bits - 1) - 1
    top = 2**exponent_bits - 1
    mantissa_max = 2**mantissa_bits - 1
    table = np.empty(256, dtype=np.float32)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exp = (byte >> mantissa_bits) & top
        man = byte & mantissa_max
        if exp == top and (not fn or man == mantissa_max):
            value = math.nan if (man or fn) else math.inf
        elif exp == 0:
            value = man / 2**mantissa_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + man / 2**mantissa_bits) * 2.0 ** (exp - bias)
        table[byte] = sign * value
    table.flags.writeable = False
    return table


FP8_TABLES: dict[str, np.ndarray] = {
    "F8_E4M3": _fp8_table(4, 3, fn=True),
    "F8_E5M2": _fp8_table(5, 2, fn=False),
}


def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(shape)
    if not all(isinstance(d, int | np.integer) and not isinstance(d, bool) for d in dims) or any(
        d < 0 for d in dims
    ):
        raise ValueError(f"shape {list(dims)} is not a sequence of non-negative ints")
    return tuple(int(d) for d in dims)


def decode(
    raw: bytes | bytearray | memoryview | np.ndarray, dtype: str, shape: tuple[int, ...]
) -> np.ndarray:
    """The float array of `shape` that the little-endian `raw` bytes of `dtype` hold.

    float32 for F8_E4M3, F8_E5M2, F16, BF16 and F32; float64 for F64; values exact.
    `raw` may be any buffer or an ndarray (taken as its raw bytes, e.g. a uint8 slice of a
    memory map); it is never written to, and the result never shares memory with it, so
    the caller may release or reuse the buffer. Apart from the result, no array of its
    size is allocated. Raises ValueError for an unknown or non-float dtype, a malformed
    shape, or a byte count other than prod(shape) x itemsize.
    """
    if dtype not in FLOAT_DTYPES:
        known = dtype in DTYPE_SIZES or dtype in SUBBYTE_DTYPE_BITS
        what = "is not a float weight dtype" if known else "is not a safetensors dtype"
        raise ValueError(f"dtype {dtype!r} {what}; decodable: {', '.join(sorted(FLOAT_DTYPES))}")
    dims = _check_shape(shape)
    if isinstance(raw, np.ndarray):
        if raw.dtype.hasobject:
            raise ValueError("raw is an object array, not bytes")
        data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)  # copies only if strided
    else:
        data = np.frombuffer(raw, dtype=np.uint8)
    expected = math.prod(dims) * DTYPE_SIZES[dtype]
    if data.size != expected:
        raise ValueError(
            f"{data.size} bytes for a {dtype} tensor of shape {list(dims)} (expected {expected})"
        )
    if dtype in FP8_TABLES:
        return FP8_TABLES[dtype][data].reshape(dims)
    if dtype == "BF16":
        # BF16 is the top half of a float32: widen, shift into place, reinterpret.
        wide = data.view("<u2").astype(np.uint32)
        wide <<= 16
        return wide.view(np.float32).reshape(dims)
    if dtype == "F16":
        return data.view("<f2").astype(np.float32).reshape(dims)
    if dtype == "F32":
        return data.view("<f4").astype(np.float32).reshape(dims)
    return data.view("<f8").astype(np.float64).reshape(dims)
