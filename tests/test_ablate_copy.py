"""`llm-audit ablate`: a copy of a checkpoint with a report's trap entries removed.

Audited for real (the in-process driver, no Ray), ablated, then checked against references
that do not go through our byte mapping: the bytes the safetensors layouts put each entry
at (written out here from the format's definition), `ablate_traps` on the decoded
matrices, a second audit of the copy, and transformers' own loader and dequantizer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llm_audit.cli import main
from llm_audit.errors import ReportError
from llm_audit.files import write_json
from llm_audit.report.reader import load_report
from llm_audit.report.schema import LAYERS_SCHEMA, SCHEMA_VERSION
from llm_audit.report.writer import ReportWriter
from llm_audit.run.ablate import (
    MAPPED_LAYOUTS,
    ablate_checkpoint,
    leading_entries,
    stored_index,
)
from llm_audit.run.audit import _summary, model_files
from llm_audit.run.config import AuditConfig
from llm_audit.run.local import audit_in_process
from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.dtypes import decode
from llm_audit.source.header import read_tensor_bytes
from llm_audit.source.mxfp4 import decode_mxfp4
from llm_audit.source.plan import MatrixUnit
from llm_audit.source.reference import resolve_model
from llm_audit.source.synth import (
    BUNDLED,
    PLANTED,
    SynthConfig,
    synth_gpt_oss,
    write_bundled_model,
)
from llm_audit.spectral.ablation import ablate_traps


def _audit(model: Path, out: Path, only: list[str] | None = None) -> list[dict]:
    """Audit `model` in this process into report folder `out` (all units, or `only`)."""
    checkpoint = open_checkpoint(resolve_model(str(model)))
    config = AuditConfig(seed=0)
    plan = checkpoint.plan(config.min_evals, config.kind_rules())
    units = [u for u in plan.units if only is None or u.id in only]
    rows, _ = audit_in_process(checkpoint, units, config, gpus=False)
    writer = ReportWriter(out)
    writer.add(rows)
    table = writer.finalize([u.id for u in units])
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "status": "complete",
        "model": {"reference": str(model), "files": model_files(checkpoint)},
        "config": config.to_dict(),
        "seed": config.seed,
    }
    write_json(out / "manifest.json", manifest)
    write_json(out / "summary.json", _summary(table, len(units), plan))
    return table.to_pylist()


def _edited_report(src: Path, dst: Path, edit: Callable[[list[dict]], None]) -> Path:
    """A copy of report `src` whose layers rows `edit` changed (a hand-made report)."""
    dst.mkdir()
    for name in ("manifest.json", "summary.json"):
        shutil.copy(src / name, dst / name)
    rows = pq.read_table(src / "layers.parquet").to_pylist()
    edit(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=LAYERS_SCHEMA), dst / "layers.parquet")
    return dst


@pytest.fixture(scope="module")
def bundled(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("bundled")
    model = write_bundled_model(base / "model")
    _audit(model, base / "report")
    return model, base / "report"


def _file_bytes(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.fromfile(p, np.uint8) for p in sorted(folder.iterdir())}


def _entry_bytes(checkpoint, unit_id: str, r: int, c: int) -> tuple[str, list[int], int]:
    """(file, byte offsets, bit mask) of entry (r, c) of a bundled unit, from the layouts'
    definitions: BF16 [out, in] row-major, 2 bytes each; MXFP4 blocks [E, out, G, 16]
    with element 2k in the low nibble of byte k of its group of 32."""
    tensor = unit_id.split("[")[0]
    if "[" in unit_id:
        expert = int(unit_id.split("[")[1].rstrip("]"))
        info = checkpoint.tensors[tensor + "_blocks"]
        _, rows, groups, _ = info.shape
        byte = info.start + ((expert * rows + r) * groups + c // 32) * 16 + (c % 32) // 2
        return checkpoint.where[info.name].name, [byte], 0x0F if c % 2 == 0 else 0xF0
    info = checkpoint.tensors[tensor]
    start = info.start + (r * info.shape[1] + c) * 2
    return checkpoint.where[tensor].name, [start, start + 1], 0xFF


def test_zero_copy_of_the_bundled_model(bundled, tmp_path, capsys):
    from transformers import GptOssForCausalLM

    model, report_folder = bundled
    report = {r["matrix"]: r for r in load_report(report_folder).rows}
    assert main(["ablate", str(model), "--report", str(report_folder), "--out",
                 str(tmp_path / "copy"), "--format", "json"]) == 0  # fmt: skip
    done = json.loads(capsys.readouterr().out)
    assert {m["matrix"]: (m["entries"], m["status"]) for m in done["matrices"]} == {
        unit_id: (count, "ablated") for unit_id, count in PLANTED.items()
    }
    assert sorted(f["name"] for f in done["files"]) == sorted(p.name for p in model.iterdir())

    original, copy = open_checkpoint(resolve_model(str(model))), tmp_path / "copy"
    copied = open_checkpoint(resolve_model(str(copy)))
    units = {u.id: u for u in original.plan(8).units}

    # (a) every byte equal except those of the planted entries, which changed
    expected: dict[str, dict[int, int]] = {}
    for unit_id in PLANTED:
        for entry in report[unit_id]["trap_entries"]:
            name, offsets, mask = _entry_bytes(original, unit_id, entry["row"], entry["col"])
            for offset in offsets:
                masks = expected.setdefault(name, {})
                masks[offset] = masks.get(offset, 0) | mask
    before, after = _file_bytes(model), _file_bytes(copy)
    assert before.keys() == after.keys()
    for name in before:
        changed = np.flatnonzero(before[name] != after[name])
        assert set(changed.tolist()) <= set(expected.get(name, {})), name
        for offset, mask in expected.get(name, {}).items():
            old, new = int(before[name][offset]), int(after[name][offset])
            assert old & ~mask == new & ~mask  # the other nibble of an MXFP4 byte
            assert new & mask == 0 != old & mask, (name, offset)  # +0: all-zero bits

    # (b) each ablated matrix reads back as ablate_traps of the original, bit for bit;
    # every other matrix as it was
    for unit_id, unit in units.items():
        want = original.read_matrix(unit)
        if unit_id in PLANTED:
            want = ablate_traps(want, report[unit_id])
            assert not np.array_equal(want, original.read_matrix(unit))
        got = copied.read_matrix(unit)
        assert got.tobytes() == want.tobytes(), unit_id

    # (c) a second audit of the copy finds no trap in the planted matrices
    again = _audit(copy, tmp_path / "again", only=list(PLANTED))
    assert {r["matrix"]: r["rand_num_spikes"] for r in again} == dict.fromkeys(PLANTED, 0)

    # (d) transformers loads the copy; its dequantized weights are ours
    state = GptOssForCausalLM.from_pretrained(str(copy), dtype=torch.float32).state_dict()
    for unit_id in PLANTED:
        unit = units[unit_id]
        if unit.expert is not None:  # transformers keeps experts as [E, in, out]
            theirs = state[unit.tensor.removesuffix("_blocks")][unit.expert].T
        else:
            theirs = state[unit.tensor]
        assert np.array_equal(theirs.numpy(), copied.read_matrix(unit)), unit_id


def test_clip_copy_of_the_bundled_model(bundled, tmp_path, capsys):
    """BF16: the bytes of the largest other |w| with the trap's sign. MXFP4: the clipped
    value is no FP4 value at the block's scale, so the experts are refused, untouched."""
    model, report_folder = bundled
    report = {r["matrix"]: r for r in load_report(report_folder).rows}
    code = main(["ablate", str(model), "--report", str(report_folder), "--out",
                 str(tmp_path / "copy"), "--mode", "clip", "--quiet"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1  # some matrices refused
    assert "refused: 2" in out and "is not an FP4 value at the block's scale" in out
    original = open_checkpoint(resolve_model(str(model)))
    copied = open_checkpoint(resolve_model(str(tmp_path / "copy")))
    before, after = _file_bytes(model), _file_bytes(tmp_path / "copy")
    attention = "model.layers.1.self_attn.o_proj.weight"
    unit = next(u for u in original.plan(8).units if u.id == attention)
    matrix = original.read_matrix(unit)
    traps = [(e["row"], e["col"]) for e in report[attention]["trap_entries"]]
    rest = np.abs(matrix)
    for r, c in traps:
        rest[r, c] = 0
    bound = np.unravel_index(np.argmax(rest), rest.shape)
    name, bound_bytes, _ = _entry_bytes(original, attention, *map(int, bound))
    changed = set()
    for r, c in traps:
        name, offsets, _ = _entry_bytes(original, attention, r, c)
        low, high = (after[name][o] for o in offsets)
        assert low == before[name][bound_bytes[0]]
        assert high == (before[name][bound_bytes[1]] & 0x7F) | (before[name][offsets[1]] & 0x80)
        changed.update(offsets)
    for file in before:
        diff = set(np.flatnonzero(before[file] != after[file]).tolist())
        assert diff == (changed if file == name else set()), file
    ablated = ablate_traps(matrix, report[attention], mode="clip")
    assert copied.read_matrix(unit).tobytes() == ablated.tobytes()
    # a second audit: no trap left in the clipped matrix; the refused experts keep theirs
    again = _audit(tmp_path / "copy", tmp_path / "again", only=list(PLANTED))
    assert {r["matrix"]: r["rand_num_spikes"] for r in again} == PLANTED | {attention: 0}


def _gpt2(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A tiny GPT-2 saved by transformers, with planted entries in Conv1D weights (stored
    [in, out]): c_fc (in 5, out 70), c_proj (in 3, out 17) and c_attn (in 4, out 40: k's
    row 8)."""
    import transformers

    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[5, 70] = 1.0
        model.transformer.h[0].attn.c_proj.weight[3, 17] = 0.875
        model.transformer.h[1].attn.c_attn.weight[4, 40] = -0.75
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


PLANTED_GPT2 = {  # unit -> (stored tensor, stored (in, out) index, columns of the unit)
    "transformer.h.0.mlp.c_fc.weight": ("transformer.h.0.mlp.c_fc.weight", (5, 70), slice(None)),
    "transformer.h.0.attn.c_proj.weight": ("transformer.h.0.attn.c_proj.weight", (3, 17),
                                           slice(None)),  # square: a swap stays in range
    "transformer.h.1.attn.c_attn.weight:k": ("transformer.h.1.attn.c_attn.weight", (4, 40),
                                             slice(32, 64)),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpt2_conv1d_copy_zero_and_clip(dtype, tmp_path):
    import transformers

    state = _gpt2(tmp_path / "model", dtype)
    rows = {r["matrix"]: r for r in _audit(tmp_path / "model", tmp_path / "report")}
    trapped = {m for m, r in rows.items() if r["trap_entries"]}
    assert trapped == set(PLANTED_GPT2)
    for unit_id, (_, (i, o), columns) in PLANTED_GPT2.items():  # W is (out, in)
        first = rows[unit_id]["trap_entries"][0]
        assert (first["col"], first["row"] + (columns.start or 0)) == (i, o)
    for mode in ("zero", "clip"):
        ablate_checkpoint(
            str(tmp_path / "model"), tmp_path / "report", tmp_path / mode, mode=mode, quiet=True
        )
        loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / mode, dtype=dtype)
        theirs = loaded.state_dict()
        for name, tensor in state.items():
            want = tensor.clone()
            for stored, (i, o), columns in PLANTED_GPT2.values():
                if stored != name:
                    continue
                if mode == "zero":
                    want[i, o] = 0
                else:  # the largest other |w| of the unit's own columns, sign kept
                    rest = want[:, columns].abs()
                    rest[i, o - (columns.start or 0)] = 0
                    want[i, o] = torch.sign(tensor[i, o]) * rest.max()
            assert torch.equal(theirs[name], want), (mode, name)


def test_min_trap_ratio_and_the_entries_it_selects(bundled, tmp_path):
    model, report_folder = bundled
    ablate_checkpoint(str(model), report_folder, tmp_path / "none", min_trap_ratio=1e6, quiet=True)
    assert _file_bytes(model).keys() == _file_bytes(tmp_path / "none").keys()
    for name, data in _file_bytes(model).items():
        assert np.array_equal(data, _file_bytes(tmp_path / "none")[name])
    result = ablate_checkpoint(
        str(model), report_folder, tmp_path / "strong", min_trap_ratio=3.7, quiet=True
    )  # o_proj: traps of ratio 4.05, 3.82, 3.56; the experts under 3: o_proj's 2 largest
    assert [(m["matrix"], m["entries"]) for m in result.matrices] == [
        ("model.layers.1.self_attn.o_proj.weight", 2)
    ]
    report = {r["matrix"]: r for r in load_report(report_folder).rows}
    row = report["model.layers.1.self_attn.o_proj.weight"]
    unit = next(
        u for u in open_checkpoint(resolve_model(str(model))).plan(8).units if u.id == row["matrix"]
    )
    original = open_checkpoint(resolve_model(str(model))).read_matrix(unit)
    got = open_checkpoint(resolve_model(str(tmp_path / "strong"))).read_matrix(unit)
    want = ablate_traps(original, {"trap_entries": row["trap_entries"][:2]})
    assert got.tobytes() == want.tobytes()

    # below 100 eigenvalues 5 shuffles are pooled: 6 trap ratios are 2 entries per shuffle
    small = MatrixUnit("w", "w", "other", None, None, (200, 64), "F32", 0)
    entries = [{"row": 0, "col": 0, "value": 1.0}, {"row": 1, "col": 1, "value": 1.0}]
    pooled = {"matrix": "w", "trap_entries": entries, "trap_ratios": [3, 2.5, 2, 1.5, 1.2, 1.1]}
    assert leading_entries(pooled, small, None) == 2
    assert leading_entries(pooled, small, 2.0) == 1  # 3 strong traps over 5 shuffles
    assert leading_entries(pooled, small, 1.15) == 1
    assert leading_entries(pooled, small, 1.1) == 2
    with pytest.raises(ReportError, match="3 trap_entries for 6 trap_ratios over 5"):
        leading_entries(pooled | {"trap_entries": [*entries, entries[0]]}, small, None)
    large = dataclasses.replace(small, shape=(200, 128))  # one shuffle: one entry per ratio
    with pytest.raises(ReportError, match="expected 6"):
        leading_entries(pooled, large, None)


def test_two_entries_in_one_mxfp4_byte(bundled, tmp_path):
    """Elements 2k and 2k+1 of a block share a byte: both nibbles are written."""
    model, report_folder = bundled
    unit_id = "model.layers.0.mlp.experts.gate_up_proj[2]"
    checkpoint = open_checkpoint(resolve_model(str(model)))
    unit = next(u for u in checkpoint.plan(8).units if u.id == unit_id)
    matrix = checkpoint.read_matrix(unit)
    row, col = map(int, np.argwhere(matrix[:, 0::2] * matrix[:, 1::2] != 0)[0])
    pair = [{"row": row, "col": c, "value": float(matrix[row, c])} for c in (2 * col, 2 * col + 1)]

    def edit(rows: list[dict]) -> None:
        next(r for r in rows if r["matrix"] == unit_id)["trap_entries"] = pair

    hand = _edited_report(report_folder, tmp_path / "hand", edit)
    ablate_checkpoint(str(model), hand, tmp_path / "copy", quiet=True)
    got = open_checkpoint(resolve_model(str(tmp_path / "copy"))).read_matrix(unit)
    want = ablate_traps(matrix, {"trap_entries": pair})
    assert got.tobytes() == want.tobytes() and got[row, 2 * col] == got[row, 2 * col + 1] == 0


def _refused(capsys, *args: str) -> str:
    assert main(["ablate", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-audit: error: ") and "\n" not in err
    return err


def test_refusals(bundled, tmp_path, capsys):
    model, report_folder = bundled
    report = ["--report", str(report_folder)]

    other = synth_gpt_oss(tmp_path / "other", dataclasses.replace(BUNDLED, seed=1))
    err = _refused(capsys, str(other), *report, "--out", str(tmp_path / "a"))
    assert "the report is of another model" in err and not (tmp_path / "a").exists()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert "is not empty" in _refused(capsys, str(model), *report, "--out", str(tmp_path / "busy"))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    for out in (model, model / "sub"):
        assert "the model's folder" in _refused(capsys, str(model), *report, "--out", str(out))
    assert not (model / "sub").exists()

    def entry(unit_id: str, **change) -> Callable[[list[dict]], None]:
        def edit(rows: list[dict]) -> None:
            row = next(r for r in rows if r["matrix"] == unit_id)
            row["trap_entries"][0].update(change)

        return edit

    attention = "model.layers.1.self_attn.o_proj.weight"

    def repeat(rows: list[dict]) -> None:
        entries = next(r for r in rows if r["matrix"] == attention)["trap_entries"]
        entries[1] = dict(entries[0])

    for name, edit, message in [
        ("range", entry(attention, row=256), "outside its 256x128 matrix"),
        ("negative", entry(attention, col=-1), "trap_entries' holds negative counts or indices"),
        ("value", entry(attention, value=0.5), "the report says 0.5"),
        ("repeat", repeat, "is repeated"),
        ("unknown", lambda rows: rows[0].update(matrix="model.nope.weight"), "not a matrix of"),
    ]:
        hand = _edited_report(report_folder, tmp_path / name, edit)
        err = _refused(capsys, str(model), "--report", str(hand), "--out", str(tmp_path / "x"))
        assert message in err, name
        assert not (tmp_path / "x").exists()


def _saved(family: str, values: dict, folder: Path) -> Path:
    import transformers

    config = getattr(transformers, family)(**values)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_stored_index_is_where_the_reader_finds_each_entry(tmp_path, bundled):
    """For every layout the plan makes: entry (r, c) of each unit's matrix, as the reader
    decodes it, is the stored element `stored_index` names (random weights: a wrong map
    would pick another value)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file(
        {
            "conv.weight": rng.standard_normal((16, 12, 3, 2), np.float32),
            "conv1d.weight": rng.standard_normal((16, 12, 3), np.float32),  # Conv1d [out, in, k]
        },
        str(tmp_path / "conv.safetensors"),
    )
    small = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1}
    models = [
        bundled[0],  # dense BF16, MXFP4
        synth_gpt_oss(tmp_path / "dense", SynthConfig(mxfp4=False, layers=1, experts=2)),
        _saved("GPT2Config", {"vocab_size": 64, "n_embd": 32, "n_layer": 1, "n_head": 4},
               tmp_path / "gpt2"),  # transposed, split of a transposed Conv1D
        _saved("FalconConfig", small | {"num_attention_heads": 4, "new_decoder_architecture": True,
                                        "num_kv_heads": 2}, tmp_path / "falcon"),  # split
        _saved("Phi3Config", small | {"num_attention_heads": 4, "intermediate_size": 48,
                                      "pad_token_id": 0}, tmp_path / "phi3"),  # rows
        _saved("DbrxConfig", {"vocab_size": 64, "d_model": 32, "n_layers": 1, "n_heads": 2,
                              "attn_config": {"kv_n_heads": 1, "rope_theta": 1e4},
                              "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 2}},
               tmp_path / "dbrx"),  # rows, and transposed rows (w2), per expert
        _saved("GraniteMoeConfig", small | {"num_attention_heads": 4, "intermediate_size": 48,
                                            "num_local_experts": 2}, tmp_path / "granite"),
        tmp_path / "conv.safetensors",
    ]  # fmt: skip
    layouts = set()
    rng = np.random.default_rng(1)
    for model in models:
        checkpoint = open_checkpoint(resolve_model(str(model)))
        for unit in checkpoint.plan(8).units:
            layouts.add(unit.layout)
            info = checkpoint.tensors[unit.tensor]
            header = checkpoint.headers[checkpoint.where[unit.tensor]]
            raw = read_tensor_bytes(header, unit.tensor)
            if unit.layout == "mxfp4":
                scales = read_tensor_bytes(header, unit.scales_tensor)
                values = decode_mxfp4(
                    np.frombuffer(raw, np.uint8).reshape(info.shape),
                    np.frombuffer(scales, np.uint8).reshape(info.shape[:3]),
                )
            else:
                values = decode(raw, info.dtype, info.shape)
            matrix = checkpoint.read_matrix(unit)
            rows, cols = matrix.shape
            for r, c in [(0, 0), (rows - 1, cols - 1), *rng.integers(0, (rows, cols), (50, 2))]:
                index = stored_index(unit, info.shape, int(r), int(c))
                if unit.layout == "mxfp4":  # byte b of group g: elements 2b (low), 2b + 1
                    e, row, group, byte = index
                    stored = values[e, row, group * 32 + 2 * byte + c % 2]
                else:
                    stored = values[index]
                assert stored == matrix[r, c], (unit.id, r, c)
    assert layouts == set(MAPPED_LAYOUTS)


FLOAT_CASES = {  # name -> (torch dtype, FP8 scale block or None)
    "F16": (torch.float16, None),
    "F64": (torch.float64, None),
    "F8_E4M3": (torch.float8_e4m3fn, None),
    "F8_E5M2": (torch.float8_e5m2, None),
    "F8_E4M3 one scale": (torch.float8_e4m3fn, (160, 120)),
    "F8_E4M3 2x2 scales": (torch.float8_e4m3fn, (80, 60)),
}


@pytest.mark.parametrize("case", sorted(FLOAT_CASES))
def test_other_float_formats(case, tmp_path):
    """Zero: every byte of the entry 0 (+0 in each format). Clip, unscaled: the bytes of
    the largest other |w| with the trap's sign bit; so too with one FP8 scale (W = q * s).
    FP8 with block scales: zero is code 0; clip needs a code q' with q' * s_trap equal to
    the bound, which lies in another block, under another scale: refused."""
    from safetensors.torch import save_file

    dtype, block = FLOAT_CASES[case]
    name = "model.layers.0.mlp.down_proj.weight"
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_normal((160, 120)) * 0.02)
    for k, (r, c) in enumerate([(10, 100), (150, 7), (80, 119)]):
        weight[r, c] = (-1) ** k * (1.0 - 0.1 * k)
    tensors = {"model.norm.weight": torch.ones(120)}
    config = {"model_type": "llama"}
    if block:
        blocks = weight.reshape(160 // block[0], block[0], 120 // block[1], block[1])
        scale = blocks.abs().amax(dim=(1, 3)).float() / 448
        q = blocks / scale[:, None, :, None]
        tensors[name], tensors[name + "_scale_inv"] = q.reshape(160, 120).to(dtype), scale
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block)}
    else:
        tensors[name] = weight.to(dtype)
    (tmp_path / "model").mkdir()
    save_file(tensors, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    (tmp_path / "model" / "tokenizer.json").write_text("{}")
    (tmp_path / "model" / "original").mkdir()  # as gpt-oss's hub folder: other weights
    [row] = [r for r in _audit(tmp_path / "model", tmp_path / "report") if r["trap_entries"]]
    checkpoint = open_checkpoint(resolve_model(str(tmp_path / "model")))
    unit = next(u for u in checkpoint.plan(8).units if u.id == name)
    matrix, info = checkpoint.read_matrix(unit), checkpoint.tensors[name]
    size = info.nbytes // (160 * 120)
    before = (tmp_path / "model" / "model.safetensors").read_bytes()
    rest = np.abs(matrix)
    for entry in row["trap_entries"]:
        rest[entry["row"], entry["col"]] = 0
    bound = info.start + int(np.argmax(rest)) * size
    for mode in ("zero", "clip"):
        result = ablate_checkpoint(
            str(tmp_path / "model"), tmp_path / "report", tmp_path / mode, mode=mode, quiet=True
        )
        after = (tmp_path / mode / "model.safetensors").read_bytes()
        [done] = result.matrices
        if mode == "clip" and block == (80, 60):
            assert done["status"] == "refused", done
            assert "is no F8_E4M3 block 80x60 scaled value at this entry" in done["reason"]
            assert after == before
            continue
        assert done["status"] == "ablated" and done["entries"] == len(row["trap_entries"])
        changed = set()
        for entry in row["trap_entries"]:
            at = info.start + (entry["row"] * 120 + entry["col"]) * size
            want = bytes(size) if mode == "zero" else bytearray(before[bound : bound + size])
            if mode == "clip":
                want[-1] = want[-1] & 0x7F | before[at + size - 1] & 0x80
            assert after[at : at + size] == want, (mode, entry)
            changed.update(range(at, at + size))
        assert {i for i in range(len(before)) if before[i] != after[i]} <= changed
        copied = open_checkpoint(resolve_model(str(tmp_path / mode))).read_matrix(unit)
        assert copied.tobytes() == ablate_traps(matrix, row, mode).tobytes()
        assert sorted(p.name for p in (tmp_path / mode).iterdir()) == [
            "config.json", "model.safetensors", "tokenizer.json"
        ]  # fmt: skip
        assert result.not_copied == [
            {"name": "original/", "reason": "a folder: only the model's top-level files are copied"}
        ]
    # a file given alone: it, and the config.json the audit read beside it
    one = ablate_checkpoint(
        str(tmp_path / "model" / "model.safetensors"), tmp_path / "report", tmp_path / "one",
        quiet=True,
    )  # fmt: skip
    assert [f["name"] for f in one.files] == ["model.safetensors", "config.json"]
    zero = (tmp_path / "zero" / "model.safetensors").read_bytes()
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == zero


def test_small_chunks_give_the_same_copy(bundled, tmp_path, monkeypatch):
    """Patches land in the right chunk wherever the chunk boundaries fall."""
    from llm_audit.run import ablate

    model, report_folder = bundled
    ablate_checkpoint(str(model), report_folder, tmp_path / "big", quiet=True)
    attention = "model.layers.1.self_attn.o_proj.weight"
    entry = next(r for r in load_report(report_folder).rows if r["matrix"] == attention)
    first = entry["trap_entries"][0]
    checkpoint = open_checkpoint(resolve_model(str(model)))
    _, offsets, _ = _entry_bytes(checkpoint, attention, first["row"], first["col"])
    monkeypatch.setattr(ablate, "CHUNK_BYTES", offsets[1])  # its 2 bytes in 2 chunks
    ablate_checkpoint(str(model), report_folder, tmp_path / "small", quiet=True)
    big, small = _file_bytes(tmp_path / "big"), _file_bytes(tmp_path / "small")
    assert big.keys() == small.keys()
    assert all(np.array_equal(big[name], small[name]) for name in big)
    assert any(not np.array_equal(big[name], data) for name, data in _file_bytes(model).items())


def test_zero_is_all_zero_bits_in_every_float_format():
    """What "zero" writes: +0 is the all-zero pattern of every float dtype a unit can have,
    and code 0 of FP4 E2M1 (MXFP4) is +0 at any block scale."""
    from llm_audit.source.dtypes import DTYPE_SIZES, FLOAT_DTYPES
    from llm_audit.source.mxfp4 import FP4_VALUES

    for dtype in sorted(FLOAT_DTYPES):
        [value] = decode(bytes(DTYPE_SIZES[dtype]), dtype, (1,))
        assert value == 0 and not np.signbit(value), dtype
    scales = np.arange(255, dtype=np.uint8)[:, None]  # every scale byte but 255 (NaN)
    zeros = decode_mxfp4(np.zeros((255, 1, 16), np.uint8), scales)
    assert FP4_VALUES[0] == 0 and not np.signbit(zeros).any() and not zeros.any()


def test_a_weight_normed_layer_is_refused_and_copied_unchanged(tmp_path):
    """W = g * v / |v|: zeroing an entry of v would move |v| and every other entry of its
    channel, so a weight-normed layer with a trap is refused, with the reason, and its
    bytes are copied as they are."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    v = rng.standard_normal((64, 128)).astype(np.float32)
    v[3, 5] = 40.0  # a planted entry: a trap in W
    g = np.linalg.norm(v, axis=1, keepdims=True).astype(np.float32)  # W = v
    (tmp_path / "model").mkdir()
    save_file({"fc.weight_g": g, "fc.weight_v": v}, tmp_path / "model" / "model.safetensors")
    (row,) = _audit(tmp_path / "model", tmp_path / "report")
    entry = row["trap_entries"][0]
    assert (row["matrix"], entry["row"], entry["col"]) == ("fc.weight", 3, 5)
    result = ablate_checkpoint(
        str(tmp_path / "model"), tmp_path / "report", tmp_path / "zero", mode="zero", quiet=True
    )
    (matrix,) = result.matrices
    assert matrix["status"] == "refused" and "weight norm" in matrix["reason"]
    assert _file_bytes(tmp_path / "zero")["model.safetensors"].tobytes() == (
        (tmp_path / "model" / "model.safetensors").read_bytes()
    )
