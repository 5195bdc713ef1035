"""Raw safetensors bytes decode exactly, for every bit pattern of the narrow formats.

References: torch's own bfloat16 / float8 conversions and numpy's float16, over every bit
pattern; the dtype table against the installed safetensors parser itself.
"""

from __future__ import annotations

import json
import re
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors import safe_open

from llm_audit.dtypes import DTYPE_SIZES, FLOAT_DTYPES, SUBBYTE_DTYPE_BITS, decode

ALL_16_BITS = np.arange(2**16, dtype=np.uint16)
ALL_BYTES = np.arange(256, dtype=np.uint8)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal values with equal signs (so -0.0 != +0.0), NaN equal to NaN; dtypes equal."""
    same = ((a == b) & (np.signbit(a) == np.signbit(b))) | (np.isnan(a) & np.isnan(b))
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.all(same))


def _bits(dtype: str, count: int, seed: int = 0) -> bytes:
    """`count` elements' worth of random bytes: every bit pattern is a valid input."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=count * DTYPE_SIZES[dtype], dtype=np.uint8).tobytes()


def test_bf16_every_bit_pattern_matches_torch():
    ours = decode(ALL_16_BITS.astype("<u2").tobytes(), "BF16", (2**16,))
    ref = torch.from_numpy(ALL_16_BITS.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert _same(ours, ref)


def test_f16_every_bit_pattern_matches_numpy_and_torch():
    ours = decode(ALL_16_BITS.astype("<u2").tobytes(), "F16", (256, 256))
    assert _same(ours.ravel(), ALL_16_BITS.view(np.float16).astype(np.float32))
    ref = torch.from_numpy(ALL_16_BITS.view(np.int16)).view(torch.float16).float().numpy()
    assert _same(ours.ravel(), ref)


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)]
)
def test_fp8_every_byte_matches_torch(dtype, torch_dtype):
    ref = torch.from_numpy(ALL_BYTES).view(torch_dtype).float().numpy()
    assert _same(decode(ALL_BYTES.tobytes(), dtype, (16, 16)).ravel(), ref)


def test_fp8_tables_follow_the_format_definitions():
    """Anchors independent of torch: the specials and extremes of each format."""
    e4m3 = decode(ALL_BYTES.tobytes(), "F8_E4M3", (256,))
    assert e4m3[0x7E] == 448 and e4m3[0xFE] == -448  # max: S.1111.110
    assert np.isnan(e4m3[[0x7F, 0xFF]]).all() and np.isnan(e4m3).sum() == 2  # only S.1111.111
    assert not np.isinf(e4m3).any()  # the "fn" variant has no infinities
    assert e4m3[0x01] == 2.0**-9 and e4m3[0x08] == 2.0**-6 and e4m3[0x38] == 1.0
    assert e4m3[0x00] == 0 and not np.signbit(e4m3[0x00]) and np.signbit(e4m3[0x80])
    e5m2 = decode(ALL_BYTES.tobytes(), "F8_E5M2", (256,))
    assert e5m2[0x7C] == np.inf and e5m2[0xFC] == -np.inf
    assert np.isnan(e5m2[[0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]]).all() and np.isnan(e5m2).sum() == 6
    assert e5m2[0x7B] == 57344 and e5m2[0x01] == 2.0**-16 and e5m2[0x3C] == 1.0


def test_f32_and_f64_are_bit_exact_copies():
    raw32 = _bits("F32", 4096)  # random patterns: subnormals, infs, NaNs with payloads
    out32 = decode(raw32, "F32", (64, 64))
    assert out32.dtype == np.float32 and out32.tobytes() == raw32
    raw64 = _bits("F64", 4096)
    out64 = decode(raw64, "F64", (4096,))
    assert out64.dtype == np.float64 and out64.tobytes() == raw64


@pytest.mark.parametrize("dtype", sorted(FLOAT_DTYPES))
def test_every_buffer_kind_gives_the_same_result(dtype):
    raw = _bits(dtype, 60, seed=1)
    want = decode(raw, dtype, (3, 4, 5))
    assert want.dtype == (np.float64 if dtype == "F64" else np.float32)
    unaligned = memoryview(b"\0" + raw)[1:]  # an odd address: no alignment assumed
    as_u8 = np.frombuffer(raw, np.uint8)
    strided = np.repeat(as_u8, 2)[::2]  # not contiguous: taken in logical order
    for source in (bytearray(raw), unaligned, as_u8, strided, as_u8.view(np.int8).reshape(2, -1)):
        assert _same(decode(source, dtype, (3, 4, 5)), want)


@pytest.mark.parametrize("dtype", sorted(FLOAT_DTYPES))
def test_result_is_a_writable_copy_that_leaves_the_input_alone(dtype):
    source = np.frombuffer(_bits(dtype, 8), np.uint8).copy()
    before = source.copy()
    out = decode(source, dtype, (8,))
    assert out.flags.writeable and out.flags.c_contiguous
    assert not np.shares_memory(out, source)
    out[:] = 0
    assert np.array_equal(source, before)


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F8_E4M3", "F32", "F64"])
def test_no_second_array_of_the_result_size(dtype):
    raw = _bits(dtype, 1 << 18)
    tracemalloc.start()
    try:
        out = decode(raw, dtype, (512, 512))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= out.nbytes * 1.05 + 65536


def test_shapes_scalar_and_empty():
    assert decode(np.float32(2.5).tobytes(), "F32", ()).shape == ()
    assert decode(np.float32(2.5).tobytes(), "F32", ())[()] == 2.5
    for shape in [(0,), (2, 0, 3)]:
        out = decode(b"", "BF16", shape)
        assert out.shape == shape and out.dtype == np.float32
    assert decode(b"\0" * 8, "F16", (np.int64(2), 2)).shape == (2, 2)


def test_wrong_lengths_are_errors():
    with pytest.raises(
        ValueError, match=r"5 bytes for a BF16 tensor of shape \[2\] \(expected 4\)"
    ):
        decode(b"\0" * 5, "BF16", (2,))
    for dtype in FLOAT_DTYPES:
        size = DTYPE_SIZES[dtype]
        for count in (6 * size - 1, 6 * size + 1, 0):
            with pytest.raises(ValueError, match=f"{count} bytes for a {dtype} tensor"):
                decode(b"\0" * count, dtype, (2, 3))


def test_bad_shapes_are_errors():
    for shape in [(-1, -4), (2.0,), (True, 2), ("2",)]:
        with pytest.raises(ValueError, match="not a sequence of non-negative ints"):
            decode(b"\0" * 8, "F32", shape)


def test_non_float_and_unknown_dtypes_are_errors():
    for dtype in ["I32", "U8", "BOOL", "F8_E8M0", "F8_E4M3FNUZ", "C64", "F4"]:
        with pytest.raises(ValueError, match=f"dtype '{dtype}' is not a float weight dtype"):
            decode(b"\0" * 8, dtype, (1,))
    for dtype in ["F128", "bf16", ""]:
        with pytest.raises(ValueError, match="is not a safetensors dtype"):
            decode(b"\0" * 8, dtype, (4,))
    with pytest.raises(ValueError, match="object array"):
        decode(np.array([b"ab", b"cd"], dtype=object), "F16", (2,))


def test_float_dtypes_are_the_weight_formats():
    assert FLOAT_DTYPES == {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}
    assert FLOAT_DTYPES <= DTYPE_SIZES.keys()
    assert not DTYPE_SIZES.keys() & SUBBYTE_DTYPE_BITS.keys()


def _opens(tmp_path, dtype: str, shape: list[int], nbytes: int) -> str | None:
    """None if safetensors accepts a one-tensor file, else its error message."""
    header = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}})
    header += " " * (-len(header) % 8)
    path = tmp_path / "probe.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * nbytes)
    try:
        with safe_open(str(path), framework="numpy"):
            return None
    except Exception as err:  # noqa: BLE001 - the parser raises several types
        return str(err)


def test_dtype_table_matches_the_safetensors_parser(tmp_path):
    for dtype, size in DTYPE_SIZES.items():
        assert _opens(tmp_path, dtype, [3], 3 * size) is None, dtype
        assert _opens(tmp_path, dtype, [3], 3 * size + 1) is not None, dtype
    for dtype, bits in SUBBYTE_DTYPE_BITS.items():
        assert _opens(tmp_path, dtype, [8], 8 * bits // 8) is None, dtype
    message = _opens(tmp_path, "NOT_A_DTYPE", [1], 1) or ""
    listed = re.search(r"expected one of (.*?) at line", message)
    if listed is None:
        pytest.skip(f"safetensors no longer lists its dtypes in this error: {message!r}")
    names = set(re.findall(r"`(\w+)`", listed.group(1)))
    assert names == DTYPE_SIZES.keys() | SUBBYTE_DTYPE_BITS.keys()
