"""Peak memory of a whole audit against checkpoint size: `python benchmarks/bench_memory.py`.

Writes two synthetic gpt-oss checkpoints that differ only in depth (same matrix shapes:
32 dense BF16 experts of 2048x1024 and 1024x1024 per layer, a 65536x1024 embedding and
lm_head), about 1 GB and 4 GB on disk, audits each with `llm-audit audit` in a
subprocess on a local Ray, and samples every 0.25 s the summed proportional set size
(PSS, /proc/PID/smaps_rollup) of that process and all its descendants — Ray's GCS,
raylet and workers included. Prints the peaks, their ratio (streaming means memory must
not grow with depth: target within 20%, and under 2 GB) and bytes read / bytes on disk.
The embedding and lm_head are streamed (memory budget 64 MB) to exercise that path.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from llm_audit.source.synth import SynthConfig, synth_gpt_oss

SHAPE = {
    "experts": 32,
    "hidden": 1024,
    "intermediate": 1024,
    "heads": 16,
    "kv_heads": 4,
    "head_dim": 64,
    "vocab": 65536,
    "mxfp4": False,
    "dtype": "bf16",
}


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def _pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss(root: int) -> tuple[int, int]:
    """(summed PSS in bytes, number of processes) of `root` and its descendants."""
    tree, stack, total, count = _children(), [root], 0, 0
    while stack:
        pid = stack.pop()
        total += _pss_kb(pid)
        count += 1
        stack.extend(tree.get(pid, []))
    return total * 1024, count


def audit(model: Path, out: Path) -> dict:
    config = out.parent / "memory.yaml"
    config.write_text("memory_budget_mb: 64\n")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llm_audit.cli",
            "audit",
            str(model),
            "--out",
            str(out),
            "--config",
            str(config),
            "--quiet",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0, 0]

    def sample() -> None:
        while proc.poll() is None:
            pss, count = tree_pss(proc.pid)
            if pss > peak[0]:
                peak[:] = [pss, count]
            time.sleep(0.25)

    thread = threading.Thread(target=sample)
    start = time.perf_counter()
    thread.start()
    _, err = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"audit failed ({proc.returncode}): {err[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {
        "peak_pss_bytes": peak[0],
        "processes_at_peak": peak[1],
        "seconds": time.perf_counter() - start,
        **manifest["io"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--layers",
        type=int,
        nargs=2,
        default=[4, 18],
        help="depths of the small and the large checkpoint",
    )
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            model = synth_gpt_oss(Path(tmp) / f"m{layers}", SynthConfig(layers=layers, **SHAPE))
            fig = audit(model, Path(tmp) / f"r{layers}")
            runs[layers] = fig
            print(
                f"{layers:3d} layers: {fig['bytes_on_disk'] / 1e9:.2f} GB on disk, peak PSS "
                f"{fig['peak_pss_bytes'] / 1e9:.2f} GB over {fig['processes_at_peak']} "
                f"processes, read {fig['bytes_read'] / fig['bytes_on_disk']:.3f} of the "
                f"bytes on disk, {fig['seconds']:.0f} s"
            )
            for path in model.glob("*.safetensors"):
                path.unlink()
    small, large = (runs[k] for k in args.layers)
    ratio = large["peak_pss_bytes"] / small["peak_pss_bytes"]
    size = large["bytes_on_disk"] / small["bytes_on_disk"]
    ok = ratio <= 1.2 and large["peak_pss_bytes"] < 2e9
    print(
        f"checkpoint {size:.1f}x larger -> peak memory {ratio:.2f}x "
        f"(target <= 1.2x and < 2 GB: {'MET' if ok else 'NOT MET'})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
