"""`llm-audit ablate`: a copy of a checkpoint with the entries behind its traps removed.

Why: a trap is a hypothesis, not a verdict. The anti-grokking paper's causal test removes
the entries behind the traps and measures the model again; WeightWatcher users ask for
the same thing as `remove_traps`. `llm_audit.spectral.ablation.ablate_traps` does it to
one matrix in memory; this module does it to a whole checkpoint on disk, so that the
copy runs in the user's own evaluation (transformers, vLLM, ...) unchanged.

How, and why so: the copy is streamed file by file in chunks (a gpt-oss-120b shard is
over 4 GB; nothing is ever loaded whole) and every byte is copied as it is — headers
byte-identical, so offsets, metadata and any loader see the same file — except the
few bytes that hold a trap entry. Those are replaced by an encoding of exactly
`ablate_traps(W, row, mode)[r, c]` in the stored format, and nothing is re-quantized:
- plain floats (F64, F32, F16, BF16, FP8): "zero" writes +0 (all-zero bytes in every one
  of these formats); "clip" writes the value of the largest |w| among the other entries
  with the trap's sign — a value the tensor already holds, so its bytes exist;
- FP8 with scales (W = q * s): "zero" writes code 0 (0 * s = +0); "clip" writes the code
  q with q * s equal to the clipped value if there is one, else the matrix is refused;
- MXFP4: only the entry's 4-bit code changes, never the block's shared scale (that would
  change the 31 other entries of the block): "zero" writes code 0 (+0 in FP4 E2M1);
  "clip" writes the code whose value at the block's scale is the clipped value if there
  is one (rarely: the bound usually lies between two FP4 steps), else the matrix is
  refused, with the reason;
- packed integer codes (compressed-tensors' `weight_packed`) are refused: not written;
- weight-normed layers (W = g * v / |v|) are refused: an entry of v changed moves |v| and
  with it every other entry of its channel.
Every candidate is decoded with the reader's own decoders before it is used, a matrix is
ablated whole or not at all, and after the copy each ablated matrix is read back from it
(`Checkpoint.read_matrix`) and compared bit for bit with `ablate_traps` of the original.

Which entries: a report row's `trap_entries` (W's own layout, mapped to the stored
tensor through the plan's unit: transposed Conv1D, expert slices, fused qkv rows, conv
kernel positions, MXFP4 nibbles). With `min_trap_ratio` R only the strong traps count.
`trap_ratios` has one value per trap eigenvalue pooled over the analysis's shuffles (5
below 100 eigenvalues, else 1: `shuffle_replicas`), largest first, while `trap_entries`
has one entry per trap of one shuffle, ceil(traps / shuffles), largest |w| first. So k
ratios >= R mean the ceil(k / shuffles) leading entries; a row whose counts do not fit
that relation is refused rather than guessed at.

Every input is untrusted: the report must have been computed on these very files (sizes,
header SHA-256 and data-sample SHA-256 in its manifest, as `--resume` checks), each row
must name a matrix of the model's plan with the same tensor and layout, each entry must
lie inside the matrix and hold the value the report says. `out` must be missing or an
empty folder, never the model's folder; nothing is deleted.
"""

from __future__ import annotations

import bisect
import itertools
import math
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AuditError, ReportError, UsageError
from ..files import write_atomic
from ..inputs import is_number, shown
from ..report.reader import Report, load_report
from ..source.checkpoint import Checkpoint, open_checkpoint
from ..source.dtypes import DTYPE_SIZES, decode
from ..source.header import read_tensor_bytes
from ..source.mxfp4 import BLOCK, BYTES_PER_BLOCK, decode_mxfp4
from ..source.plan import MatrixUnit, kernel_index
from ..source.reference import resolve_model
from ..spectral.ablation import ABLATIONS, ablate_traps
from ..spectral.analyze import shuffle_replicas
from ..spectral.entries import MAX_TRAP_ENTRIES
from .audit import file_mismatch, model_files
from .progress import stderr_progress

CHUNK_BYTES = 64 * 2**20
# The plan's unit layouts (`MatrixUnit.layout`) that `stored_index` maps entry by entry.
MAPPED_LAYOUTS = ("dense", "transposed", "rows", "split", "expert", "conv", "mxfp4")
_MIB = 2**20


@dataclass(frozen=True)
class BytePatch:
    """New bits for one byte of a file: `(old & ~mask) | value`."""

    mask: int
    value: int


@dataclass
class AblationResult:
    """What was written: per matrix with traps, what was done to it; per file, its fate."""

    out: Path
    mode: str
    matrices: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    not_copied: list[dict[str, str]] = field(default_factory=list)

    @property
    def refused(self) -> int:
        return sum(m["status"] != "ablated" for m in self.matrices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "mode": self.mode,
            "matrices": self.matrices,
            "files": self.files,
            "not_copied": self.not_copied,
        }


def check_report_model(report: Report, checkpoint: Checkpoint) -> None:
    """Refuse a report that was not computed on exactly these files."""
    name = file_mismatch(report.manifest, model_files(checkpoint))
    if name == "":
        raise ReportError(
            f"{report.folder}: manifest.json does not fingerprint its model files (a report "
            "of an older llm-audit?); audit the model again"
        )
    if name is not None:
        raise ReportError(
            f"{report.folder}: the report is of another model: {name} differs (size, header "
            f"or data SHA-256) from {checkpoint.model.reference}"
        )


def _check_out(out: Path, root: Path, folder_reference: bool) -> None:
    resolved, model_root = out.resolve(), root.resolve()
    if resolved == model_root or (folder_reference and model_root in resolved.parents):
        raise UsageError(f"--out {out} is the model's folder or inside it; choose another")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"--out {out} exists and is not a folder (or is a link)")
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"--out {out} is not empty; choose a new or empty folder")


def leading_entries(row: Mapping[str, Any], unit: MatrixUnit, min_ratio: float | None) -> int:
    """How many leading `trap_entries` of `row` to ablate (all, or those of traps whose
    own ratio is at least `min_ratio`; see the module docstring)."""
    entries, ratios = row["trap_entries"] or [], row["trap_ratios"]
    matrix = shown(row["matrix"])
    if ratios is None:
        if min_ratio is not None:
            raise ReportError(f"row {matrix}: no trap_ratios (a version-1 report?) to filter by")
        return len(entries)
    if not all(map(is_number, ratios)) or any(a < b for a, b in itertools.pairwise(ratios)):
        raise ReportError(f"row {matrix}: trap_ratios are not numbers, largest first")
    shuffles = shuffle_replicas(min(unit.shape))
    expected = min(math.ceil(len(ratios) / shuffles), MAX_TRAP_ENTRIES, math.prod(unit.shape))
    if ratios and len(entries) != expected:
        raise ReportError(
            f"row {matrix}: {len(entries)} trap_entries for {len(ratios)} trap_ratios over "
            f"{shuffles} shuffle(s) (expected {expected})"
        )
    if min_ratio is None:
        return len(entries)
    return math.ceil(sum(r >= min_ratio for r in ratios) / shuffles)


def _coordinates(row: Mapping[str, Any], unit: MatrixUnit, count: int) -> list[tuple[int, int]]:
    """The first `count` trap entries of `row` as (row, col) of the unit's matrix, checked."""
    where = []
    for entry in (row["trap_entries"] or [])[:count]:
        r, c = (entry.get("row"), entry.get("col")) if isinstance(entry, dict) else (None, None)
        if not all(
            isinstance(v, int) and 0 <= v < n for v, n in zip((r, c), unit.shape, strict=True)
        ):
            raise ReportError(
                f"row {shown(row['matrix'])}: trap entry ({shown(r)}, {shown(c)}) is outside "
                f"its {unit.shape[0]}x{unit.shape[1]} matrix"
            )
        if (r, c) in where:
            raise ReportError(f"row {shown(row['matrix'])}: trap entry ({r}, {c}) is repeated")
        where.append((r, c))
    return where


def stored_index(unit: MatrixUnit, shape: tuple[int, ...], r: int, c: int) -> tuple[int, ...]:
    """Where entry (r, c) of the unit's matrix is in the stored tensor (of `shape`); for
    MXFP4, the blocks tensor's byte that holds it (nibble: `c % 2`)."""
    if unit.layout == "dense":
        return r, c
    if unit.layout == "transposed":
        return c, r
    if unit.layout == "rows":
        return (unit.row_start + c, r) if unit.transpose else (unit.row_start + r, c)
    if unit.layout == "split":
        span = unit.row_stop - unit.row_start
        i = (r // span) * unit.row_period + unit.row_start + r % span
        return (c, i) if unit.transpose else (i, c)
    if unit.layout == "expert":
        return (unit.expert, c, r) if unit.transpose else (unit.expert, r, c)
    if unit.layout == "conv":
        return kernel_index(unit, r, c)
    if unit.layout == "mxfp4":
        return unit.expert, r, c // BLOCK, (c % BLOCK) // 2
    raise ValueError(f"unknown unit layout {unit.layout!r}")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


class _Encoder:
    """Bytes that decode, through the reader's decoders, to exactly a wanted value."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint

    def read(self, tensor: str, start: int, length: int) -> bytes:
        header = self.checkpoint.headers[self.checkpoint.where[tensor]]
        return read_tensor_bytes(header, tensor, start, length)

    def scale(self, unit: MatrixUnit, shape: tuple[int, ...], index: tuple[int, ...]) -> Any:
        """The FP8 scale (float32) over stored element `index` of a 2-D weight."""
        block_rows, block_cols = unit.scale_block
        flat = (index[0] // block_rows) * -(-shape[1] // block_cols) + index[1] // block_cols
        stored = self.checkpoint.tensors[unit.scales_tensor].dtype
        dtype, size = unit.scale_dtype or stored, DTYPE_SIZES[stored]
        return decode(self.read(unit.scales_tensor, flat * size, size), dtype, (1,))[0]

    def patches(
        self, unit: MatrixUnit, where: list[tuple[int, int]], target: np.ndarray
    ) -> dict[int, BytePatch] | str:
        """Absolute offset -> patch for each entry of `where`, or why it cannot be exact."""
        if unit.layout not in MAPPED_LAYOUTS:
            return f"layout {unit.layout!r} has no entry-to-byte map"
        if unit.int_bits is not None:
            return f"packed {unit.int_bits}-bit integer codes: no entry-to-byte map (not written)"
        if unit.norm_tensor is not None:
            return (
                "weight norm: W = g·v/|v|, and an entry of v changed rescales the rest of its "
                "channel, so W's entries cannot be set one by one"
            )
        info = self.checkpoint.tensors[unit.tensor]
        out: dict[int, BytePatch] = {}
        for r, c in where:
            index = stored_index(unit, info.shape, r, c)
            offset = int(np.ravel_multi_index(index, info.shape))
            wanted = target[r : r + 1, c]
            if unit.layout == "mxfp4":
                code = self.fp4_code(unit, info.shape, index, wanted)
                if isinstance(code, str):
                    return code
                shift = 4 * (c % 2)
                old = out.get(info.start + offset, BytePatch(0, 0))
                patch = BytePatch(old.mask | 0xF << shift, old.value | code << shift)
                out[info.start + offset] = patch
                continue
            encoded = self.float_bytes(unit, info.dtype, info.shape, index, wanted)
            if isinstance(encoded, str):
                return encoded
            size = DTYPE_SIZES[info.dtype]
            for i, byte in enumerate(encoded):
                out[info.start + offset * size + i] = BytePatch(0xFF, byte)
        return out

    def fp4_code(
        self, unit: MatrixUnit, shape: tuple[int, ...], index: tuple[int, ...], wanted: np.ndarray
    ) -> int | str:
        scale_at = int(np.ravel_multi_index(index[:3], shape[:3]))
        scale_byte = self.read(unit.scales_tensor, scale_at, 1)
        both = np.array([q | q << 4 for q in range(16)], np.uint8).reshape(1, BYTES_PER_BLOCK)
        values = decode_mxfp4(both, np.frombuffer(scale_byte, np.uint8))[0::2]
        for code in range(16):
            if _same_bits(values[code : code + 1], wanted):
                return code
        return (
            f"{float(wanted[0])!r} is not an FP4 value at the block's scale "
            f"2^{scale_byte[0] - 127} (re-scaling the block would change its 31 other entries)"
        )

    def float_bytes(
        self,
        unit: MatrixUnit,
        dtype: str,
        shape: tuple[int, ...],
        index: tuple[int, ...],
        wanted: np.ndarray,
    ) -> bytes | str:
        size = DTYPE_SIZES[dtype]
        if size == 1:  # FP8: the one code that decodes (times its scale) to the value
            values = decode(bytes(range(256)), dtype, (256,))
            if unit.scales_tensor is not None:
                values = values * self.scale(unit, shape, index)
            for code in range(256):
                if _same_bits(values[code : code + 1], wanted):
                    return bytes([code])
            return f"{float(wanted[0])!r} is no {unit.source_dtype} value at this entry"
        if dtype == "BF16":
            candidate = (wanted.astype(np.float32).view("<u4") >> 16).astype("<u2").tobytes()
        else:
            candidate = wanted.astype({"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]).tobytes()
        if not _same_bits(decode(candidate, dtype, (1,)), wanted):
            return f"{float(wanted[0])!r} is not a {dtype} value"
        return candidate


def _files_to_copy(
    shards: tuple[Path, ...], root: Path, folder: bool
) -> tuple[list[Path], list[dict[str, str]]]:
    """The model's files and, for a folder, every other top-level file; what is left out."""
    if not folder:
        extra = [root / "config.json"] if (root / "config.json").is_file() else []
        return [*shards, *extra], []
    copied, left = [], []
    for path in sorted(root.iterdir()):
        try:
            mode = path.stat().st_mode
        except OSError as err:
            left.append({"name": path.name, "reason": f"unreadable ({err.strerror})"})
            continue
        if stat.S_ISREG(mode):
            copied.append(path)
        elif stat.S_ISDIR(mode):
            reason = "a folder: only the model's top-level files are copied"
            left.append({"name": path.name + "/", "reason": reason})
        else:
            left.append({"name": path.name, "reason": "not a regular file"})
    return copied, left


def _copy(
    src: Path,
    dst: Path,
    patches: Mapping[int, BytePatch],
    size: int,
    advance: Callable[[int], None],
) -> None:
    """`src` to `dst` (atomically) in chunks, with `patches` applied; `size` bytes expected."""
    offsets = sorted(patches)

    def write(tmp: Path) -> None:
        done = 0
        with src.open("rb") as source, tmp.open("wb") as target:
            while chunk := source.read(CHUNK_BYTES):
                first = bisect.bisect_left(offsets, done)
                last = bisect.bisect_left(offsets, done + len(chunk))
                if first < last:
                    chunk = bytearray(chunk)
                    for offset in offsets[first:last]:
                        patch = patches[offset]
                        old = chunk[offset - done]
                        chunk[offset - done] = (old & ~patch.mask & 0xFF) | patch.value
                target.write(chunk)
                done += len(chunk)
                advance(len(chunk))
        if done != size:
            raise AuditError(f"{src}: {done} bytes read, expected {size} (file changed?)")

    write_atomic(dst, write)


def ablate_checkpoint(
    reference: str,
    report_folder: str | Path,
    out: str | Path,
    *,
    mode: str = "zero",
    min_trap_ratio: float | None = None,
    revision: str | None = None,
    quiet: bool = False,
) -> AblationResult:
    """Write to `out` a copy of model `reference` with the trap entries that report
    `report_folder` names ablated (`mode` "zero" or "clip"; only traps whose ratio is at
    least `min_trap_ratio` when given). See the module docstring."""
    if mode not in ABLATIONS:
        raise UsageError(f"--mode must be one of {', '.join(ABLATIONS)}, got {shown(mode)}")
    if min_trap_ratio is not None and not (
        is_number(min_trap_ratio) and math.isfinite(min_trap_ratio)
    ):
        raise UsageError(f"--min-trap-ratio must be a finite number >= 0, got {min_trap_ratio}")
    out = Path(out)
    model = resolve_model(reference, revision)
    folder = model.repo_id is not None or Path(reference).expanduser().is_dir()
    _check_out(out, model.root, folder)
    checkpoint = open_checkpoint(model)
    report = load_report(report_folder)
    check_report_model(report, checkpoint)
    units = {u.id: u for u in checkpoint.plan(min_evals=1).units}
    result = AblationResult(out, mode)
    patches: dict[Path, dict[int, BytePatch]] = {path: {} for path in checkpoint.headers}
    expected: dict[str, np.ndarray] = {}
    encoder = _Encoder(checkpoint)
    for row in report.rows:
        unit = units.get(row["matrix"])
        if (
            unit is None
            or unit.tensor != row["tensor"]
            or row["transposed"] not in (None, unit.transpose)  # None: a version-1 report
        ):
            raise ReportError(
                f"{report.folder}: row {shown(row['matrix'])} is not a matrix of this model's "
                "plan (name, tensor or layout differ)"
            )
        if row["status"] != "ok" or not row["trap_entries"]:
            continue
        count = leading_entries(row, unit, min_trap_ratio)
        where = _coordinates(row, unit, count)
        if not where:
            continue
        matrix = checkpoint.read_matrix(unit)
        for entry, (r, c) in zip(row["trap_entries"], where, strict=False):
            if float(matrix[r, c]) != entry.get("value"):
                raise ReportError(
                    f"{report.folder}: row {shown(row['matrix'])}: entry ({r}, {c}) is "
                    f"{float(matrix[r, c])!r} in the model, the report says "
                    f"{shown(entry.get('value'))}"
                )
        chosen = {"trap_entries": [{"row": r, "col": c} for r, c in where]}
        target = ablate_traps(matrix, chosen, mode)
        found = encoder.patches(unit, where, target)
        summary = {
            "matrix": unit.id,
            "tensor": unit.tensor,
            "kind": unit.kind,
            "entries": len(where),
            "mode": mode,
            "status": "ablated",
            "reason": "",
            "values": [
                {"row": r, "col": c, "before": float(matrix[r, c]), "after": float(target[r, c])}
                for r, c in where
            ],
        }
        if isinstance(found, str):
            summary.update(status="refused", reason=f"{mode}: {found}", values=[])
        else:
            file_patches = patches[checkpoint.where[unit.tensor]]
            for offset, patch in found.items():
                old = file_patches.get(offset, BytePatch(0, 0))
                file_patches[offset] = BytePatch(old.mask | patch.mask, old.value | patch.value)
            expected[unit.id] = target
        result.matrices.append(summary)

    sources, result.not_copied = _files_to_copy(model.files, model.root, folder)
    sizes = {path: path.stat().st_size for path in sources}
    total = sum(sizes.values())
    progress = (lambda done, total: None) if quiet else stderr_progress("ablate: copy", "MiB")
    written = [0]

    def advance(n: int) -> None:  # whole MiB done, and all of them only at the very end
        written[0] += n
        whole = -(-total // _MIB)
        progress(whole if written[0] == total else written[0] // _MIB, whole)

    out.mkdir(parents=True, exist_ok=True)
    for path in sources:
        mine = patches.get(path, {})
        if path in checkpoint.headers and sizes[path] != checkpoint.headers[path].file_size:
            raise AuditError(f"{path}: changed since its header was read")
        _copy(path, out / path.name, mine, sizes[path], advance)
        result.files.append({"name": path.name, "bytes": sizes[path], "patched_bytes": len(mine)})
    _verify(out, checkpoint, units, expected)
    return result


def _verify(
    out: Path, checkpoint: Checkpoint, units: Mapping[str, MatrixUnit], expected: dict
) -> None:
    """Read each ablated matrix back from the copy: it must be `ablate_traps` of the
    original, bit for bit, and every header must be the original's."""
    copy = open_checkpoint(resolve_model(str(out)))
    for path, header in checkpoint.headers.items():
        if copy.headers[out / path.name].header_sha256 != header.header_sha256:
            raise AuditError(f"{out / path.name}: header differs from the original (a bug)")
    for unit_id, target in expected.items():
        if not _same_bits(copy.read_matrix(units[unit_id]), target):
            raise AuditError(
                f"{out}: {unit_id} does not read back as ablated (a bug: do not use this copy)"
            )
