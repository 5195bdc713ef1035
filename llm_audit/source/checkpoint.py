"""An opened checkpoint: validated headers of every shard, and byte-exact reads of one matrix.

Why: a model is audited one matrix at a time, so reading one matrix must cost that
matrix's bytes and nothing more — one expert's slice of a stacked [E, ...] tensor, one
row range of a fused qkv — and must never trust what the files say: every header is
validated (`safetensors_header`) before its offsets are used, every tensor the index
names must be in the shard it names, and decoding errors name the file and tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, DecodeError
from . import weight_norm
from .dtypes import DTYPE_SIZES, decode
from .header import Header, TensorInfo, read_header, read_tensor_bytes
from .intpack import unpack_rows
from .mxfp4 import decode_mxfp4
from .plan import MatrixUnit, Plan, SkippedTensor, build_plan, unit_matrix
from .reference import ResolvedModel, load_json_file
from .roles import KindRule

MAX_CONFIG_BYTES = 4 * 2**20


@dataclass
class Checkpoint:
    """Headers of all shards and where each tensor lives; `bytes_read` counts data reads."""

    model: ResolvedModel
    headers: dict[Path, Header]
    where: dict[str, Path]
    config: dict[str, Any]
    bytes_read: int = field(default=0)
    # The last whole tensor decoded (a conv kernel, a weight-normed weight): the units of
    # one tensor (a kernel's (kh, kw) slices) are read one after the other.
    _whole: tuple[str, np.ndarray] | None = field(default=None, repr=False)
    # The last packed weight's zero points, decoded: read once for all its row chunks.
    _zeros: tuple[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's header entry (name, dtype, shape, absolute offsets)."""
        return {name: self.headers[path].tensors[name] for name, path in self.where.items()}

    def plan(self, min_evals: int, kind_rules: Sequence[KindRule] = ()) -> Plan:
        """The audit plan of this checkpoint (see `llm_audit.source.plan`); the folder's
        .safetensors files that are not read are listed among the skipped, with why."""
        formats = {
            name: self.headers[path].metadata.get("format", "") for name, path in self.where.items()
        }
        plan = build_plan(
            self.tensors, self.config, min_evals=min_evals, kind_rules=kind_rules, formats=formats
        )
        for path, reason in self.model.not_read:
            name = path.relative_to(self.model.root).as_posix()
            plan.skipped.append(SkippedTensor(name, reason))
        return plan

    def bytes_on_disk(self) -> int:
        return sum(h.file_size for h in self.headers.values())

    def _read(self, name: str, start: int, length: int) -> bytes:
        header = self.headers[self.where[name]]
        raw = read_tensor_bytes(header, name, start, length)
        self.bytes_read += len(raw)
        return raw

    def _info(self, name: str) -> tuple[Path, TensorInfo]:
        path = self.where[name]
        return path, self.headers[path].tensors[name]

    def read_matrix(self, unit: MatrixUnit) -> np.ndarray:
        """The unit's matrix, (out, in), float32 (float64 for F64 sources); reads only its bytes."""
        path, info = self._info(unit.tensor)
        try:
            return self._decode(unit, info)
        except (ValueError, DecodeError) as err:
            raise CheckpointError(path, str(err), unit.tensor) from None

    def iter_rows(self, unit: MatrixUnit, rows_per_chunk: int) -> Iterator[np.ndarray]:
        """The unit's matrix in row chunks, each read on its own: for matrices too large to
        hold (the embedding); dense and row-range layouts only, dequantized like
        `read_matrix`."""
        path, info = self._info(unit.tensor)
        if unit.layout not in ("dense", "rows") or unit.transpose or unit.norm_tensor:
            raise ValueError(f"row streaming is for dense matrices, not {unit.layout!r}")
        first = unit.row_start or 0
        rows = unit.shape[0]
        for start in range(0, rows, rows_per_chunk):
            count = min(rows_per_chunk, rows - start)
            try:
                yield self._rows(unit, info, first + start, count)
            except (ValueError, DecodeError) as err:
                raise CheckpointError(path, str(err), unit.tensor) from None

    def _rows(self, unit: MatrixUnit, info: TensorInfo, first: int, count: int) -> np.ndarray:
        """Rows `first:first + count` of the stored 2-D tensor, decoded (packed integer
        codes unpacked), times their scales when the unit has them (W = q * s, each scale
        over its block)."""
        row_bytes = info.shape[1] * DTYPE_SIZES[info.dtype]
        raw = self._read(unit.tensor, first * row_bytes, count * row_bytes)
        if unit.int_bits is None:
            rows = decode(raw, info.dtype, (count, info.shape[1]))
        else:  # packed integer codes: the matrix's columns are the unpacked codes
            rows = unpack_rows(raw, count, unit.shape[0 if unit.transpose else 1], unit.int_bits)
        cols = rows.shape[1]
        if unit.scales_tensor is None or unit.scale_block is None:
            return rows
        block_rows, block_cols = unit.scale_block
        if unit.zero_tensor is not None:  # W = (q - z) * s, z per scale
            zeros = self._zero_points(unit, info.shape[0])[first : first + count]
            rows -= np.repeat(zeros, block_cols, axis=1)[:, :cols]
        _, scale_info = self._info(unit.scales_tensor)
        grid_cols = -(-cols // block_cols)
        top, bottom = first // block_rows, (first + count - 1) // block_rows + 1
        item = DTYPE_SIZES[scale_info.dtype]
        scale_raw = self._read(
            unit.scales_tensor, top * grid_cols * item, (bottom - top) * grid_cols * item
        )
        scale_dtype = unit.scale_dtype or scale_info.dtype
        scales = decode(scale_raw, scale_dtype, (bottom - top, grid_cols))
        if not (np.isfinite(scales).all() and (scales >= 0).all()):
            i, j = np.argwhere(~(np.isfinite(scales) & (scales >= 0)))[0]
            raise DecodeError(
                f"scale tensor {unit.scales_tensor!r} holds {scales[i, j]} at block "
                f"({top + i}, {j}): scales must be finite and not negative"
            )
        per_row = scales[np.arange(first, first + count) // block_rows - top]
        return rows * np.repeat(per_row, block_cols, axis=1)[:, :cols].astype(rows.dtype)

    def _zero_points(self, unit: MatrixUnit, rows: int) -> np.ndarray:
        """float32 [rows, scales per row]: an asymmetric packed weight's zero points, stored
        packed along the rows ([words, scales per row] int32, one bit stream per column),
        kept for the weight's next row chunk."""
        if self._zeros is None or self._zeros[0] != unit.zero_tensor:
            _, info = self._info(unit.zero_tensor)
            words, per_row = info.shape
            raw = np.frombuffer(self._read(unit.zero_tensor, 0, info.nbytes), "<u4")
            columns = raw.reshape(words, per_row).T.tobytes()
            self._zeros = (unit.zero_tensor, unpack_rows(columns, per_row, rows, unit.int_bits).T)
        return self._zeros[1]

    def _whole_tensor(self, unit: MatrixUnit, info: TensorInfo) -> np.ndarray:
        """The unit's whole stored tensor, decoded (W = g * v / |v| for a weight-normed
        one), kept for the tensor's next unit."""
        if self._whole is None or self._whole[0] != unit.tensor:
            if len(info.shape) == 2:  # times its FP8 scales, if any
                whole = self._rows(unit, info, 0, info.shape[0])
            else:
                whole = decode(self._read(unit.tensor, 0, info.nbytes), info.dtype, info.shape)
            if unit.norm_tensor is not None:
                _, g_info = self._info(unit.norm_tensor)
                raw = self._read(unit.norm_tensor, 0, g_info.nbytes)
                whole = weight_norm.reconstruct(whole, decode(raw, g_info.dtype, g_info.shape))
            self._whole = (unit.tensor, whole)
        return self._whole[1]

    def _decode(self, unit: MatrixUnit, info: TensorInfo) -> np.ndarray:
        name, shape = unit.tensor, info.shape
        if unit.norm_tensor is not None or unit.layout in ("split", "conv"):
            # a copy: the caller may change it, the next unit reads the same whole
            return np.array(unit_matrix(unit, self._whole_tensor(unit, info)), order="C")
        if unit.layout == "mxfp4":
            _, rows, groups, width = shape
            n_blocks = rows * groups
            blocks = self._read(name, unit.expert * n_blocks * width, n_blocks * width)
            scales = self._read(unit.scales_tensor, unit.expert * n_blocks, n_blocks)
            return decode_mxfp4(
                np.frombuffer(blocks, np.uint8).reshape(rows, groups, width),
                np.frombuffer(scales, np.uint8).reshape(rows, groups),
            )
        if unit.layout == "dense":
            return self._rows(unit, info, 0, shape[0])
        if unit.layout == "transposed":
            return np.ascontiguousarray(self._rows(unit, info, 0, shape[0]).T)
        if unit.layout == "rows":
            rows = self._rows(unit, info, unit.row_start, unit.row_stop - unit.row_start)
            return np.ascontiguousarray(rows.T) if unit.transpose else rows
        if unit.layout == "expert":
            per = math.prod(shape[1:]) * DTYPE_SIZES[info.dtype]
            matrix = decode(self._read(name, unit.expert * per, per), info.dtype, shape[1:])
            return matrix.T if unit.transpose else matrix
        raise ValueError(f"unknown unit layout {unit.layout!r}")


def _load_config(model: ResolvedModel) -> dict[str, Any]:
    path = model.config_path
    if path is None:
        return {}
    config = load_json_file(path, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise CheckpointError(path, "config is not a JSON object")
    return config


def open_checkpoint(model: ResolvedModel) -> Checkpoint:
    """Read and cross-check every shard's header; no tensor data is read."""
    headers = {path: read_header(path) for path in model.files}
    where: dict[str, Path] = {}
    if model.weight_map is not None:
        for name, shard in model.weight_map.items():
            path = model.root / shard
            if name not in headers[path].tensors:
                raise CheckpointError(path, "named in the index but not in this shard", name)
            where[name] = path
    # every tensor of every shard, the index's or not: transformers loads a shard's
    # tensors whatever its index lists, so one the index leaves out is still in the model
    for path, header in headers.items():
        for name in header.tensors:
            if where.setdefault(name, path) != path:
                if model.weight_map is not None and name in model.weight_map:
                    continue  # also in another shard: the index says which one is read
                raise CheckpointError(
                    path,
                    f"also in {where[name].name} (two copies of the weights in one folder? "
                    "pass one file, or its index, as the model)",
                    name,
                )
    return Checkpoint(model, headers, where, _load_config(model))
