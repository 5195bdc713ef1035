"""The header reader accepts what safetensors writes and rejects every malformed file
with a one-line CheckpointError naming the file and tensor."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from safetensors import safe_open
from safetensors.numpy import save_file

from llm_audit.errors import CheckpointError
from llm_audit.source.header import read_header, read_tensor_bytes

from .fuzz_safetensors import check_reader, join, mutated_bytes, mutated_headers, split, valid_file


def test_valid_file_matches_safetensors(tmp_path):
    path = tmp_path / "ok.safetensors"
    tensors = {
        "w": np.ones((3, 4), np.float32),
        "b": np.zeros(0, np.float16),
        "i": np.arange(6, dtype=np.int64),
    }
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "x"}
    assert header.file_size == path.stat().st_size
    with safe_open(path, framework="numpy") as handle:
        names = handle.keys()
        assert set(names) == set(header.tensors)
        for name in names:
            assert list(header.tensors[name].shape) == handle.get_slice(name).get_shape()
            assert read_tensor_bytes(header, name) == handle.get_tensor(name).tobytes()
    assert len(header.header_sha256) == 64
    empty = tmp_path / "empty.safetensors"
    save_file({}, empty)
    assert read_header(empty).tensors == {}


def test_partial_reads_stay_inside_the_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"w": np.arange(8, dtype=np.float32)}, path)
    header = read_header(path)
    assert read_tensor_bytes(header, "w", 8, 8) == np.arange(2, 4, dtype="<f4").tobytes()
    with pytest.raises(CheckpointError, match="outside the tensor"):
        read_tensor_bytes(header, "w", 24, 16)


def _bad(tmp_path, raw: bytes, match: str, tensor: str | None = None, **kwargs):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=match) as err:
        read_header(path, **kwargs)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert err.value.tensor == tensor
    if tensor:
        assert repr(tensor) in str(err.value)


def _with(entry_changes: dict | None = None, data_cut: int = 0, **header_changes) -> bytes:
    header, data = split(valid_file())
    if entry_changes:
        header["a.weight"].update(entry_changes)
    header.update(header_changes)
    return join(header, data[: len(data) - data_cut])


def test_truncated_files(tmp_path):
    raw = valid_file()
    _bad(tmp_path, raw[:5], "no 8-byte header length")
    _bad(tmp_path, raw[:30], "larger than the file")
    _bad(tmp_path, raw[:-3], r"tensors end at byte \d+ but the file has")


def test_header_length_checks(tmp_path):
    _bad(tmp_path, struct.pack("<Q", 10**7) + b"{}", "larger than the file")
    _bad(tmp_path, valid_file(), "exceeds the 16-byte cap", max_header_bytes=16)
    _bad(tmp_path, struct.pack("<Q", 0), "header length is 0")


def test_header_encoding_and_json(tmp_path):
    _bad(tmp_path, struct.pack("<Q", 4) + b"{\xff}\x00", "not valid UTF-8")
    _bad(tmp_path, struct.pack("<Q", 5) + b"{nope", "not valid JSON")
    _bad(tmp_path, join([1, 2], b""), "not an object")
    dup = b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": 1}'
    _bad(tmp_path, struct.pack("<Q", len(dup)) + dup + b"\0" * 4, "duplicate key")
    _bad(tmp_path, _with(__metadata__={"k": 1}), "__metadata__ must map strings")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dtype": "F128"}, "unknown dtype"),
        ({"shape": [3, -4]}, "non-negative ints"),
        ({"shape": [3.0, 4]}, "non-negative ints"),
        ({"shape": [True, 4]}, "non-negative ints"),
        ({"shape": [3, 5]}, r"byte range 48 != shape \[3, 5\]"),
        ({"data_offsets": [0, 10**12]}, "byte range"),
        ({"data_offsets": [8, 4]}, "0 <= begin <= end"),
        ({"extra": 1}, r"unknown \['extra'\]"),
    ],
)
def test_bad_entries(tmp_path, change, match):
    _bad(tmp_path, _with(change), match, tensor="a.weight")


def test_overlap_gap_and_padding(tmp_path):
    header, data = split(valid_file())
    first = min(
        (n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0]
    )
    begin, end = header[first]["data_offsets"]
    gap = json.loads(json.dumps(header))
    gap[first]["data_offsets"] = [begin + 4, end + 4]  # a hole before it, overlap after
    _bad(tmp_path, join(gap, data), "leaves a gap", tensor=first)
    second = min(
        (n for n in header if n not in ("__metadata__", first)),
        key=lambda n: header[n]["data_offsets"][0],
    )
    overlap = json.loads(json.dumps(header))
    b2, e2 = overlap[second]["data_offsets"]
    overlap[second]["data_offsets"] = [b2 - 4, e2 - 4]
    _bad(tmp_path, join(overlap, data), "overlaps the previous tensor", tensor=second)
    _bad(tmp_path, join(header, data + b"\0" * 8), "truncated or padded")


@pytest.mark.parametrize(
    "name",
    [
        "bad\x00name",
        "esc\x1b[2Jname",
        "c1\x85name",  # NEL, a C1 control
        "rtl\u202ename",  # RIGHT-TO-LEFT OVERRIDE (bidi)
        "zw\u200bname",  # ZERO WIDTH SPACE (format)
        "line\u2028name",
        "lone\ud800surrogate",  # a JSON escape decodes to a lone surrogate
    ],
)
def test_control_format_and_surrogate_characters_in_names(tmp_path, name):
    header, data = split(valid_file())
    header[name] = header.pop("a.weight")
    raw = join(header, data)  # json.dumps writes the surrogate as the escape \ud800
    _bad(tmp_path, raw, "control, format or surrogate characters", tensor=name)


def test_printable_unicode_names_pass(tmp_path):
    header, data = split(valid_file())
    header["model.层.0.poids_é.weight"] = header.pop("a.weight")
    path = tmp_path / "ok.safetensors"
    path.write_bytes(join(header, data))
    assert "model.层.0.poids_é.weight" in read_header(path).tensors


def test_not_a_file(tmp_path):
    _bad_dir = tmp_path / "dir.safetensors"
    _bad_dir.mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_header(_bad_dir)
    with pytest.raises(CheckpointError, match="cannot open"):
        read_header(tmp_path / "missing.safetensors")


FUZZ = settings(
    max_examples=150,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(raw=mutated_headers())
def test_fuzz_structured_mutations(tmp_path, raw):
    check_reader(raw, tmp_path / "fuzz.safetensors")


@FUZZ
@given(raw=mutated_bytes())
def test_fuzz_byte_mutations(tmp_path, raw):
    check_reader(raw, tmp_path / "fuzz.safetensors")
