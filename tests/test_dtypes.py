"""Raw safetensors bytes decode exactly, for every bit pattern of the narrow formats."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_audit.source.dtypes import decode


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equal, NaN equal to NaN."""
    return bool(np.all((a == b) & (np.signbit(a) == np.signbit(b)) | (np.isnan(a) & np.isnan(b))))


def test_bf16_every_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint16)
    ours = decode(bits.tobytes(), "BF16", (2**16,))
    ref = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert ours.dtype == np.float32 and _same(ours, ref)


def test_f16_every_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint16)
    assert _same(decode(bits.tobytes(), "F16", (2**16,)), bits.view(np.float16).astype(np.float32))


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)]
)
def test_fp8_tables_every_byte(dtype, torch_dtype):
    raw = np.arange(256, dtype=np.uint8)
    ref = torch.from_numpy(raw).view(torch_dtype).float().numpy()
    assert _same(decode(raw.tobytes(), dtype, (16, 16)).ravel(), ref)


def test_f32_f64_and_shapes():
    x = np.random.default_rng(0).standard_normal((3, 4))
    assert np.array_equal(decode(x.astype("<f4").tobytes(), "F32", (3, 4)), x.astype(np.float32))
    out = decode(x.tobytes(), "F64", (3, 4))
    assert out.dtype == np.float64 and np.array_equal(out, x)
    assert out.flags.writeable


def test_bad_lengths_and_dtypes():
    with pytest.raises(ValueError, match=r"5 bytes for a BF16 tensor of shape \[2\]"):
        decode(b"\0" * 5, "BF16", (2,))
    with pytest.raises(ValueError, match="does not hold float weights"):
        decode(b"\0" * 4, "I32", (1,))
