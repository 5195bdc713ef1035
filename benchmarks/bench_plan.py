"""Planning time: `python benchmarks/bench_plan.py [--tensors 100000] [--json PATH]`.

Why: the plan runs on the driver before any work starts, once per audit and once per
`llm-audit plan`, and it must stay a matter of seconds for the largest checkpoints. Two
headers, each written as real safetensors files (valid headers over sparse holes: no
weight bytes on disk) and then opened and planned as an audit does — header parsing and
validation, index cross-checks, roles, FP8 pairing, every unit:

- gpt-oss-120b with its real names, dtypes and shapes (/work/shared/data/gpt-oss-120b;
  skipped with a note when that folder is absent): 9,398 matrices;
- a synthetic DeepSeek-V3-style header of `--tensors` tensors (default 100,000): FP8
  expert weights, each with its `weight_scale_inv`, in many layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.dtypes import tensor_nbytes
from llm_audit.source.reference import resolve_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_headers_only(folder: Path, tensors: dict[str, dict], config: dict) -> None:
    """One safetensors file: a valid header, then a sparse hole as large as the data."""
    folder.mkdir(parents=True)
    header, offset = {}, 0
    for name, meta in tensors.items():
        size = tensor_nbytes(meta["dtype"], meta["shape"])
        header[name] = {**meta, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        handle.truncate(8 + len(text) + offset)
    (folder / "config.json").write_text(json.dumps(config))


def synthetic(count: int) -> tuple[dict[str, dict], dict]:
    """`count` tensors named like DeepSeek-V3's routed experts, in FP8 with block scales."""
    tensors: dict[str, dict] = {}
    layer = expert = 0
    while len(tensors) < count:
        for proj, shape in (
            ("gate_proj", [256, 512]),
            ("up_proj", [256, 512]),
            ("down_proj", [512, 256]),
        ):
            name = f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
            tensors[name] = {"dtype": "F8_E4M3", "shape": shape}
            tensors[name + "_scale_inv"] = {
                "dtype": "F32",
                "shape": [shape[0] // 128, shape[1] // 128],
            }
        expert += 1
        if expert == 256:
            layer, expert = layer + 1, 0
    tensors = dict(list(tensors.items())[:count])
    config = {
        "model_type": "deepseek_v3",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    return tensors, config


def time_plan(folder: Path) -> dict:
    start = time.perf_counter()
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    opened = time.perf_counter()
    plan = checkpoint.plan(8)
    done = time.perf_counter()
    return {
        "tensors": len(checkpoint.where),
        "matrices": len(plan.units),
        "skipped": len(plan.skipped),
        "open_s": round(opened - start, 3),
        "plan_s": round(done - opened, 3),
        "total_s": round(done - start, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=100_000, help="synthetic header size")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        real = SHARED / "gpt-oss-120b"
        if (real / "tensors.json").is_file():
            tensors = json.loads((real / "tensors.json").read_text())
            config = json.loads((real / "config.json").read_text())
            write_headers_only(Path(tmp) / "gpt-oss-120b", tensors, config)
            results["gpt-oss-120b"] = time_plan(Path(tmp) / "gpt-oss-120b")
        else:
            print(f"gpt-oss-120b: skipped ({real} not present)")
        tensors, config = synthetic(args.tensors)
        write_headers_only(Path(tmp) / "synthetic", tensors, config)
        results[f"synthetic-{args.tensors}"] = time_plan(Path(tmp) / "synthetic")
    for name, figures in results.items():
        print(
            f"{name}: {figures['tensors']} tensors -> {figures['matrices']} matrices, "
            f"{figures['skipped']} skipped; open {figures['open_s']} s + plan "
            f"{figures['plan_s']} s = {figures['total_s']} s"
        )
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
