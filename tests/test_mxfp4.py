"""MXFP4 decoding is bit-exact against transformers; scale 255 and bad pairs are errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_audit.errors import DecodeError
from llm_audit.source.mxfp4 import decode_mxfp4, encode_mxfp4


def _transformers(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """transformers' dequantization, in float32, back in our (out, in) orientation.

    `convert_moe_packed_tensors` takes [E, rows, G, 16] and returns [E, G*32, rows]
    (it transposes to the [E, in, out] layout its experts use).
    """
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    out = convert_moe_packed_tensors(
        torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
    )
    return out.transpose(1, 2).numpy()


def _bitwise_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_all_256_bytes_at_several_scales_match_transformers():
    scales_used = np.array([0, 1, 100, 125, 127, 128, 140, 254], dtype=np.uint8)
    # rows = scales; each row: all 256 bytes as 16 groups of 16 bytes
    blocks = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (len(scales_used), 1, 1))
    scales = np.repeat(scales_used[:, None], 16, axis=1)
    ours = decode_mxfp4(blocks[None], scales[None])
    assert _bitwise_equal(ours, _transformers(blocks[None], scales[None]))


def test_random_expert_slices_match_transformers():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(3, 64, 4, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, size=(3, 64, 4), dtype=np.uint8)
    ours = decode_mxfp4(blocks, scales)
    assert ours.shape == (3, 64, 128) and ours.dtype == np.float32
    assert _bitwise_equal(ours, _transformers(blocks, scales))
    assert _bitwise_equal(decode_mxfp4(blocks[1], scales[1]), ours[1])  # one expert alone


def test_worked_example_from_the_reference():
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, :2] = [0x21, 0xF8]
    out = decode_mxfp4(blocks, np.array([127], np.uint8))
    assert out[:4].tolist() == [0.5, 1.0, -0.0, -6.0] and np.signbit(out[2])
    assert not out[4:].any()
    assert decode_mxfp4(blocks, np.array([128], np.uint8))[:4].tolist() == [1.0, 2.0, -0.0, -12.0]
    assert decode_mxfp4(blocks, np.array([125], np.uint8))[:4].tolist() == [0.125, 0.25, -0.0, -1.5]


def test_scale_255_and_bad_pairs_are_errors():
    blocks = np.zeros((2, 3, 16), np.uint8)
    scales = np.full((2, 3), 127, np.uint8)
    scales[1, 2] = 255
    with pytest.raises(DecodeError, match=r"scale byte 255 .* at \[1, 2\]"):
        decode_mxfp4(blocks, scales)
    with pytest.raises(DecodeError, match="do not match"):
        decode_mxfp4(blocks, scales[:, :2])
    with pytest.raises(DecodeError, match="uint8"):
        decode_mxfp4(blocks.astype(np.int16), scales)


def test_encode_round_trips_grid_values_and_quantizes_gaussians():
    rng = np.random.default_rng(1)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)
    factor = 2.0 ** rng.integers(-8, 8, size=(4, 2)).repeat(32, axis=1)
    on_grid = rng.choice(grid, size=(4, 64)) * rng.choice([-1.0, 1.0], size=(4, 64))
    on_grid[:, ::32] = 6.0  # each block's max is 6 x its power of two
    on_grid = (on_grid * factor).astype(np.float32)
    on_grid[on_grid == 0] = 0.0  # encode writes +0.0
    blocks, scales = encode_mxfp4(on_grid)
    assert blocks.flags.c_contiguous and blocks.shape == (4, 2, 16) and scales.shape == (4, 2)
    assert np.array_equal(decode_mxfp4(blocks, scales), on_grid)
    gauss = rng.standard_normal((8, 256)).astype(np.float32)
    decoded = decode_mxfp4(*encode_mxfp4(gauss))
    step = np.repeat(np.abs(gauss).reshape(8, 8, 32).max(-1), 32, axis=1) / 4  # max FP4 gap / 2
    assert np.all(np.abs(decoded - gauss) <= step + 1e-7)
    assert not decode_mxfp4(*encode_mxfp4(np.zeros((1, 32)))).any()
