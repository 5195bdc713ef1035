"""Decode raw safetensors bytes into numpy arrays the spectral code can use, exactly.

Why not `safetensors.numpy`: it cannot represent BF16 or the FP8 formats, and it reads
whole tensors; here the caller reads exactly the bytes of one matrix and this module turns
them into float32 (float64 for F64) without rounding: every BF16, F16 and FP8 value is
exactly representable in float32.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

# Every dtype safetensors 0.8 can hold, with its size in bits (tests/test_dtypes.py keeps
# this in step with the installed safetensors' own list).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
# Bytes per element of the whole-byte dtypes (sub-byte F4 / F6 have none).
DTYPE_SIZES: dict[str, int] = {d: b // 8 for d, b in DTYPE_BITS.items() if b % 8 == 0}
FLOAT_DTYPES = frozenset(
    {"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F16", "BF16", "F32", "F64"}
)
# Decoded too, but only as scales: E8M0 holds powers of two (MX / ue8m0 block scales).
SCALE_ONLY_DTYPES = frozenset({"F8_E8M0"})
_NOT_WEIGHTS = {
    "F4": "packed 4-bit float (F4), not decoded",
    "F6_E2M3": "packed 6-bit float (F6_E2M3), not decoded",
    "F6_E3M2": "packed 6-bit float (F6_E3M2), not decoded",
    "F8_E8M0": "power-of-two scales (F8_E8M0), not weights",
    "C64": "complex tensor (C64), not real weights",
    "BOOL": "not a float tensor (BOOL)",
}


class TensorMeta(Protocol):
    """What planning needs to know of a tensor (a safetensors header entry)."""

    dtype: str
    shape: tuple[int, ...]


def tensor_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int | None:
    """Bytes a tensor of `dtype` and `shape` takes in a safetensors file; None when the
    dtype is unknown or its bits do not fill whole bytes (safetensors refuses those)."""
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        return None
    total = math.prod(shape) * bits
    return None if total % 8 else total // 8


def not_float_reason(dtype: str) -> str:
    """Why a tensor of `dtype` is not audited as a weight matrix (for a non-float dtype)."""
    return _NOT_WEIGHTS.get(dtype, f"not a float tensor ({dtype})")


def _fp8_table(
    exponent_bits: int, mantissa_bits: int, *, fn: bool, fnuz: bool = False
) -> np.ndarray:
    """float32 value of each of the 256 bytes of an FP8 format.

    E5M2 is IEEE-like (all-ones exponent: inf / NaN). E4M3 is the "fn" variant used by
    safetensors and torch.float8_e4m3fn: no infinities, only S.1111.111 is NaN (max 448).
    The "fnuz" variants (AMD; torch.float8_e4m3fnuz / e5m2fnuz) have an exponent bias one
    larger, no infinities, no negative zero, and one NaN: the byte 0x80.
    """
    bias = 2 ** (exponent_bits - 1) - 1 + fnuz
    top = 2**exponent_bits - 1
    table = np.empty(256, dtype=np.float32)
    for byte in range(256):
        sign = -1.0 if byte & 0x80 else 1.0
        exp = (byte >> mantissa_bits) & top
        man = byte & (2**mantissa_bits - 1)
        if fnuz:
            if byte == 0x80:
                value = math.nan
            elif exp == 0:
                value = man / 2**mantissa_bits * 2.0 ** (1 - bias)
            else:
                value = (1 + man / 2**mantissa_bits) * 2.0 ** (exp - bias)
        elif exp == top and (not fn or man == 2**mantissa_bits - 1):
            value = math.nan if (man or fn) else math.inf
        elif exp == 0:
            value = man / 2**mantissa_bits * 2.0 ** (1 - bias)
        else:
            value = (1 + man / 2**mantissa_bits) * 2.0 ** (exp - bias)
        table[byte] = sign * value
    return table


_FP8 = {
    "F8_E4M3": _fp8_table(4, 3, fn=True),
    "F8_E5M2": _fp8_table(5, 2, fn=False),
    "F8_E4M3FNUZ": _fp8_table(4, 3, fn=True, fnuz=True),
    "F8_E5M2FNUZ": _fp8_table(5, 2, fn=True, fnuz=True),
    # E8M0: the byte is a biased exponent, 2^(byte - 127); 0xFF is NaN.
    "F8_E8M0": np.array([2.0 ** (b - 127) for b in range(255)] + [np.nan], dtype=np.float32),
}


def decode(
    raw: bytes | bytearray | memoryview | np.ndarray, dtype: str, shape: tuple[int, ...]
) -> np.ndarray:
    """The float array of `shape` that little-endian `raw` bytes of `dtype` hold.

    float32 for FP8 (and E8M0 scales), F16, BF16 and F32; float64 for F64. Raises
    ValueError for a non-float dtype or a byte count that does not match the shape.
    """
    if dtype not in FLOAT_DTYPES and dtype not in SCALE_ONLY_DTYPES:
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
