"""Decode raw safetensors bytes into numpy arrays the spectral code can use, exactly.

Why not `safetensors.numpy`: it cannot represent BF16 or the FP8 formats, and it reads
whole tensors; here the caller reads exactly the bytes of one matrix and this module turns
them into float32 (float64 for F64) without rounding: every BF16, F16 and FP8 value is
exactly representable in float32.
"""

from __future__ import annotations

import math

import numpy as np

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"})


def _fp8_table(exponent_bits: int, mantissa_bits: int, *, fn: bool) -> np.ndarray:
    """float32 value of each of the 256 bytes of an FP8 format.

    E5M2 is IEEE-like (all-ones exponent: inf / NaN). E4M3 is the "fn" variant used by
    safetensors and torch.float8_e4m3fn: no infinities, only S.1111.111 is NaN (max 448).
    """
    bias = 2 ** (exponent_bits - 1) - 1
    top = 2**exponent_bits - 1
    table = np.empty(256, dtype=np.float32)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exp = (byte >> mantissa_bits) & top
        man = byte & (2**mantissa_bits - 1)
        if exp == top and (not fn or man == 2**mantissa_bits - 1):
            value = math.nan if (man or fn) else math.inf
        elif exp == 0:
            value = man / 2**mantissa_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + man / 2**mantissa_bits) * 2.0 ** (exp - bias)
        table[byte] = sign * value
    return table


_FP8 = {"F8_E4M3": _fp8_table(4, 3, fn=True), "F8_E5M2": _fp8_table(5, 2, fn=False)}


def decode(
    raw: bytes | bytearray | memoryview | np.ndarray, dtype: str, shape: tuple[int, ...]
) -> np.ndarray:
    """The float array of `shape` that little-endian `raw` bytes of `dtype` hold.

    float32 for FP8, F16, BF16 and F32; float64 for F64. Raises ValueError for a non-float
    dtype or a byte count that does not match the shape.
    """
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype {dtype} does not hold float weights")
    data = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if data.nbytes != expected:
        raise ValueError(
            f"{data.nbytes} bytes for a {dtype} tensor of shape {list(shape)} (expected {expected})"
        )
    data = data.reshape(-1).view(np.uint8)
    if dtype in _FP8:
        return _FP8[dtype][data].reshape(shape)
    if dtype == "BF16":
        return (data.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype == "F16":
        return data.view("<f2").astype(np.float32).reshape(shape)
    if dtype == "F32":
        return data.view("<f4").reshape(shape).astype(np.float32, copy=True)
    return data.view("<f8").reshape(shape).astype(np.float64, copy=True)
