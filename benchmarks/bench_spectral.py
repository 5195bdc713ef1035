"""Spectral-core benchmark: llm_audit against the eigensolve floor and WeightWatcher 0.7.7.

Every ratio printed here is measured in one run, on the same matrices, one after the other
(this machine is shared and noisy: absolute seconds move with load, ratios much less).
The matrices are 8 float32 ones, 4 of dim x dim and 4 of dim x small (default 2880 and
512, gpt-oss-20b's expert and attention shapes), of four kinds with fixed seeds: Gaussian,
Gaussian with 10 planted large entries, Student-t (df 3) entries, and low rank + noise.

Steps, in order, each timed with `time.perf_counter` over all 8 matrices:

a. floor: float64 Gram of the smaller side (W upcast first, BLAS syrk) +
   `scipy.linalg.eigvalsh`,
   one ESD per matrix: what any exact method must pay at least once;
b. `analyze_matrix(W, randomize=True, backend="numpy")` (rand_route "full"): two ESDs
   (W and its shuffle), power-law and MP fits; target: within 2.5x of the floor;
c. the same with rand_route="topk"; its trap count and rand_bulk_max against (b);
d. WeightWatcher 0.7.7 `analyze(randomize=True)` (`--ww-mp-fit` adds mp_fit=True) on a
   torch model holding
   the same 8 matrices; target: WeightWatcher >= 5x our time (b);
e. `analyze_batch` on E "experts" of dim x dim with the default backend: seconds/matrix.

Usage:
    python benchmarks/bench_spectral.py                 # full run (many minutes on 2 cores)
    python benchmarks/bench_spectral.py --quick --skip-ww   # smoke run, < 1 minute
    python benchmarks/bench_spectral.py --json out.json     # also write the figures
    python benchmarks/bench_spectral.py --repeat 3          # steps a-c: best of 3 passes
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import sys
import time
import warnings
from typing import Any

import numpy as np
import scipy
import scipy.linalg
from scipy.linalg.blas import dsyrk

from llm_audit import analyze_batch, analyze_matrix
from llm_audit.spectral.backends import select_backend

SIGMA = 0.02  # entry scale, typical of trained transformer weights
KINDS = ("gaussian", "planted", "student_t3", "lowrank_noise")
FULL_DIM, FULL_SMALL, FULL_EXPERTS = 2880, 512, 32
QUICK_DIM, QUICK_SMALL, QUICK_EXPERTS = 1024, 512, 4
TARGET_FULL_OVER_FLOOR = 2.5  # analyze_matrix (full route) within 2.5x of the floor
TARGET_WW_OVER_OURS = 5.0  # WeightWatcher at least 5x slower than analyze_matrix


# --------------------------------------------------------------------------- matrices


def make_matrix(kind: str, n: int, m: int, seed: int) -> np.ndarray:
    """One deterministic float32 n x m test matrix of the given kind."""
    rng = np.random.default_rng(seed)
    edge_sv = SIGMA * (np.sqrt(n) + np.sqrt(m))  # MP bulk edge, in singular-value units
    if kind == "gaussian":
        w = SIGMA * rng.standard_normal((n, m))
    elif kind == "planted":
        # 10 isolated entries ~2.5x the bulk edge in singular value: 10 spikes (and traps,
        # since a shuffle moves them but keeps them isolated).
        w = SIGMA * rng.standard_normal((n, m))
        flat = rng.choice(n * m, size=10, replace=False)
        signs = rng.choice([-1.0, 1.0], size=10)
        w.ravel()[flat] = signs * 2.5 * edge_sv * rng.uniform(0.8, 1.2, size=10)
    elif kind == "student_t3":
        w = SIGMA * rng.standard_t(3, size=(n, m)) / np.sqrt(3.0)  # unit variance x SIGMA
    elif kind == "lowrank_noise":
        rank = 8
        u = rng.standard_normal((n, rank)) / np.sqrt(n)
        v = rng.standard_normal((m, rank)) / np.sqrt(m)
        s = edge_sv * np.linspace(2.5, 1.2, rank)
        w = SIGMA * rng.standard_normal((n, m)) + (u * s) @ v.T
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return np.ascontiguousarray(w, dtype=np.float32)


def test_matrices(dim: int, small: int) -> list[tuple[str, np.ndarray]]:
    """The 8 benchmark matrices: 4 kinds x (dim x dim, dim x small), fixed seeds."""
    out = []
    for shape_i, (n, m) in enumerate(((dim, dim), (dim, small))):
        for kind_i, kind in enumerate(KINDS):
            seed = 1000 + 10 * shape_i + kind_i
            out.append((f"{kind}_{n}x{m}", make_matrix(kind, n, m, seed)))
    return out


# --------------------------------------------------------------------------- environment


def blas_info() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl not installed"}]
    keep = ("user_api", "internal_api", "num_threads", "version", "threading_layer", "filepath")
    return [{k: info.get(k) for k in keep if k in info} for info in threadpool_info()]


def print_environment(blas: list[dict[str, Any]]) -> None:
    print("== environment")
    print(f"python {platform.python_version()}  numpy {np.__version__}  scipy {scipy.__version__}")
    print(f"cpu_count {os.cpu_count()}  loadavg {os.getloadavg()}")
    for env in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LLM_AUDIT_BACKEND"):
        if env in os.environ:
            print(f"{env}={os.environ[env]}")
    print("threadpoolctl:")
    for info in blas:
        fields = ", ".join(f"{k}={v}" for k, v in info.items() if k != "filepath")
        print(f"  {fields}")
        if "filepath" in info:
            print(f"    {info['filepath']}")


# --------------------------------------------------------------------------- steps


def _oriented64(w: np.ndarray) -> np.ndarray:
    w64 = w.astype(np.float64)
    return w64 if w64.shape[0] >= w64.shape[1] else w64.T


def warm_up() -> None:
    """Load BLAS/LAPACK threads and the analysis code paths outside any timed region."""
    w = make_matrix("gaussian", 200, 150, 1)
    g = _oriented64(w)
    scipy.linalg.eigvalsh(g.T @ g, check_finite=False)
    analyze_matrix(w, randomize=True, backend="numpy", matrix_id="warmup")
    analyze_matrix(w, randomize=True, backend="numpy", matrix_id="warmup", rand_route="topk")


def run_floor(mats: list[tuple[str, np.ndarray]]) -> dict[str, Any]:
    per, eig_total = [], 0.0
    t_all = time.perf_counter()
    for _, w in mats:
        t0 = time.perf_counter()
        w64 = _oriented64(w)
        # the fastest exact Gram here (BLAS syrk, one triangle), as our numpy route uses
        gram = dsyrk(1.0, w64.T, trans=0, lower=0)
        t1 = time.perf_counter()
        scipy.linalg.eigvalsh(gram, lower=False, check_finite=False)
        t2 = time.perf_counter()
        eig_total += t2 - t1
        per.append(t2 - t0)
    total = time.perf_counter() - t_all
    return {"total_s": total, "eigvalsh_s": eig_total, "per_matrix_s": per}


def run_ours(mats: list[tuple[str, np.ndarray]], rand_route: str) -> dict[str, Any]:
    rows, per = [], []
    t_all = time.perf_counter()
    for name, w in mats:
        t0 = time.perf_counter()
        row = analyze_matrix(
            w, randomize=True, seed=0, matrix_id=name, backend="numpy", rand_route=rand_route
        )
        per.append(time.perf_counter() - t0)
        rows.append(dict(row))
    total = time.perf_counter() - t_all
    return {"total_s": total, "per_matrix_s": per, "rows": rows}


def build_torch_model(mats: list[tuple[str, np.ndarray]]):
    """A Sequential of Linear layers whose weights are the matrices (not chainable)."""
    import torch

    layers = []
    for _, w in mats:
        n, m = w.shape  # Linear(in, out).weight is [out, in]
        lin = torch.nn.Linear(m, n, bias=False)
        lin.weight.data = torch.from_numpy(w.copy())
        layers.append(lin)
    return torch.nn.Sequential(*layers)


def run_weightwatcher(mats: list[tuple[str, np.ndarray]], mp_fit: bool) -> dict[str, Any]:
    """Time WeightWatcher's analyze on the same matrices, its output silenced."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        import weightwatcher as ww  # prints a CUDA notice at import
    for name in ("weightwatcher", "WW", "matplotlib"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model = build_torch_model(mats)
    watcher = ww.WeightWatcher(model=model)
    with (
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        details = watcher.analyze(randomize=True, mp_fit=mp_fit)
        total = time.perf_counter() - t0
    details = details.sort_values("layer_id").reset_index(drop=True)
    wanted = ["name", "N", "M", "alpha", "num_spikes", "rand_num_spikes", "rand_bulk_max"]
    records = details[[k for k in wanted if k in details.columns]].to_dict("records")
    rows = [{k: _plain(v) for k, v in rec.items()} for rec in records]
    return {
        "version": getattr(ww, "__version__", "?"),
        "mp_fit": mp_fit,
        "total_s": total,
        "layers_analyzed": len(details),
        "rows": rows,
    }


def run_batch(dim: int, experts: int) -> dict[str, Any]:
    """analyze_batch on `experts` dim x dim float32 matrices, default backend."""
    mats, ids = [], []
    for i in range(experts):  # one at a time: only the final list is held
        mats.append(make_matrix(KINDS[i % len(KINDS)], dim, dim, 5000 + i))
        ids.append(f"expert{i}")
    backend = select_backend(None).name
    t0 = time.perf_counter()
    rows = analyze_batch(mats, randomize=True, seed=0, matrix_ids=ids)
    total = time.perf_counter() - t0
    ok = sum(r["status"] == "ok" for r in rows)
    return {
        "backend": backend,
        "experts": experts,
        "dim": dim,
        "total_s": total,
        "per_matrix_s": total / experts,
        "ok_rows": ok,
    }


def _best_of(repeat: int, mats: list[tuple[str, np.ndarray]]) -> tuple[dict, dict, dict]:
    """Steps a-c in order, `repeat` times; each step keeps its fastest pass."""
    best: list[dict[str, Any] | None] = [None, None, None]
    for r in range(repeat):
        if repeat > 1:
            print(f"  pass {r + 1}/{repeat} of steps a-c ...", flush=True)
        runs = [run_floor(mats), run_ours(mats, "full"), run_ours(mats, "topk")]
        for i, run in enumerate(runs):
            if best[i] is None or run["total_s"] < best[i]["total_s"]:
                best[i] = run
    return best[0], best[1], best[2]  # type: ignore[return-value]


# --------------------------------------------------------------------------- report


def _fmt(v: Any, spec: str = ".6g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _rel(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-300)


def compare_routes(full: list[dict], topk: list[dict]) -> list[dict[str, Any]]:
    out = []
    for f, t in zip(full, topk, strict=True):
        out.append(
            {
                "spikes_equal": f["rand_num_spikes"] == t["rand_num_spikes"],
                "rand_bulk_max_rel_diff": _rel(t["rand_bulk_max"], f["rand_bulk_max"]),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: dim {QUICK_DIM}, small {QUICK_SMALL}, {QUICK_EXPERTS} experts",
    )
    p.add_argument("--skip-ww", action="store_true", help="skip the WeightWatcher step (d)")
    p.add_argument(
        "--ww-mp-fit",
        action="store_true",
        help="call WeightWatcher analyze(randomize=True, mp_fit=True): like for like with "
        "our columns (it then also fits W's own MP law); default is the issue's literal "
        "analyze(randomize=True), which is faster and reports no num_spikes",
    )
    p.add_argument("--skip-batch", action="store_true", help="skip the batched step (e)")
    p.add_argument("--dim", type=int, help="large side (default 2880, quick 1024)")
    p.add_argument("--small", type=int, help="small side of the thin matrices (default 512)")
    p.add_argument("--experts", type=int, help="experts in step e (default 32, quick 4)")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run steps a-c this many times and keep each step's fastest pass "
        "(damps load noise; default 1)",
    )
    p.add_argument("--json", metavar="PATH", help="write the measured figures to PATH")
    args = p.parse_args(argv)

    dim = args.dim or (QUICK_DIM if args.quick else FULL_DIM)
    small = args.small or (QUICK_SMALL if args.quick else FULL_SMALL)
    experts = args.experts or (QUICK_EXPERTS if args.quick else FULL_EXPERTS)
    blas = blas_info()
    print_environment(blas)
    result: dict[str, Any] = {
        "quick": args.quick,
        "dim": dim,
        "small": small,
        "experts": experts,
        "repeat": args.repeat,
        "blas": blas,
        "cpu_count": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }

    mats = test_matrices(dim, small)
    names = [name for name, _ in mats]
    print(f"\n== matrices: {len(mats)} float32: " + ", ".join(names))
    warm_up()

    floor, full, topk = _best_of(args.repeat, mats)
    print(
        f"\n[a] floor (fp64 Gram + scipy eigvalsh): {floor['total_s']:.3f} s"
        f"  (eigvalsh only {floor['eigvalsh_s']:.3f} s)"
    )
    r_full = full["total_s"] / floor["total_s"]
    print(
        f"[b] analyze_matrix numpy, rand_route=full: {full['total_s']:.3f} s"
        f"  = {r_full:.2f}x floor (target <= {TARGET_FULL_OVER_FLOOR}x)"
    )
    r_topk = topk["total_s"] / floor["total_s"]
    routes = compare_routes(full["rows"], topk["rows"])
    n_equal = sum(r["spikes_equal"] for r in routes)
    print(
        f"[c] analyze_matrix numpy, rand_route=topk: {topk['total_s']:.3f} s"
        f"  = {r_topk:.2f}x floor; rand_num_spikes equal to full on {n_equal}/{len(mats)}"
    )

    ww_res = None
    if not args.skip_ww:
        print(
            "[d] WeightWatcher analyze(randomize=True"
            f"{', mp_fit=True' if args.ww_mp_fit else ''}) ... (minutes)",
            flush=True,
        )
        ww_res = run_weightwatcher(mats, mp_fit=args.ww_mp_fit)
        r_ww = ww_res["total_s"] / full["total_s"]
        print(
            f"[d] WeightWatcher {ww_res['version']}: {ww_res['total_s']:.3f} s"
            f"  = {r_ww:.2f}x ours (full route; target >= {TARGET_WW_OVER_OURS}x);"
            f" {ww_res['total_s'] / topk['total_s']:.2f}x ours (topk route)"
        )
        print(
            f"    layers analyzed by WeightWatcher: {ww_res['layers_analyzed']} of {len(mats)}"
            + (
                ""
                if ww_res["layers_analyzed"] == len(mats)
                else "  <-- WW skipped layers (min_evals / max_evals / max_N)"
            )
        )
        ww_res["ratio_vs_full"] = r_ww
        ww_res["ratio_vs_topk"] = ww_res["total_s"] / topk["total_s"]

    # per-matrix table
    print("\n== per matrix (times in s; spikes: ours-full / ours-topk / WW)")
    head = (
        f"{'matrix':<24} {'floor':>6} {'full':>6} {'topk':>6}  {'alpha':>10} {'WW alpha':>10}"
        f" {'|d alpha|':>9}  {'spikes':>7} {'WW':>3}  {'rand_spikes':>11} {'WW':>3}"
        f"  {'rbm rel':>8}"
    )
    print(head)
    per_matrix = []
    ww_rows = ww_res["rows"] if ww_res else [None] * len(mats)
    if ww_res and len(ww_rows) != len(mats):
        ww_rows = [None] * len(mats)  # cannot align rows: WW skipped some layers
    for i, name in enumerate(names):
        f, t, w, rc = full["rows"][i], topk["rows"][i], ww_rows[i], routes[i]
        if w and (w.get("N"), w.get("M")) != (f["N"], f["M"]):
            print(
                f"  !! WW row {i} is {w.get('N')}x{w.get('M')}, ours {f['N']}x{f['M']}:"
                " rows not aligned, WW columns dropped"
            )
            w = None
        ww_alpha = w.get("alpha") if w else None
        d_alpha = (
            abs(f["alpha"] - ww_alpha) if ww_alpha is not None and f["alpha"] is not None else None
        )
        entry = {
            "matrix": name,
            "floor_s": floor["per_matrix_s"][i],
            "full_s": full["per_matrix_s"][i],
            "topk_s": topk["per_matrix_s"][i],
            "status": f["status"],
            "alpha": f["alpha"],
            "num_spikes": f["num_spikes"],
            "rand_num_spikes_full": f["rand_num_spikes"],
            "rand_num_spikes_topk": t["rand_num_spikes"],
            "rand_bulk_max_full": f["rand_bulk_max"],
            "rand_bulk_max_topk": t["rand_bulk_max"],
            **rc,
            "ww": w,
            "alpha_abs_diff_ww": d_alpha,
        }
        per_matrix.append(entry)
        rs = f"{f['rand_num_spikes']}/{t['rand_num_spikes']}"
        print(
            f"{name:<24} {entry['floor_s']:6.2f} {entry['full_s']:6.2f} {entry['topk_s']:6.2f}"
            f"  {_fmt(f['alpha'], '10.6f')} {_fmt(ww_alpha, '10.6f')}"
            f" {_fmt(d_alpha, '9.1e')}  {_fmt(f['num_spikes']):>7}"
            f" {_fmt(w.get('num_spikes') if w else None):>3}  {rs:>11}"
            f" {_fmt(w.get('rand_num_spikes') if w else None):>3}"
            f"  {_fmt(rc['rand_bulk_max_rel_diff'], '8.1e')}"
        )
    print("  rbm rel = |rand_bulk_max(topk) - rand_bulk_max(full)| / rand_bulk_max(full).")
    if ww_res:
        print("  WW shuffles with an unseeded global RNG, ours with (seed, matrix_id): trap")
        print("  counts (rand_num_spikes) may differ on borderline matrices; alpha should not.")

    batch = None
    if not args.skip_batch:
        print(
            f"\n[e] analyze_batch: {experts} experts of {dim}x{dim} float32, default backend ...",
            flush=True,
        )
        batch = run_batch(dim, experts)
        floor_sq = np.mean(
            [
                s
                for s, (_, w) in zip(floor["per_matrix_s"], mats, strict=True)
                if w.shape == (dim, dim)
            ]
        )
        batch["per_matrix_over_floor"] = batch["per_matrix_s"] / floor_sq
        print(
            f"[e] backend {batch['backend']}: {batch['total_s']:.2f} s total,"
            f" {batch['per_matrix_s']:.3f} s/matrix ({batch['per_matrix_over_floor']:.2f}x the"
            f" floor of a {dim}x{dim} matrix in [a]); rows ok {batch['ok_rows']}/{experts}"
        )

    # summary
    full_ok = r_full <= TARGET_FULL_OVER_FLOOR
    print("\n== summary (ratios measured in this run)")
    print(
        f"floor {floor['total_s']:.3f} s (eigvalsh {floor['eigvalsh_s']:.3f} s) over"
        f" {len(mats)} matrices, dim {dim}, small {small}"
    )
    print(
        f"ours full / floor   = {r_full:6.2f}x   target <= {TARGET_FULL_OVER_FLOOR}x:"
        f" {'MET' if full_ok else 'NOT MET'}"
    )
    print(
        f"ours topk / floor   = {r_topk:6.2f}x   (no target); trap counts equal to full on"
        f" {n_equal}/{len(mats)}"
    )
    ww_ok = None
    if ww_res:
        ww_ok = ww_res["ratio_vs_full"] >= TARGET_WW_OVER_OURS
        print(
            f"WeightWatcher / ours = {ww_res['ratio_vs_full']:6.2f}x   target >="
            f" {TARGET_WW_OVER_OURS}x: {'MET' if ww_ok else 'NOT MET'}"
            f"   (layers analyzed {ww_res['layers_analyzed']}/{len(mats)})"
        )
    else:
        print("WeightWatcher / ours = skipped (--skip-ww)")
    if batch:
        print(
            f"batched: {batch['per_matrix_s']:.3f} s/matrix over {experts} experts"
            f" (backend {batch['backend']})"
        )
    if args.quick:
        print("(--quick: smaller matrices; the targets are meant for the full run)")
    print(f"loadavg at end {os.getloadavg()}")

    result.update(
        floor=floor,
        full={"total_s": full["total_s"], "per_matrix_s": full["per_matrix_s"]},
        topk={"total_s": topk["total_s"], "per_matrix_s": topk["per_matrix_s"]},
        ratios={
            "full_over_floor": r_full,
            "topk_over_floor": r_topk,
            "ww_over_full": ww_res["ratio_vs_full"] if ww_res else None,
            "ww_over_topk": ww_res["ratio_vs_topk"] if ww_res else None,
        },
        targets={
            "full_over_floor_max": TARGET_FULL_OVER_FLOOR,
            "full_over_floor_met": full_ok,
            "ww_over_full_min": TARGET_WW_OVER_OURS,
            "ww_over_full_met": ww_ok,
        },
        topk_spikes_equal=n_equal,
        weightwatcher=(
            None if ww_res is None else {k: v for k, v in ww_res.items() if k != "rows"}
        ),
        batch=batch,
        per_matrix=per_matrix,
        loadavg_end=os.getloadavg(),
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2, default=_json_default)
        print(f"wrote {args.json}")
    return 0


def _plain(v: Any) -> Any:
    """numpy/pandas scalars as Python ones."""
    return v.item() if isinstance(v, np.generic) else v


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


if __name__ == "__main__":
    sys.exit(main())
