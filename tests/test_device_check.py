"""The device check's dry run, as CI runs it: the script must start and write its figures on
the lent machine, where there is no Ray, no ../shared and no PYTHONPATH.

So it runs here from a copy of the repository in a temporary folder (no ../shared beside
it), with a `ray` that fails on import ahead on the path, and must import `llm_audit` from
that copy, finish every stage on tiny sizes (torch on the CPU standing in for the GPU
routes), and leave its JSON in $OUT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("env", "accuracy", "throughput", "audit", "grok")


def test_dry_run_starts_without_ray_shared_or_pythonpath(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(
        ROOT / "llm_audit", copy / "llm_audit", ignore=shutil.ignore_patterns("__pycache__")
    )
    (copy / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "device_check.py", copy / "benchmarks")
    blocker = tmp_path / "no-ray"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ImportError('no Ray on the lent machine')\n")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OUT=str(out), PYTHONPATH=str(blocker), PYTHONSAFEPATH="1")
    proc = subprocess.run(
        [sys.executable, "benchmarks/device_check.py", "--dry-run"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "shared").exists()
    figures = json.loads((out / "device_check.json").read_text())
    assert [figures[s]["status"] for s in STAGES] == ["ok"] * len(STAGES)
    assert figures["env"]["llm_audit"] == str(copy / "llm_audit")
    audit = figures["audit"]
    assert audit["backends"] == ["torch"]
    assert audit["embed_and_lm_head"]["backends"] == ["numpy"]  # streamed on the host
    assert all(layer["failed"] == 0 for layer in audit["layers"].values())
    assert audit["projected_gpt_oss_20b_s"] > 0
    routes = figures["throughput"]["4x192x96"]
    assert set(routes) == {"torch_batched", "torch_looped"}
    assert routes["torch_looped"]["max_abs_over_lmax_vs_first_route"] < 1e-12
    assert figures["accuracy"]["gauss_128x64"]["torch_float64"]["max_abs_over_lmax_vs_host"] < 1e-12
