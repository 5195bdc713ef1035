"""Audit throughput on gpt-oss-20b's real shapes: `python benchmarks/bench_audit.py`.

Builds a checkpoint holding the first `--layers` (default 2) layers of gpt-oss-20b with
the real tensor names, dtypes and shapes (from ../shared/data): per layer 32 MXFP4
experts of 5760x2880 and 2880x2880, attention (q 4096x2880, k/v 512x2880, o 2880x4096)
and the router. Contents are random but valid (BF16 Gaussians, random FP4 bytes with
scales near 2^-6); the cost of an audit does not depend on them. Then runs
`llm-audit audit` on a local Ray with one task at a time and with one per core, and
prints matrices/s, MB/s and the projected time for all 24 layers, with the ratio of the
two runs measured one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from llm_audit.run.audit import run_audit
from llm_audit.run.config import AuditConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt-oss-20b"


def build(folder: Path, layers: int, *, top_level: bool = False) -> int:
    """Write the first `layers` layers (one shard per layer), and with `top_level` the
    embedding, lm_head and final norm in one more shard; returns bytes on disk."""
    spec = json.loads((SHARED / "tensors.json").read_text())
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    weight_map = {}
    groups = [f"model.layers.{layer}." for layer in range(layers)] + ([""] if top_level else [])
    for index, prefix in enumerate(groups):
        tensors = {}
        for name, meta in spec.items():
            in_layer = name.startswith("model.layers.")
            if (prefix and not name.startswith(prefix)) or (not prefix and in_layer):
                continue
            shape = meta["shape"]
            if name.endswith("_blocks"):
                tensors[name] = torch.from_numpy(rng.integers(0, 256, shape, dtype=np.uint8))
            elif name.endswith("_scales"):
                tensors[name] = torch.from_numpy(rng.integers(118, 124, shape, dtype=np.uint8))
            else:
                values = rng.standard_normal(shape, dtype=np.float32) * 0.02
                tensors[name] = torch.from_numpy(values).to(torch.bfloat16)
        shard = f"model-{index:05d}-of-{len(groups) - 1:05d}.safetensors"
        save_file(tensors, folder / shard)
        weight_map |= dict.fromkeys(tensors, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def audit(model: Path, out: Path, max_in_flight: int) -> dict:
    start = time.perf_counter()
    result = run_audit(str(model), out, AuditConfig(max_in_flight=max_in_flight), quiet=True)
    wall = time.perf_counter() - start
    manifest = json.loads((out / "manifest.json").read_text())
    compute = manifest["timings"]["compute_s"]
    return {
        "matrices": result.matrices,
        "failed": result.failed,
        "wall_s": wall,
        "compute_s": compute,
        "bytes_read": manifest["io"]["bytes_read"],
        "matrices_per_s": result.matrices / compute,
        "mb_per_s": manifest["io"]["bytes_read"] / 1e6 / compute,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "gpt-oss-20b-layers"
        size = build(model, args.layers)
        print(
            f"checkpoint: {args.layers} layers of gpt-oss-20b shapes, {size / 1e9:.2f} GB; "
            f"{os.cpu_count()} CPUs"
        )
        runs = {}
        for label, in_flight in (("1 worker", 1), (f"{os.cpu_count()} workers", 0)):
            runs[label] = fig = audit(model, Path(tmp) / label.replace(" ", "-"), in_flight)
            per_layer = fig["compute_s"] / args.layers
            print(
                f"{label}: {fig['matrices']} matrices in {fig['compute_s']:.1f} s "
                f"({fig['matrices_per_s']:.2f} matrices/s, {fig['mb_per_s']:.1f} MB/s read), "
                f"failed {fig['failed']}; projected 24 layers: {24 * per_layer / 60:.1f} min "
                "(+ embedding and lm_head)"
            )
        one, many = runs.values()
        print(
            f"speed-up {many['matrices_per_s'] / one['matrices_per_s']:.2f}x with "
            f"{os.cpu_count()} workers"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
