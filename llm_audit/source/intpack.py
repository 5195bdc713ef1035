"""compressed-tensors' `pack-quantized` integer codes, unpacked exactly.

Why: llm-compressor's W4A16 and W8A16 checkpoints (vLLM's integer weight-only format)
store each Linear as `weight_packed` (int32 words) + `weight_scale`; read without
unpacking, nothing of the model's linear layers would be audited at all. The unpacked
codes times their scales are exactly the weight the model computes with (in float32: a
code of at most 8 bits times a 16-bit scale is exact there).

Layout (compressed_tensors.compressors.pack_quantized.helpers.pack_to_int32): each row of
the [out, in] codes is packed on its own into ceil(in * bits / 32) int32 words, as a
little-endian bit stream: code j occupies bits j*bits .. j*bits + bits - 1, stored as
code + 2^(bits-1) (unsigned). For 1, 2, 4 and 8 bits this is also what earlier
compressed-tensors versions wrote (32 / bits codes per word, lowest first); for other
widths the two differ, so only those four are decoded.
"""

from __future__ import annotations

import numpy as np

from ..errors import DecodeError

BITS = (1, 2, 4, 8)
WORD = 4  # bytes per int32 word


def words_per_row(cols: int, bits: int) -> int:
    """int32 words holding one packed row of `cols` codes."""
    return -(-cols * bits // 32)


def unpack_rows(raw: bytes | memoryview, rows: int, cols: int, bits: int) -> np.ndarray:
    """float32 [rows, cols] signed codes from `rows` packed rows of little-endian int32s."""
    if bits not in BITS:
        raise DecodeError(f"{bits}-bit packed codes are not decoded (only {BITS})")
    words = words_per_row(cols, bits)
    data = np.frombuffer(raw, np.uint8)
    if data.size != rows * words * WORD:
        raise DecodeError(
            f"{data.size} bytes for {rows} packed rows of {cols} {bits}-bit codes "
            f"(expected {rows * words * WORD})"
        )
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    mask = np.uint8((1 << bits) - 1)
    codes = (data.reshape(rows, words * WORD, 1) >> shifts) & mask
    signed = codes.reshape(rows, -1)[:, :cols].astype(np.int16) - (1 << (bits - 1))
    return signed.astype(np.float32)
