"""Validated safetensors headers, and byte-range reads that trust only validated offsets.

Why our own parser: a checkpoint comes from the internet and can lie in every field, and
every later read uses the header's offsets. So before any offset is used we check what
safetensors 0.8 itself checks when it loads a file (`Metadata::validate` and
`SafeTensors::deserialize`) — header length capped at 100 MB, UTF-8 JSON object, known
dtypes, byte ranges that match shape x itemsize, tensors that tile the data area with no
gap or overlap and end exactly at the end of the file — plus a few things it leaves open:
duplicate JSON keys, non-integer or boolean numbers, control, format (bidi) or
surrogate characters in names, absurd ranks. Reading the header never touches the data area.

Every failure is a `CheckpointError` naming the file (and the tensor, where one is at
fault) in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..inputs import first_line
from .dtypes import DTYPE_BITS, tensor_nbytes

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own MAX_HEADER_SIZE
MAX_RANK = 16
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; `start`/`end` are absolute byte offsets in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Header:
    """A validated header. `header_sha256` identifies the file without hashing its data."""

    path: Path
    file_size: int
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_sha256: str


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key[:60]!r}")
        seen[key] = value
    return seen


def _short(value: Any) -> str:
    """repr capped at 60 characters: a hostile header can hold megabytes in one field."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Control (C0, DEL, C1), format (bidi overrides, zero-width joiners), surrogate (a JSON
# "\\ud800" escape decodes to a lone one, which no UTF-8 writer can encode) and line or
# paragraph separator characters: none belongs in a tensor name, and each can drive a
# terminal, reorder a printed line, or abort a Parquet write far from the header.
_BAD_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _check_name(path: Path, name: str) -> None:
    if not name:
        raise CheckpointError(path, "tensor name is empty", name)
    if name.isprintable():  # fast path: every printable name passes
        return
    bad = [c for c in name if unicodedata.category(c) in _BAD_NAME_CATEGORIES]
    if bad:
        raise CheckpointError(
            path,
            f"tensor name has control, format or surrogate characters (U+{ord(bad[0]):04X})",
            name,
        )


def _parse_entry(path: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    _check_name(path, name)
    if not isinstance(entry, dict):
        raise CheckpointError(path, "header entry is not an object", name)
    keys = set(entry)
    if keys != _ENTRY_KEYS:
        missing, extra = sorted(_ENTRY_KEYS - keys), sorted(keys - _ENTRY_KEYS)
        raise CheckpointError(path, f"header entry keys: missing {missing}, unknown {extra}", name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise CheckpointError(path, f"unknown dtype {_short(dtype)}", name)
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        raise CheckpointError(
            path,
            f"shape {_short(shape)} is not a list of at most {MAX_RANK} non-negative ints",
            name,
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(
            path, f"data_offsets {_short(offsets)} are not [begin, end], 0 <= begin <= end", name
        )
    expected = tensor_nbytes(dtype, shape)
    if expected is None:
        raise CheckpointError(
            path, f"{math.prod(shape)} {dtype} values are not a whole number of bytes", name
        )
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            path,
            f"byte range {offsets[1] - offsets[0]} != shape {shape} x {dtype} size ({expected})",
            name,
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _read_prefix(path: Path, max_header_bytes: int) -> tuple[bytes, int]:
    try:
        info = path.stat()
    except OSError as err:
        raise CheckpointError(path, f"cannot open ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(path, "not a regular file")
    if info.st_size < 8:
        raise CheckpointError(path, f"file of {info.st_size} bytes has no 8-byte header length")
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length == 0:
            raise CheckpointError(path, "header length is 0")
        if length > max_header_bytes:
            raise CheckpointError(
                path, f"header length {length} exceeds the {max_header_bytes}-byte cap"
            )
        if length > info.st_size - 8:
            raise CheckpointError(
                path, f"header length {length} larger than the file ({info.st_size} bytes)"
            )
        raw = handle.read(length)
    if len(raw) != length:
        raise CheckpointError(path, "file shrank while its header was read")
    return raw, info.st_size


def read_header(path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> Header:
    """Parse and validate the header of a safetensors file (reads 8 + header bytes only)."""
    path = Path(path)
    raw, file_size = _read_prefix(path, max_header_bytes)
    try:
        text = raw.decode("utf-8")
        parsed = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise CheckpointError(path, "header is not valid UTF-8") from None
    except (ValueError, RecursionError) as err:
        raise CheckpointError(path, f"header is not valid JSON ({first_line(err)})") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(path, "header JSON is not an object")
    # null is what MLX writes without metadata; safetensors reads it as none
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(path, "__metadata__ must map strings to strings")
    data_start = 8 + len(raw)
    tensors = sorted(
        (_parse_entry(path, name, entry, data_start) for name, entry in parsed.items()),
        key=lambda t: (t.start, t.end),
    )
    position = data_start
    for tensor in tensors:
        if tensor.start != position:
            problem = "overlaps the previous tensor" if tensor.start < position else "leaves a gap"
            raise CheckpointError(
                path, f"data range {problem} (safetensors requires contiguous tensors)", tensor.name
            )
        position = tensor.end
    if position != file_size:
        raise CheckpointError(
            path,
            f"tensors end at byte {position} but the file has "
            f"{file_size} bytes (truncated or padded)",
        )
    digest = hashlib.sha256(len(raw).to_bytes(8, "little") + raw).hexdigest()
    return Header(path, file_size, data_start, {t.name: t for t in tensors}, metadata, digest)


def read_tensor_bytes(
    header: Header, name: str, start: int = 0, length: int | None = None
) -> bytes:
    """`length` bytes of tensor `name` from byte `start` of its data (default: all of it)."""
    info = header.tensors[name]
    length = info.nbytes - start if length is None else length
    if start < 0 or length < 0 or start + length > info.nbytes:
        raise CheckpointError(
            header.path,
            f"byte range {start}+{length} outside the tensor's {info.nbytes} bytes",
            name,
        )
    fd = os.open(header.path, os.O_RDONLY)
    try:
        chunks, offset, remaining = [], info.start + start, length
        while remaining:
            chunk = os.pread(fd, min(remaining, 1 << 30), offset)
            if not chunk:
                raise CheckpointError(header.path, "file is shorter than its header says", name)
            chunks.append(chunk)
            offset += len(chunk)
            remaining -= len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks) if len(chunks) != 1 else chunks[0]
