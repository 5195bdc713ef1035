"""Hypothesis strategies that mutate valid safetensors files, and the property they must keep.

Shared by the test suite (few examples) and `benchmarks/fuzz_reader.py` (10,000+).
The property: `read_header` returns a header whose tensors tile the file exactly, or
raises `CheckpointError` — no other exception, no hang.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from safetensors.numpy import save as save_bytes

from llm_audit.errors import CheckpointError
from llm_audit.source.header import read_header


def valid_file() -> bytes:
    """A small valid file with three dtypes and metadata."""
    return save_bytes(
        {
            "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            "b.bias": np.arange(5, dtype=np.float16),
            "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        },
        metadata={"format": "pt"},
    )


def split(raw: bytes) -> tuple[dict, bytes]:
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join(header: object, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated_headers(draw: st.DrawFn) -> bytes:
    """Structure-aware: change, drop or add fields of a valid header, keep the prefix right."""
    header, data = split(valid_file())
    for _ in range(draw(st.integers(1, 4))):
        name = draw(st.sampled_from(sorted(header)))
        action = draw(st.sampled_from(["value", "field", "drop", "add", "number", "data"]))
        if action == "value":
            header[name] = draw(json_values)
        elif action == "field" and isinstance(header[name], dict) and header[name]:
            key = draw(st.sampled_from(sorted(header[name])))
            header[name][key] = draw(json_values)
        elif action == "drop":
            del header[name]
        elif action == "add":
            header[draw(st.text(max_size=10))] = draw(json_values)
        elif action == "number" and isinstance(header[name], dict):
            offsets = header[name].get("data_offsets")
            if isinstance(offsets, list) and offsets:
                offsets[draw(st.integers(0, len(offsets) - 1))] = draw(st.integers(-5, 200))
        elif action == "data":
            data = data[: draw(st.integers(0, len(data)))]
    return join(header, data)


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """Byte-level: flip, insert or delete bytes near the start, or forge the length prefix."""
    raw = bytearray(valid_file())
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "length", "truncate"]))
        pos = draw(st.integers(0, max(0, min(len(raw), 200) - 1)))
        if action == "flip" and raw:
            raw[pos] ^= draw(st.integers(1, 255))
        elif action == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and raw:
            del raw[pos : pos + draw(st.integers(1, 8))]
        elif action == "length":
            raw[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
        elif action == "truncate":
            del raw[draw(st.integers(0, len(raw))) :]
    return bytes(raw)


def check_reader(raw: bytes, path: Path) -> str:
    """Write `raw`, read its header; assert the property; return 'ok' or the error kind."""
    path.write_bytes(raw)
    try:
        header = read_header(path, max_header_bytes=1 << 16)
    except CheckpointError as err:
        assert "\n" not in str(err) and str(path) in str(err)
        return err.message.split(" (")[0][:60]
    position = header.data_start
    for info in sorted(header.tensors.values(), key=lambda t: t.start):
        assert info.start == position and info.end <= len(raw)
        position = info.end
    assert position == len(raw)
    return "ok"
