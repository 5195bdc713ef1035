"""Raw safetensors bytes decode exactly, for every bit pattern of the narrow formats; every
dtype safetensors can hold is known, and those we do not decode are skipped with a reason."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.dtypes import DTYPE_BITS, decode, tensor_nbytes
from llm_audit.source.reference import resolve_model


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


def _raw_safetensors(path, entries: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file written byte by byte (any dtype, even those numpy lacks)."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _safetensors_dtypes(tmp_path) -> list[str]:
    """The installed safetensors' own dtype list, from its refusal of an unknown one."""
    path = tmp_path / "unknown.safetensors"
    _raw_safetensors(path, {"x": ("NOT_A_DTYPE", [1], b"\0")})
    with pytest.raises(Exception, match="expected one of") as refused:
        safe_open(path, "np")
    return re.findall(r"`([A-Z0-9_]+)`", str(refused.value).split("expected one of", 1)[1])


def test_dtype_list_in_step_with_safetensors(tmp_path):
    theirs = _safetensors_dtypes(tmp_path)
    assert sorted(theirs) == sorted(DTYPE_BITS)
    # and the sizes: safetensors accepts 8 elements of each in exactly 8 x bits / 8 bytes
    for dtype, bits in DTYPE_BITS.items():
        path = tmp_path / f"{dtype}.safetensors"
        _raw_safetensors(path, {"x": (dtype, [8], b"\0" * bits)})
        with safe_open(path, "np") as handle:
            assert list(handle.keys()) == ["x"]
        assert tensor_nbytes(dtype, [8]) == bits
    assert tensor_nbytes("F4", [3]) is None  # 12 bits: no whole number of bytes
    assert tensor_nbytes("NOT_A_DTYPE", [1]) is None


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"),
    [
        ("F8_E4M3FNUZ", torch.float8_e4m3fnuz),
        ("F8_E5M2FNUZ", torch.float8_e5m2fnuz),
        ("F8_E8M0", torch.float8_e8m0fnu),  # decoded for ue8m0 / MX scales only
    ],
)
def test_fnuz_and_e8m0_tables_every_byte(dtype, torch_dtype):
    raw = np.arange(256, dtype=np.uint8)
    ref = torch.from_numpy(raw).view(torch_dtype).float().numpy()
    assert _same(decode(raw.tobytes(), dtype, (16, 16)).ravel(), ref)


def test_mixed_dtypes_audit_the_floats_and_skip_the_rest_with_reasons(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    matrix = np.random.default_rng(0).standard_normal((32, 16)).astype("<f4")
    _raw_safetensors(
        folder / "model.safetensors",
        {
            "proj.weight": ("F32", [32, 16], matrix.tobytes()),
            "rotary.weight": ("C64", [16, 16], np.ones((16, 16), "<c8").tobytes()),
            "codes.weight": ("I8", [16, 16], b"\1" * 256),
            "packed.weight": ("F4", [16, 16], b"\x22" * 128),
            "six.weight": ("F6_E2M3", [16, 16], b"\0" * 192),
            "exps.weight": ("F8_E8M0", [16, 16], b"\x7f" * 256),
            "amd.weight": ("F8_E4M3FNUZ", [16, 16], b"\x40" * 256),
        },
    )
    with safe_open(folder / "model.safetensors", "pt") as handle:  # safetensors opens it
        assert len(list(handle.keys())) == 7
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    plan = checkpoint.plan(8)
    assert [u.id for u in plan.units] == ["proj.weight", "amd.weight"]
    assert np.array_equal(checkpoint.read_matrix(plan.units[0]), matrix)
    assert np.all(checkpoint.read_matrix(plan.units[1]) == 1.0)  # 0x40 in E4M3FNUZ
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons == {
        "rotary.weight": "complex tensor (C64), not real weights",
        "codes.weight": "not a float tensor (I8)",
        "packed.weight": "packed 4-bit float (F4), not decoded",
        "six.weight": "packed 6-bit float (F6_E2M3), not decoded",
        "exps.weight": "power-of-two scales (F8_E8M0), not weights",
    }
