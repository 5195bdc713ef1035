"""MXFP4 (OCP microscaling: FP4 E2M1 elements, blocks of 32, E8M0 scales), decoded exactly.

Why our own decoder: gpt-oss's expert weights are 90% of its bytes and WeightWatcher skips
them; transformers dequantizes them only while building a whole model. Here one expert's
slice is decoded alone, with two table lookups per byte, into float32 — exact, since every
FP4 value times a power of two in range is a float32.

Layout (gpt-oss's safetensors, as transformers' MXFP4 loader reads it):
`blocks[*P, G, 16]` uint8 holds 32 elements per group, low nibble first; `scales[*P, G]`
uint8 is the group's exponent + 127.
Scale byte 255 is NaN in E8M0 (OCP MX spec); the reference decoders do not special-case
it, so a checkpoint containing it is treated as corrupt rather than silently decoded.
"""

from __future__ import annotations

import numpy as np

from ..errors import DecodeError

FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
BLOCK = 32
BYTES_PER_BLOCK = 16
SCALE_NAN = 255
# byte -> (value of low nibble, value of high nibble)
_PAIRS = np.stack([FP4_VALUES[np.arange(256) & 0xF], FP4_VALUES[np.arange(256) >> 4]], axis=1)
# scale byte -> 2**(byte - 127), exact in float32 for bytes 0..254 (2**-127 is subnormal)
with np.errstate(over="ignore"):  # byte 255 -> inf here; it is rejected before any lookup
    _SCALES = np.ldexp(1.0, np.arange(256) - 127).astype(np.float32)


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [*P, G*32] from uint8 blocks [*P, G, 16] and scales [*P, G]."""
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise DecodeError(
            f"MXFP4 blocks and scales must be uint8, got {blocks.dtype}, {scales.dtype}"
        )
    if blocks.ndim < 2 or blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise DecodeError(
            f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)} "
            f"(want blocks [..., G, 16] and scales [..., G])"
        )
    bad = np.flatnonzero(scales == SCALE_NAN)
    if bad.size:
        where = tuple(int(i) for i in np.unravel_index(bad[0], scales.shape))
        raise DecodeError(f"MXFP4 scale byte 255 (NaN in E8M0) at {list(where)}, {bad.size} in all")
    out = _PAIRS[blocks]  # [*P, G, 16, 2]: low nibble is the even element
    with np.errstate(over="ignore"):  # 6 x 2^127 is inf, as in the reference decoders
        out *= _SCALES[scales][..., None, None]
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def encode_mxfp4(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, scales) for float `dense` [*P, K], K divisible by 32: for fixtures and synth.

    Per block of 32: e = floor(log2(max |x|)) - 2 (so the largest lands in [4, 8) and rounds
    to at most 6), scale byte e + 127 clamped to 0..254; an all-zero block gets byte 0.
    Each element becomes the nearest FP4 value of x / 2**e; a tie goes to the smaller
    magnitude (numpy's argmin picks the first of two equally near values).
    """
    dense = np.asarray(dense, dtype=np.float32)
    if dense.shape[-1] % BLOCK:
        raise DecodeError(f"last dimension {dense.shape[-1]} is not a multiple of {BLOCK}")
    groups = dense.reshape(*dense.shape[:-1], dense.shape[-1] // BLOCK, BLOCK)
    amax = np.abs(groups).max(axis=-1)
    with np.errstate(divide="ignore"):
        exponent = np.where(amax > 0, np.floor(np.log2(amax)) - 2, -127)
    scale_bytes = np.clip(exponent + 127, 0, 254).astype(np.uint8)
    scaled = groups / _SCALES[scale_bytes][..., None]
    magnitudes = FP4_VALUES[:8]
    codes = np.abs(np.abs(scaled)[..., None] - magnitudes).argmin(axis=-1).astype(np.uint8)
    codes |= np.where(np.signbit(scaled), 8, 0).astype(np.uint8)
    codes[(codes & 7) == 0] = 0  # no negative zeros: decode(encode(0.0)) is +0.0
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(blocks), np.ascontiguousarray(scale_bytes)
