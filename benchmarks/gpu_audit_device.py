"""Full-size gpt-oss-20b audit on a lent GPU (H200): `python benchmarks/gpu_audit_device.py`.

Generates, on the GPU machine itself (so nothing large travels), a synthetic checkpoint
with gpt-oss-20b's real names, shapes, dtypes and 24 layers (13.8 GB: random valid MXFP4
experts, BF16 attention, embedding and lm_head), then runs `llm-audit audit` on a local
Ray that sees the GPU: one task per tensor takes its 32 experts as one CUDA batch. Prints
the time of each stage (generation, plan, Ray start, compute, finalize), matrices/s and
GB/s read, from the report's manifest. Needs ray, pyarrow, safetensors and a CUDA torch
on that machine (see the device tool's notes for carrying wheels).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_audit import build

from llm_audit.run.audit import run_audit
from llm_audit.run.config import AuditConfig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--workdir", default=None, help="where to write the checkpoint")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device visible: run this on the lent GPU machine", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        start = time.perf_counter()
        size = build(Path(tmp) / "gpt-oss-20b", args.layers, top_level=True)
        generated = time.perf_counter() - start
        print(
            f"generated {size / 1e9:.1f} GB in {generated:.0f} s on {torch.cuda.get_device_name()}"
        )
        out = Path(tmp) / "report"
        result = run_audit(str(Path(tmp) / "gpt-oss-20b"), out, AuditConfig())
        manifest = json.loads((out / "manifest.json").read_text())
        timings, io = manifest["timings"], manifest["io"]
        for stage, seconds in timings.items():
            print(f"  {stage:12s} {seconds:8.1f} s")
        compute = timings["compute_s"]
        print(
            f"{result.matrices} matrices ({result.failed} failed), backends "
            f"{manifest['backends']}: {result.matrices / compute:.1f} matrices/s, "
            f"{io['bytes_read'] / 1e9 / compute:.2f} GB/s read"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
