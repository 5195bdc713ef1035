"""Training speed with and without `--flush-denormals`, from a grok run's saved state.

`python benchmarks/bench_flush_denormals.py [RUN] [--steps N]` (RUN defaults to the
committed init-8 float64 run, reports/grok-mlp-mnist-s8-wd0). Why: late in that run most
of Adam's moments are denormal (below 2.2e-308 in float64), and on some CPUs the slow
path for them cut the run to ~55 steps/s. This script prints the CPU, loads the run's
state.safetensors, counts its denormal entries, then trains N steps from it twice in
this process, on one thread, first as it is and then with denormals flushed to zero, and
prints both rates, their ratio, and whether the weights after N steps are the same bit
for bit (the claim `run_grok`'s docstring makes). Needs MNIST (the `grok` extra) and a
run whose state is late enough to have denormals; an early state shows a ratio near 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from llm_audit.grok.run import data_cache
from llm_audit.grok.settings import GrokConfig, load_grok_config
from llm_audit.grok.tasks import build_task
from llm_audit.grok.train import load_state, optimizer, state_step, train_step

ROOT = Path(__file__).resolve().parents[1]


def denormal_counts(state: Path) -> dict[str, tuple[int, int]]:
    """Per tensor of the state file: (denormal entries, entries)."""
    out = {}
    with safe_open(state, "pt") as fh:
        for key in fh.keys():  # noqa: SIM118
            t = fh.get_tensor(key)
            if t.is_floating_point():
                tiny = torch.finfo(t.dtype).tiny
                out[key] = (int(((t != 0) & (t.abs() < tiny)).sum()), t.numel())
    return out


def timed_run(config: GrokConfig, state: Path, steps: int, flush: bool) -> tuple[float, dict]:
    """Seconds for `steps` steps from `state`, and the weights they end at."""
    task = build_task(config, None, data_cache())
    opt = optimizer(task.model, config)
    first = load_state(state, task, opt)
    task.model.train()
    if not torch.set_flush_denormal(flush):
        sys.exit("this CPU cannot flush denormal numbers")
    try:
        t = time.perf_counter()
        for step in range(first, first + steps):
            train_step(task, opt, config, step)
        seconds = time.perf_counter() - t
    finally:
        torch.set_flush_denormal(False)
    return seconds, {k: v.detach().clone() for k, v in task.model.state_dict().items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default=str(ROOT / "reports/grok-mlp-mnist-s8-wd0"))
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    run = Path(args.run)
    settings = json.loads((run / "run.json").read_text())["config"]
    config = load_grok_config(None, settings.pop("task"), **settings)
    torch.set_num_threads(1)  # the flush setting is the calling thread's
    state = run / "state.safetensors"
    cpu = Path("/proc/cpuinfo")
    models = [line for line in cpu.read_text().splitlines() if line.startswith("model name")]
    print(f"CPU: {models[0].split(':', 1)[1].strip() if models else platform.processor()}")
    print(f"{state}: step {state_step(state)}")
    for key, (denormal, n) in denormal_counts(state).items():
        if denormal:
            print(f"  {key}: {denormal:,} of {n:,} entries denormal")
    as_is, w_as_is = timed_run(config, state, args.steps, flush=False)
    flushed, w_flushed = timed_run(config, state, args.steps, flush=True)
    same = all(torch.equal(w_as_is[k], w_flushed[k]) for k in w_as_is)
    print(f"as is:   {args.steps / as_is:7.1f} steps/s")
    print(f"flushed: {args.steps / flushed:7.1f} steps/s  ({as_is / flushed:.2f}x)")
    print(f"weights after {args.steps} steps the same bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
