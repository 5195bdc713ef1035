"""The commands that analyze: `analyze` (.npy matrices, in process), `demo`, `audit`, and
the two that prepare one: `plan` (what an audit would compute) and `synth`; and `ablate`,
which acts on an audit's findings (a copy of the checkpoint without its trap entries)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import UsageError
from ..inputs import at_least_one
from ..report.format import CORE_COLUMNS, human_bytes, not_planned_line, print_json, print_table
from ..source.synth import SIZE_FIELDS
from ..spectral.ablation import ABLATIONS
from ..spectral.backends import BACKEND_NAMES
from ..spectral.settings import RAND_ROUTES, AnalysisSettings

DEMO_COLUMNS = ("matrix", "kind", *CORE_COLUMNS, "status")
ANALYZE_COLUMNS = ("name", *CORE_COLUMNS, "entry_kurtosis", "status")


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)  # never unpickle user files
    except (ValueError, OSError, EOFError) as err:
        raise UsageError(f"{path}: not a readable .npy array ({err})") from None


def cmd_analyze(args: argparse.Namespace) -> int:
    from ..spectral.analyze import analyze_batch

    matrices = [_load_npy(Path(p)) for p in args.files]
    for path, matrix in zip(args.files, matrices, strict=True):
        if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.floating):
            raise UsageError(f"{path}: need a 2-D float array, got {matrix.dtype} {matrix.shape}")
    settings = AnalysisSettings(
        seed=args.seed,
        randomize=not args.no_randomize,
        backend=args.backend or AnalysisSettings.backend,
        rand_route=args.rand_route,
    )
    rows = analyze_batch(matrices, matrix_ids=[Path(p).name for p in args.files], settings=settings)
    for path, row in zip(args.files, rows, strict=True):
        row["name"] = str(path)
    if args.format == "json":
        print_json(rows)
    else:
        print_table(rows, ANALYZE_COLUMNS)
    return 1 if any(r["status"] == "error" for r in rows) else 0


def cmd_demo(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from ..source.synth import PLANTED, write_bundled_model
    from .audit import run_audit
    from .config import AuditConfig

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "gpt-oss-mini").is_dir():
        raise UsageError(f"{out} is not empty and not a demo folder; choose another --out")
    model = write_bundled_model(out / "gpt-oss-mini")  # rewrites an earlier demo's files
    print(f"llm-audit {__version__}: bundled miniature gpt-oss written to {model}", file=sys.stderr)
    result = run_audit(
        str(model),
        out / "report",
        AuditConfig(seed=args.seed),
        overwrite=True,  # an earlier demo's report: only its own files are removed
        quiet=args.quiet,
    )
    rows = pq.read_table(out / "report" / "layers.parquet").to_pylist()
    if args.format == "json":
        print_json(rows)
        return 1 if result.failed else 0
    summary = result.summary
    print(f"report: {result.out}")
    print(
        f"matrices: {summary['matrices_in_report']} (audited {summary['audited']}, "
        f"failed {summary['failed']}); traps: {summary['total_traps']} in "
        f"{summary['matrices_with_traps']} matrices"
    )
    print_table([r for r in rows if r["rand_num_spikes"]], DEMO_COLUMNS)
    found = {r["matrix"]: r["rand_num_spikes"] for r in rows}
    print("\nplanted traps (matrix: planted -> found):")
    for unit_id, planted in PLANTED.items():
        print(f"  {unit_id}: {planted} -> {found[unit_id]}")
    others = sum(v for k, v in found.items() if k not in PLANTED)
    print(f"traps in the other {len(found) - len(PLANTED)} matrices: {others}")
    return 1 if result.failed else 0


def cmd_audit(args: argparse.Namespace) -> int:
    from .audit import run_audit
    from .config import load_config

    config = load_config(args.config).with_overrides(
        seed=args.seed,
        include=args.include,
        exclude=args.exclude,
        randomize=False if args.no_randomize else None,
        backend=args.backend,
    )
    try:
        result = run_audit(
            args.model,
            args.out,
            config,
            revision=args.revision,
            address=args.address,
            resume=args.resume,
            retry_failed=args.retry_failed,
            overwrite=args.overwrite,
            quiet=args.quiet,
        )
    except KeyboardInterrupt:
        print(
            f"llm-audit: partial report in {args.out}; complete it with --resume", file=sys.stderr
        )
        return 130
    summary = result.summary
    # a failed matrix, or matrices missing from the report, is not a passing audit
    code = 1 if result.failed or result.status != "complete" else 0
    if args.format == "json":
        print_json({"report": str(result.out), "status": result.status, **summary})
        return code
    print(f"report: {result.out}")
    if result.status != "complete":
        print(f"status: {result.status} (matrices are missing from the report)")
    print(
        f"matrices: {summary['matrices_in_report']} of {summary['matrices_planned']} "
        f"(audited {summary['audited']}, skipped {summary['skipped']}, "
        f"failed {summary['failed']})"
    )
    left_out = not_planned_line(summary)
    if left_out:
        print(f"{left_out}; `llm-audit plan` lists each")
    if summary["bugs"]:
        print(f"bugs: {summary['bugs']} matrices failed on an unexpected error (see errors.log)")
    print(
        f"correlation traps: {summary['total_traps']} in {summary['matrices_with_traps']} matrices"
    )
    for kind, alpha in summary["mean_alpha_by_kind"].items():
        print(f"  mean alpha {kind:15s} {alpha:.3f}")
    return code


def cmd_plan(args: argparse.Namespace) -> int:
    from ..source.checkpoint import open_checkpoint
    from ..source.reference import resolve_model

    checkpoint = open_checkpoint(resolve_model(args.model, args.revision))
    plan = checkpoint.plan(args.min_evals)
    largest = plan.largest()
    if args.format == "json":
        payload = {
            "model": args.model,
            "files": [str(p) for p in checkpoint.model.files],
            "matrices": len(plan.units),
            "by_kind": plan.counts_by_kind(),
            "bytes_to_read": plan.bytes_to_read(),
            "bytes_on_disk": checkpoint.bytes_on_disk(),
            "largest": largest.id if largest else None,
            "skipped": plan.skipped_reasons(),
            "skipped_tensors": plan.skipped_list(),
            "units": [
                {
                    "id": u.id,
                    "tensor": u.tensor,
                    "kind": u.kind,
                    "layer": u.layer,
                    "expert": u.expert,
                    "shape": list(u.shape),
                    "source_dtype": u.source_dtype,
                    "bytes": u.nbytes,
                }
                for u in plan.units
            ],
        }
        json.dump(payload, sys.stdout, indent=1)
        print()
        return 0
    files = checkpoint.model.files
    print(f"model {args.model}: {len(files)} file(s), {human_bytes(checkpoint.bytes_on_disk())}")
    print(f"matrices to audit: {len(plan.units)}")
    for kind, count in plan.counts_by_kind().items():
        print(f"  {kind:15s} {count}")
    print(f"bytes to read: {human_bytes(plan.bytes_to_read())}")
    if largest:
        print(f"largest matrix: {largest.id} {largest.shape[0]}x{largest.shape[1]}")
    print(f"skipped tensors: {len(plan.skipped)}")
    for reason, count in plan.skipped_reasons().items():
        print(f"  {count:5d}  {reason}")
    return 0


def _parse_trap(text: str) -> tuple[str, int]:
    name, _, count = text.partition("=")
    try:
        return name, int(count or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--trap {text!r}: want NAME[EXPERT]=COUNT") from None


def cmd_synth(args: argparse.Namespace) -> int:
    from ..source.synth import BUNDLED, SynthConfig, synth_gpt_oss

    sizes = {k: v for k, v in vars(args).items() if k in _SYNTH_OPTIONS and v is not None}
    if args.bundled:
        if sizes or args.trap or args.no_mxfp4:
            raise UsageError("synth --bundled writes the bundled model: give no other options")
        cfg = BUNDLED
    else:
        cfg = SynthConfig(**sizes, mxfp4=not args.no_mxfp4, traps=dict(args.trap or []))
    out = synth_gpt_oss(args.out, cfg)
    files = sorted(str(p) for p in out.iterdir() if p.is_file())
    if args.format == "json":
        print_json({"model": str(out), "files": files})
    else:
        print(out)
    return 0


ABLATE_COLUMNS = ("matrix", "tensor", "entries", "mode", "status", "reason")


def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import ablate_checkpoint

    result = ablate_checkpoint(
        args.model,
        args.report,
        args.out,
        mode=args.mode,
        min_trap_ratio=args.min_trap_ratio,
        revision=args.revision,
        quiet=args.quiet,
    )
    if args.format == "json":
        print_json(result.to_dict())
        return 1 if result.refused else 0
    entries = sum(m["entries"] for m in result.matrices if m["status"] == "ablated")
    print(f"copy: {result.out} ({len(result.files)} files)")
    print(
        f"ablated ({result.mode}): {entries} entries in "
        f"{len(result.matrices) - result.refused} matrices; refused: {result.refused}"
    )
    if result.matrices:
        print_table(result.matrices, ABLATE_COLUMNS)
    for left in result.not_copied:
        print(f"not copied: {left['name']} ({left['reason']})")
    return 1 if result.refused else 0


# `synth` options that map onto SynthConfig fields (their defaults are SynthConfig's).
_SYNTH_OPTIONS = (*SIZE_FIELDS, "seed", "dtype", "trap_scale")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="folder, .safetensors file, or hub repo id in the local cache")
    p.add_argument("--revision", help="hub branch, tag or commit (repo ids only)")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "analyze",
        help="analyze 2-D matrices saved as .npy files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit analyze w_q.npy w_k.npy --seed 0
  llm-audit analyze layer.npy --format json | jq '.[0].rand_num_spikes'""",
    )
    p.add_argument("files", nargs="+", help=".npy files (loaded without pickle)")
    p.add_argument("--no-randomize", action="store_true", help="skip the shuffled ESD")
    p.add_argument("--seed", type=int, default=AnalysisSettings.seed, help="seed for the shuffles")
    p.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        help="array backend (default: auto, or $LLM_AUDIT_BACKEND)",
    )
    p.add_argument(
        "--rand-route",
        choices=RAND_ROUTES,
        default=AnalysisSettings.rand_route,
        help="shuffled spectrum: full ESD (default) or top-k Lanczos",
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "demo",
        help="audit the bundled miniature gpt-oss with planted traps",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit demo                    # demo-out/gpt-oss-mini and demo-out/report
  llm-audit demo --out /tmp/demo --format json""",
    )
    p.add_argument(
        "--out",
        default="demo-out",
        help="folder for the model and its report (an earlier demo replaced; default demo-out)",
    )
    p.add_argument("--seed", type=int, default=AnalysisSettings.seed, help="seed for the shuffles")
    p.add_argument("--format", choices=("table", "json"), default="table")
    _add_quiet(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "audit",
        help="audit a whole checkpoint with Ray into a report folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit audit openai/gpt-oss-20b --out reports/gpt-oss-20b --config configs/gpt-oss-20b.yaml
  llm-audit audit ./checkpoint --out report --include 'mlp\\.experts' --seed 1
  llm-audit audit ./checkpoint --out report --resume --retry-failed   # after a kill
  ray job submit --address http://HEAD:8265 --working-dir . -- \\
      llm-audit audit org/model --out /shared/reports/model""",
    )
    _add_model(p)
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--config", help="YAML config (see configs/default.yaml)")
    p.add_argument("--seed", type=int, help="run seed (overrides the config)")
    p.add_argument(
        "--include",
        action="append",
        metavar="REGEX",
        help="audit only matrices whose id matches (repeatable)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="REGEX",
        help="leave out matrices whose id matches (repeatable)",
    )
    p.add_argument("--no-randomize", action="store_true", help="skip shuffles and traps")
    p.add_argument("--backend", choices=BACKEND_NAMES, help="array backend in the workers")
    p.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else local)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="complete the report in --out (same model files, seed and config, or refused)",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume: compute the matrices whose rows are errors again",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the report in --out (only its own files are removed)",
    )
    _add_quiet(p)
    p.add_argument("--format", choices=("table", "json"), default="table", help="the summary")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "plan",
        help="list what an audit of MODEL would compute, reading no weights",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit plan openai/gpt-oss-20b          # matrices by kind, bytes to read, skipped
  llm-audit plan ./checkpoint --format json  # every unit and every skipped tensor""",
    )
    _add_model(p)
    p.add_argument(
        "--min-evals",
        type=at_least_one,
        default=AnalysisSettings.min_evals,
        help="skip smaller matrices",
    )
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "synth",
        help="write a synthetic checkpoint (real names, planted traps)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit synth gpt-oss tiny-gpt-oss --bundled   # the model `llm-audit demo` audits
  llm-audit synth gpt-oss big --layers 4 --experts 32 --hidden 1024 \\
      --trap 'model.layers.0.mlp.experts.down_proj[3]=5'""",
    )
    p.add_argument("family", choices=("gpt-oss",))
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--bundled", action="store_true", help="the bundled demo model (planted traps), as is"
    )
    for option in SIZE_FIELDS:
        p.add_argument(f"--{option.replace('_', '-')}", type=int, help="default: the bundled size")
    p.add_argument("--seed", type=int, help="of the random weights (default 0)")
    p.add_argument("--dtype", choices=("bf16", "f32"), help="dense tensors (default bf16)")
    p.add_argument("--no-mxfp4", action="store_true", help="dense experts (transformers layout)")
    p.add_argument(
        "--trap",
        type=_parse_trap,
        action="append",
        metavar="NAME[EXPERT]=COUNT",
        help="plant COUNT large entries in that matrix (repeatable)",
    )
    p.add_argument("--trap-scale", type=float, help="size of a planted entry (default 1)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "ablate",
        help="write a copy of MODEL with the entries behind a report's traps removed",
        description="""\
Copy MODEL's folder to --out byte for byte, except the trap entries that the report
(computed on these very files) names: zeroed, or clipped to the largest |w| among the
other entries of their matrix. Test a trap's effect by evaluating the copy
(WeightWatcher's remove_traps). Exit 1 when a matrix's entries have no exact encoding
in its format (listed with the reason, left as they are).""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  llm-audit ablate ./gpt-oss-20b --report reports/gpt-oss-20b --out ./gpt-oss-20b-no-traps
  llm-audit ablate ./checkpoint --report report --out copy --mode clip --min-trap-ratio 2
  llm-audit ablate ./checkpoint --report report --out copy --format json | jq '.matrices'""",
    )
    _add_model(p)
    p.add_argument("--report", required=True, help="report folder of an audit of MODEL")
    p.add_argument("--out", required=True, help="new or empty folder for the copy")
    p.add_argument(
        "--mode",
        choices=ABLATIONS,
        default="zero",
        help="zero the entries (default), or clip them to the largest other |w|, sign kept",
    )
    p.add_argument(
        "--min-trap-ratio",
        type=float,
        metavar="R",
        help="only the entries of traps whose own trap_ratio is at least R",
    )
    _add_quiet(p)
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_ablate)
