"""GPU check and throughput for the eigenvalue backends, for one lent GPU (written for an H200).

What it does, in order (about 2-4 minutes on an H200; each step prints as it finishes):

a. exits with a clear message (status 2) unless `torch.cuda.is_available()`;
b. accuracy: for backend "cuda" (torch) and, when `import cupy` works, "cupy": eigenvalues
   from `backend.esd` of a few random matrices (Gaussian, heavy-tailed, and one whose
   spectrum spans ~1e8) against float64 numpy SVD values; prints the max relative error
   over eigenvalues >= 1e-6 lambda_max and the max error relative to lambda_max, and
   checks `top_esd` against the reference's top eigenvalues;
c. throughput of `backend.esd(stack)` for 32 x 2880 x 2880 float32 (one call) and for one
   5760 x 2880, after a warm-up, with device synchronization; also 4 single-matrix calls,
   to see whether the one-call batch is faster than a loop;
d. `analyze_batch` on the 32 experts with backend "cuda", against backend "numpy" on 2 of
   them (extrapolated to 32), plus the host-side shuffle cost per matrix; checks that the
   two backends give the same alpha and trap counts on those 2.

Usage: python benchmarks/gpu_device.py [--experts 32] [--skip-cupy] [--json PATH]
       python benchmarks/gpu_device.py --cpu-dry-run   # small sizes, torch on CPU: checks
                                                      # the script itself without a GPU
Needs a CUDA build of torch (the CPU-only wheel makes step a stop); CuPy is optional.
Exit status: 0 all checks passed, 1 an accuracy check failed, 2 no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

DIM, WIDE = 2880, 5760
DRY_DIM, DRY_WIDE, DRY_EXPERTS = 256, 512, 4
REL_TOL = 1e-6  # eigenvalues >= 1e-6 lambda_max vs the fp64 SVD (an fp32 Gram gives ~1e-2)
ABS_TOL = 1e-11  # |error| / lambda_max over all eigenvalues
BATCH_WARN_S = 120.0  # shrink a timed batch if a warm-up predicts more than this


def _t0() -> float:
    return time.perf_counter()


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def check_cuda() -> Any:
    try:
        import torch
    except ImportError:
        print("torch is not installed: nothing to run on the GPU.", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        print(
            f"torch {torch.__version__} sees no CUDA device (torch.version.cuda ="
            f" {torch.version.cuda}); this script needs a GPU and a CUDA build of torch."
            " Nothing measured.",
            file=sys.stderr,
        )
        sys.exit(2)
    props = torch.cuda.get_device_properties(0)
    print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {props.name},"
        f" {props.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible"
    )
    return torch


def gpu_backends(skip_cupy: bool) -> list[Any]:
    from llm_audit.errors import BackendError
    from llm_audit.spectral.backends import select_backend

    out = [select_backend("cuda")]
    if skip_cupy:
        return out
    try:
        import cupy
    except ImportError:
        print("cupy: not importable, skipped")
        return out
    try:
        out.append(select_backend("cupy"))
        print(f"cupy {cupy.__version__}")
    except BackendError as exc:
        print(f"cupy: importable but unusable, skipped ({exc})")
    return out


def sync(backend: Any) -> None:
    if backend.name == "cupy":
        import cupy

        cupy.cuda.Device().synchronize()
    elif backend.name == "cuda":
        import torch

        torch.cuda.synchronize()


def free_device_memory() -> None:
    """Hand cached blocks back between backends (torch and CuPy keep separate pools)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import cupy
    except ImportError:
        return
    # any CUDA runtime failure here means there is nothing to free
    with contextlib.suppress(Exception):
        cupy.get_default_memory_pool().free_all_blocks()


def timed(backend: Any, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(backend)
    t = _t0()
    out = fn()
    sync(backend)
    return time.perf_counter() - t, out


# --------------------------------------------------------------------------- b. accuracy


def accuracy_matrices(scale: int = 1) -> list[tuple[str, np.ndarray]]:
    """Test matrices; `scale` > 1 divides the sizes (dry run)."""
    rng = np.random.default_rng(7)
    a, b, c = 1024 // scale, 512 // scale, 2880 // scale
    d = 2048 // scale
    mats = [
        (f"gauss_{a}x{b}", rng.standard_normal((a, b))),
        (f"t3_{c}x{b}", rng.standard_t(3, size=(c, b))),
        (f"gauss_{d}x{d}", rng.standard_normal((d, d))),
    ]
    # singular values spanning 1e4 (eigenvalues 1e8): the fp32-Gram failure case
    n, m = d, d // 2
    u, _ = np.linalg.qr(rng.standard_normal((n, m)))
    v, _ = np.linalg.qr(rng.standard_normal((m, m)))
    s = np.logspace(0, -4, m)
    mats.append((f"wide_range_{n}x{m}", (u * s) @ v.T))
    return [(name, np.ascontiguousarray(w, dtype=np.float32)) for name, w in mats]


def reference_evals(w: np.ndarray) -> np.ndarray:
    sv = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    return np.sort(sv * sv)


def check_accuracy(backends: list[Any], scale: int) -> tuple[bool, list[dict[str, Any]]]:
    ok, rows = True, []
    mats = accuracy_matrices(scale)
    refs = [reference_evals(w) for _, w in mats]
    for be in backends:
        for (name, w), ref in zip(mats, refs, strict=True):
            got = be.esd(w[None])[0]
            lam = ref[-1]
            big = ref >= 1e-6 * lam
            rel = float(np.max(np.abs(got[big] - ref[big]) / ref[big]))
            absn = float(np.max(np.abs(got - ref)) / lam)
            k = 8
            top = np.sort(be.top_esd(w, k))
            top_rel = float(np.max(np.abs(top - ref[-k:]) / ref[-k:]))
            passed = rel <= REL_TOL and absn <= ABS_TOL and top_rel <= REL_TOL
            ok &= passed
            rows.append(
                {
                    "backend": be.name,
                    "matrix": name,
                    "max_rel_err": rel,
                    "max_abs_err_over_lmax": absn,
                    "top8_max_rel_err": top_rel,
                    "passed": passed,
                }
            )
            print(
                f"{be.name:<5} {name:<22} max rel err (evals >= 1e-6 lmax) {rel:8.1e}"
                f"  max |err|/lmax {absn:8.1e}  top_esd(8) rel err {top_rel:8.1e}"
                f"  {'ok' if passed else 'FAIL'}"
            )
    return ok, rows


# --------------------------------------------------------------------------- c. throughput


def expert_stack(count: int, dim: int, seed: int = 11) -> np.ndarray:
    stack = np.empty((count, dim, dim), dtype=np.float32)
    for i in range(count):  # one at a time: no float64 temporaries of the whole stack
        rng = np.random.default_rng(seed + i)
        stack[i] = rng.standard_normal((dim, dim), dtype=np.float32) * np.float32(0.02)
    return stack


def throughput(backends: list[Any], stack: np.ndarray, wide: np.ndarray) -> list[dict]:
    rows = []
    dim = stack.shape[2]
    wn, wm = wide.shape
    for be in backends:
        free_device_memory()
        # warm-up: handles, workspaces, kernels; two matrices of the batch shape
        t_warm, _ = timed(be, lambda b=be: b.esd(stack[:2]))
        n_batch = len(stack)
        predicted = t_warm / 2 * n_batch
        if predicted > BATCH_WARN_S:
            n_batch = max(2, int(BATCH_WARN_S / (t_warm / 2)))
            print(
                f"{be.name}: warm-up predicts {predicted:.0f} s for {len(stack)};"
                f" timing {n_batch} instead"
            )
        t_batch, ev = timed(be, lambda b=be, n=n_batch: b.esd(stack[:n]))
        assert ev.shape == (n_batch, stack.shape[2])
        loop_n = min(4, n_batch)
        t_loop, _ = timed(be, lambda b=be, n=loop_n: [b.esd(stack[i : i + 1]) for i in range(n)])
        timed(be, lambda b=be: b.esd(wide[None]))  # warm-up for the new shape
        t_wide, _ = timed(be, lambda b=be: b.esd(wide[None]))
        row = {
            "backend": be.name,
            "batch": n_batch,
            "batch_s": t_batch,
            "batch_matrices_per_s": n_batch / t_batch,
            "batch_s_per_matrix": t_batch / n_batch,
            "loop_s_per_matrix": t_loop / loop_n,
            "wide_shape": [wn, wm],
            "wide_s": t_wide,
            "warmup_2_s": t_warm,
        }
        rows.append(row)
        print(
            f"{be.name:<5} esd {n_batch} x {dim}^2 in one call: {t_batch:7.3f} s"
            f" = {row['batch_matrices_per_s']:6.2f} matrices/s"
            f" ({row['batch_s_per_matrix']:.4f} s each);"
            f" {loop_n} single calls: {row['loop_s_per_matrix']:.4f} s each;"
            f" one {wn}x{wm}: {t_wide:.4f} s",
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------- d. analyze_batch


def compare_analyze(stack: np.ndarray, gpu: str, esd_s_per_matrix: float) -> dict[str, Any]:
    """analyze_batch with backend `gpu` on the stack (fewer if that would run long)."""
    from llm_audit import analyze_batch
    from llm_audit.spectral.shuffle import shuffle_generator, shuffled

    free_device_memory()
    mats = list(stack)
    ids = [f"expert{i}" for i in range(len(mats))]
    # two ESDs per matrix plus ~0.5 s of host work (shuffle, fits) each
    predicted = len(mats) * (2 * esd_s_per_matrix + 0.5)
    if predicted > BATCH_WARN_S:
        keep = max(2, int(BATCH_WARN_S / (2 * esd_s_per_matrix + 0.5)))
        print(f"predicted {predicted:.0f} s for {len(mats)} experts; analyzing {keep}")
        mats, ids = mats[:keep], ids[:keep]
    analyze_batch(mats[:2], matrix_ids=ids[:2], backend=gpu)  # warm-up
    t = _t0()
    gpu_rows = analyze_batch(mats, matrix_ids=ids, backend=gpu)
    t_gpu = time.perf_counter() - t
    t = _t0()
    cpu_rows = analyze_batch(mats[:2], matrix_ids=ids[:2], backend="numpy")
    t_cpu2 = time.perf_counter() - t
    t = _t0()
    shuffled(mats[0], shuffle_generator(0, ids[0]))
    t_shuffle = time.perf_counter() - t

    same = []
    for g, c in zip(gpu_rows[:2], cpu_rows, strict=True):
        same.append(
            {
                "matrix_id": g["matrix_id"],
                "alpha_abs_diff": abs(g["alpha"] - c["alpha"]),
                "num_spikes_equal": g["num_spikes"] == c["num_spikes"],
                "rand_num_spikes_equal": g["rand_num_spikes"] == c["rand_num_spikes"],
            }
        )
    n = len(mats)
    out = {
        "experts": n,
        "gpu_s": t_gpu,
        "gpu_s_per_matrix": t_gpu / n,
        "numpy_2_s": t_cpu2,
        "numpy_extrapolated_s": t_cpu2 / 2 * n,
        "speedup": (t_cpu2 / 2 * n) / t_gpu,
        "host_shuffle_s_per_matrix": t_shuffle,
        "gpu_vs_numpy": same,
        "host_threads": os.cpu_count(),
    }
    dim = stack.shape[2]
    out["backend"] = gpu
    print(f"analyze_batch {gpu}: {n} experts in {t_gpu:.2f} s ({t_gpu / n:.3f} s/matrix)")
    print(
        f"analyze_batch numpy: 2 experts in {t_cpu2:.2f} s -> {out['numpy_extrapolated_s']:.1f}"
        f" s for {n} (extrapolated); speed-up {out['speedup']:.1f}x"
    )
    print(
        f"host shuffle of one {dim}^2 matrix: {t_shuffle:.3f} s"
        f" (x{n} = {t_shuffle * n:.1f} s of the {gpu} run is host shuffling)"
    )
    for s in same:
        print(
            f"  {s['matrix_id']}: |alpha {gpu} - numpy| {s['alpha_abs_diff']:.1e},"
            f" num_spikes equal {s['num_spikes_equal']},"
            f" rand_num_spikes equal {s['rand_num_spikes_equal']}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, help="batch size for c and d (default 32)")
    p.add_argument("--skip-cupy", action="store_true", help="do not try the cupy backend")
    p.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="no GPU: small sizes through the torch CPU backend, to test the script",
    )
    p.add_argument("--json", metavar="PATH", help="write the measured figures to PATH")
    args = p.parse_args(argv)
    start = _t0()
    from llm_audit.spectral.backends import select_backend

    section("a. device")
    if args.cpu_dry_run:
        dim, wide_n, experts, scale = DRY_DIM, DRY_WIDE, args.experts or DRY_EXPERTS, 8
        backends = [select_backend("torch")]
        print("CPU dry run: backend 'torch' on CPU stands in for the GPU backends")
    else:
        dim, wide_n, experts, scale = DIM, WIDE, args.experts or 32, 1
        check_cuda()
        print(f"select_backend('auto') -> {select_backend('auto').name}")
        backends = gpu_backends(args.skip_cupy)
    print("backends: " + ", ".join(b.name for b in backends))

    section("b. accuracy against float64 numpy SVD")
    acc_ok, acc = check_accuracy(backends, scale)

    section(f"c. esd throughput ({experts} x {dim}^2 float32, one {wide_n}x{dim})")
    stack = expert_stack(experts, dim)
    wide = np.random.default_rng(3).standard_normal((wide_n, dim), dtype=np.float32) * np.float32(
        0.02
    )
    thr = throughput(backends, stack, wide)
    del wide

    gpu = backends[0].name
    section(f"d. analyze_batch: {gpu} on the experts vs numpy on 2")
    ana = compare_analyze(stack, gpu, thr[0]["batch_s_per_matrix"])

    total = time.perf_counter() - start
    section("summary")
    print(f"accuracy: {'all passed' if acc_ok else 'FAILED (see above)'}")
    for r in thr:
        wn, wm = r["wide_shape"]
        print(
            f"{r['backend']:<5} esd: {r['batch_matrices_per_s']:.2f} {dim}^2 matrices/s batched,"
            f" {1 / r['loop_s_per_matrix']:.2f}/s one at a time; {wn}x{wm} in"
            f" {r['wide_s']:.3f} s"
        )
    print(
        f"analyze_batch: {gpu} {ana['gpu_s_per_matrix']:.3f} s/matrix vs numpy"
        f" {ana['numpy_2_s'] / 2:.3f} s/matrix ({ana['speedup']:.1f}x)"
    )
    print(f"wall time {total:.0f} s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "dry_run": args.cpu_dry_run,
                    "accuracy": acc,
                    "throughput": thr,
                    "analyze_batch": ana,
                    "wall_s": total,
                },
                fh,
                indent=2,
                default=_jsonable,
            )
        print(f"wrote {args.json}")
    return 0 if acc_ok else 1


def _jsonable(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else str(v)


if __name__ == "__main__":
    sys.exit(main())
