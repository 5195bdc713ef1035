"""MXFP4 (OCP microscaling: FP4 E2M1 elements, blocks of 32, E8M0 scales), decoded exactly.

Why our own decoder: gpt-oss's expert weights are 90% of its bytes and WeightWatcher skips
them; transformers dequantizes them only while building a whole model. Here one expert's
slice is decoded alone, with two table lookups per byte, into float32 — exact, since every
FP4 value times a power of two in range is a float32 (and a bf16).

Layout (shared/reference/gpt-oss-format.md): `blocks[*P, G, 16]` uint8 holds 32 elements
per group, low nibble first; `scales[*P, G]` uint8 is the group's exponent + 127.

Scale byte 255 is NaN in E8M0 (OCP MX spec v1.0). The reference decoders (transformers'
`convert_moe_packed_tensors`, openai's) do not special-case it: they compute 2**128, i.e.
inf, so the group decodes to inf and NaN (0 x inf) and poisons every singular value of the
matrix. No encoder writes it for finite weights, so a checkpoint containing it is treated
as corrupt and rejected, rather than silently decoded to garbage.
"""

from __future__ import annotations

import numpy as np

FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
FP4_VALUES.flags.writeable = False
BLOCK = 32
BYTES_PER_BLOCK = 16
SCALE_BIAS = 127
SCALE_NAN = 255

# byte -> (value of low nibble, value of high nibble): one lookup decodes both elements.
_PAIRS = np.stack([FP4_VALUES[np.arange(256) & 0xF], FP4_VALUES[np.arange(256) >> 4]], axis=1)
# scale byte -> 2**(byte - 127), exact in float32 for bytes 0..254 (2**-127 is subnormal).
# Byte 255 maps to inf here; it is rejected before any lookup.
with np.errstate(over="ignore"):
    _SCALES = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - SCALE_BIAS)
# Groups decoded per step: bounds the lookup's index temporary (np.take converts the uint8
# indices to intp, 8x their size) to ~0.5 MB and keeps each step's output in cache.
_GROUPS_PER_STEP = 4096
# Rounding to FP4: (midpoint between magnitude codes c and c+1, whether a tie goes up).
# Ties go to the even code (the value with mantissa bit 0), i.e. IEEE roundTiesToEven as
# the OCP spec asks for conversions: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
# 3.5 -> 4, 5 -> 4. Beyond 6 every magnitude rounds to 6 (FP4 has no inf: saturate).
_MIDPOINTS = (
    (0.25, False),
    (0.75, True),
    (1.25, False),
    (1.75, True),
    (2.5, False),
    (3.5, True),
    (5.0, False),
)
_PAIRS.flags.writeable = False
_SCALES.flags.writeable = False


class MXFP4Error(ValueError):
    """MXFP4 blocks and scales that cannot be decoded, or values that cannot be encoded."""


def decode_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [*P, G*32] from uint8 blocks [*P, G, 16] and scales [*P, G], bit-exact.

    dense[..., 32g + 2j] = FP4[blocks[..., g, j] & 15] * 2**(scales[..., g] - 127), and
    element 32g + 2j + 1 likewise from the high nibble. Scale 254 can overflow to +-inf
    (6 x 2**127), as in the reference decoders; scale 255 raises MXFP4Error (see module
    docstring), as do non-uint8 inputs and shapes that do not pair up.
    Memory: the result plus O(_GROUPS_PER_STEP) bytes of temporaries.
    """
    if not isinstance(blocks, np.ndarray) or not isinstance(scales, np.ndarray):
        raise MXFP4Error("MXFP4 blocks and scales must be numpy arrays")
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise MXFP4Error(
            f"MXFP4 blocks and scales must be uint8, got {blocks.dtype}, {scales.dtype}"
        )
    if blocks.ndim < 2 or blocks.shape[-1] != BYTES_PER_BLOCK or blocks.shape[:-1] != scales.shape:
        raise MXFP4Error(
            f"MXFP4 blocks {list(blocks.shape)} do not match scales {list(scales.shape)} "
            f"(want blocks [..., G, {BYTES_PER_BLOCK}] and scales [..., G])"
        )
    nan_scale = scales == SCALE_NAN
    if nan_scale.any():
        first = int(np.argmax(nan_scale))
        where = [int(i) for i in np.unravel_index(first, scales.shape)]
        raise MXFP4Error(
            f"MXFP4 scale byte {SCALE_NAN} (NaN in E8M0) at position {where}, "
            f"{int(np.count_nonzero(nan_scale))} in all"
        )
    flat_blocks = blocks.reshape(-1, BYTES_PER_BLOCK)  # a view unless blocks is strided
    flat_scales = scales.reshape(-1)
    out = np.empty((flat_blocks.shape[0], BYTES_PER_BLOCK, 2), dtype=np.float32)
    with np.errstate(over="ignore"):  # 6 x 2**127 is inf, as in the reference decoders
        for start in range(0, flat_blocks.shape[0], _GROUPS_PER_STEP):
            stop = start + _GROUPS_PER_STEP
            step = out[start:stop]
            # [n, 16] bytes -> [n, 16, 2] values; the low nibble is the even element.
            # mode="clip" only skips numpy's buffered bounds check: a byte is always < 256.
            np.take(_PAIRS, flat_blocks[start:stop], axis=0, out=step, mode="clip")
            step *= _SCALES[flat_scales[start:stop]][:, None, None]
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK)


def encode_mxfp4(dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(blocks, scales) for float `dense` [*P, K], K divisible by 32: for fixtures and synth.

    Per block of 32: e = floor(log2(max |x|)) - 2, so the largest magnitude lands in [4, 8)
    (FP4's top binade) and the block keeps the most precision; scale byte e + 127, clamped
    to 0..254 (254: 255 is E8M0's NaN). An all-zero block gets byte 0, any byte would keep
    it exact. Each element becomes the nearest FP4 value of x / 2**e, ties to the even code
    (see _MIDPOINTS), magnitudes beyond 6 saturate to 6 (the OCP rule; only the largest
    elements of a block, in [7, 8) x 2**e, or a clamped scale, reach it). The sign is kept,
    zeros included, so decode(encode(x)) is bit-identical to x for any x on the MXFP4 grid
    (whose per-block scales are in range), -0.0 included.

    float64 input is rounded from float64 directly; other float dtypes via float32. Raises
    MXFP4Error for non-float or non-finite input or K not a multiple of 32.
    Returns C-contiguous uint8 arrays (safetensors rejects non-contiguous ones).
    """
    dense = np.asarray(dense)
    if not np.issubdtype(dense.dtype, np.floating):
        raise MXFP4Error(f"MXFP4 encodes float arrays, got {dense.dtype}")
    if dense.ndim < 1 or dense.shape[-1] % BLOCK:
        raise MXFP4Error(f"last dimension of {list(dense.shape)} is not a multiple of {BLOCK}")
    if not np.isfinite(dense).all():
        raise MXFP4Error("MXFP4 cannot encode inf or NaN")
    work = dense.astype(np.float64 if dense.dtype == np.float64 else np.float32, copy=False)
    groups = work.reshape(*work.shape[:-1], work.shape[-1] // BLOCK, BLOCK)
    amax = np.maximum(groups.max(axis=-1, initial=0), -groups.min(axis=-1, initial=0))
    _, binade = np.frexp(amax)  # amax = m * 2**binade, m in [0.5, 1): exact floor(log2) + 1
    exponent = np.where(amax > 0, binade.astype(np.int32) - 1 - 2, -SCALE_BIAS)
    scale_bytes = np.clip(exponent + SCALE_BIAS, 0, SCALE_NAN - 1).astype(np.uint8)
    scaled = np.ldexp(groups, (SCALE_BIAS - scale_bytes.astype(np.int32))[..., None])  # exact
    negative = np.signbit(scaled)
    magnitude = np.abs(scaled, out=scaled)
    codes = np.zeros(magnitude.shape, dtype=np.uint8)
    for midpoint, tie_up in _MIDPOINTS:
        codes += (magnitude >= midpoint) if tie_up else (magnitude > midpoint)
    np.bitwise_or(codes, 8, out=codes, where=negative)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(blocks, dtype=np.uint8), np.ascontiguousarray(scale_bytes)
