"""The one device check for a lent GPU (written for one H200): `python benchmarks/device_check.py`.

Why one script, this shape: a GPU comes for 15 minutes in all, start-up included, on a
machine with torch (CUDA 13), CuPy 14, transformers, safetensors and pyarrow but no Ray and
no ../shared, where nothing can be fetched. So it imports only those and the repository
(whose root it puts on sys.path itself: no PYTHONPATH), generates its model there with
`llm_audit.source.synth`, drives the audit in-process (`llm_audit.run.local`, the same
grouping and unit analysis as the Ray driver), keeps to a time budget (default 450 s,
stages shrink or are skipped to fit), and writes everything measured to
`$OUT/device_check.json` after every stage, so a run cut short still returns its figures.

Stages, each a key of the JSON (`status`: ok / failed / skipped, `seconds`):
- env: versions, the device, which backend "auto" proves;
- accuracy: each GPU backend's float64 and float32 routes against float64 on the CPU
  (numpy's LAPACK and an SVD), on matrices whose spectra span 1 to 1e8;
- throughput: eigenvalues of 32 x 2880^2 and 32 x 5760x2880 float32 matrices, split into
  host-to-device copy, float64 Gram and eigensolve, for torch batched (one eigvalsh of the
  stack), torch looped (one per matrix), CuPy syevd (2-D eigvalsh per matrix) and CuPy
  batched (3-D eigvalsh: syevjBatched); each route's eigenvalues against the first's;
- audit: two full-size layers of a synthetic gpt-oss-20b (32 experts of 5760x2880 and
  2880^2, attention, router; dense BF16 experts, since encoding MXFP4 on the host would
  take longer than the budget) audited on the GPU layer by layer, with a breakdown of one
  expert tensor into read, W eigenvalues, shuffles, shuffled eigenvalues and fits; MXFP4
  decoding of one layer's experts timed on its own; the embedding and lm_head audited at
  1/8 of the vocabulary (streamed on the host, cost linear in rows); all projected to 24
  layers plus embeddings, against the goal of 5 minutes;
- grok: `grok mlp-mnist` training steps/s on CUDA and on the CPU (the preset's model,
  batch and optimizer, on MNIST-shaped random data: the rate does not depend on values).

`--dry-run`: tiny sizes, torch on the CPU standing in for the GPU routes; what CI runs
(tests/test_device_check.py) to prove the script starts and writes its JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

GOAL_S = 300.0  # gpt-oss-20b audited in full, with shuffles, on one H200
FULL = {"dim": 2880, "wide": 5760, "experts": 32, "vocab_fraction": 8, "grok_steps": 300}
DRY = {"dim": 96, "wide": 192, "experts": 4, "vocab_fraction": 8, "grok_steps": 20}


class Check:
    """The JSON being built: each stage timed, its failure recorded, the file rewritten."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool) -> None:
        self.path = out / "device_check.json"
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"dry_run": dry_run, "budget_s": budget_s}
        out.mkdir(parents=True, exist_ok=True)
        self.save()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=_jsonable) + "\n")
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def stage(self, name: str, needs_s: float = 0.0) -> Iterator[dict[str, Any] | None]:
        """Run a stage into `self.data[name]`; skipped (None) when under `needs_s` is left."""
        record: dict[str, Any] = {}
        self.data[name] = record
        if self.left() < needs_s:
            record.update(status="skipped", reason=f"{self.left():.0f} s left of the budget")
            print(f"== {name}: skipped ({record['reason']})", flush=True)
            self.save()
            yield None
            return
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            yield record
            record["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - one failed stage must not stop the others
            record.update(status="failed", error=f"{type(err).__name__}: {err}")
            record["traceback"] = traceback.format_exc()
            print(f"   failed: {record['error']}", flush=True)
        record["seconds"] = round(time.perf_counter() - start, 2)
        self.save()


def _jsonable(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else str(v)


def _cupy() -> Any | None:
    try:
        import cupy

        cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no usable CuPy is a fact to record, not an error
        return None
    return cupy


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    cupy = _cupy()
    if cupy is not None:
        cupy.cuda.Device().synchronize()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - start, out


def _release() -> None:
    from llm_audit.spectral.backends import release_memory

    release_memory()


# ----------------------------------------------------------------------------- env


def stage_env(record: dict[str, Any], dry_run: bool) -> list[str]:
    """Versions and device; returns the GPU backends to measure."""
    import torch

    import llm_audit
    from llm_audit.errors import BackendError
    from llm_audit.spectral.backends import select_backend

    record.update(
        python=platform.python_version(),
        numpy=np.__version__,
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        cpu_count=os.cpu_count(),
        llm_audit=str(Path(llm_audit.__file__).parent),
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        record.update(device=props.name, device_memory_gib=round(props.total_memory / 2**30, 1))
    cupy = _cupy()
    record["cupy"] = None if cupy is None else cupy.__version__
    record["auto_backend"] = select_backend("auto").name
    if dry_run:
        return ["torch"]
    names = []
    for name in ("cuda", "cupy"):  # each proven by its tiny test solve, or left out
        try:
            names.append(select_backend(name).name)
        except BackendError as err:
            record[f"{name}_unusable"] = str(err)
    return names


# ----------------------------------------------------------------------------- accuracy


def accuracy_matrices(dim: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    n, m = 2 * dim, dim
    u, _ = np.linalg.qr(rng.standard_normal((n, m)))
    v, _ = np.linalg.qr(rng.standard_normal((m, m)))
    wide_range = (u * np.logspace(0, -4, m)) @ v.T  # eigenvalues spanning 1e8
    mats = [
        ("gauss", rng.standard_normal((n, m)) * 0.02),
        ("student_t3", rng.standard_t(3, size=(n, m)) * 0.02),
        ("wide_range", wide_range),
    ]
    return [(name, np.ascontiguousarray(w, dtype=np.float32)) for name, w in mats]


def stage_accuracy(record: dict[str, Any], names: list[str], dim: int) -> None:
    from llm_audit.spectral.backends import NumpyBackend, select_backend

    host = NumpyBackend()
    for label, w in accuracy_matrices(dim):
        sv = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        svd = np.sort(sv * sv)
        ref = host.esd(w[None])[0]
        lam = svd[-1]
        big = svd >= 1e-6 * lam
        rows = {"host_vs_svd_max_abs_over_lmax": float(np.max(np.abs(ref - svd)) / lam)}
        for name in names:
            backend = select_backend(name)
            for route, fast in (("float64", False), ("float32", True)):
                got = backend.esd(w[None], fast=fast)[0]
                rows[f"{name}_{route}"] = {
                    "max_abs_over_lmax_vs_host": float(np.max(np.abs(got - ref)) / lam),
                    "max_rel_vs_svd_above_1e-6_lmax": float(
                        np.max(np.abs(got[big] - svd[big]) / svd[big])
                    ),
                }
        record[f"{label}_{w.shape[0]}x{w.shape[1]}"] = rows


# ----------------------------------------------------------------------------- throughput


def _routes(dry_run: bool, with_cupy: bool) -> dict[str, Any]:
    """Each route: (library, device-put, batched-Gram, solve) as callables."""
    import torch

    device = "cpu" if dry_run else "cuda"
    routes: dict[str, Any] = {}

    def torch_put(stack: np.ndarray) -> Any:
        return torch.from_numpy(stack).to(device)

    def torch_gram(t: Any) -> Any:
        d = t.to(torch.float64)
        return d.transpose(1, 2) @ d

    routes["torch_batched"] = (torch_put, torch_gram, torch.linalg.eigvalsh)
    routes["torch_looped"] = (
        torch_put,
        torch_gram,
        lambda g: torch.stack([torch.linalg.eigvalsh(x) for x in g]),
    )
    cupy = _cupy() if with_cupy else None
    if cupy is not None:
        import cupyx

        def cupy_gram(t: Any) -> Any:
            d = t.astype(cupy.float64)
            return cupy.matmul(d.transpose(0, 2, 1), d)

        def syevd(g: Any) -> Any:
            with cupyx.errstate(linalg="raise"):
                return cupy.stack([cupy.linalg.eigvalsh(x) for x in g])

        def batched(g: Any) -> Any:
            with cupyx.errstate(linalg="raise"):
                return cupy.linalg.eigvalsh(g)  # a 3-D stack: syevjBatched

        routes["cupy_syevd"] = (cupy.asarray, cupy_gram, syevd)
        routes["cupy_batched"] = (cupy.asarray, cupy_gram, batched)
    return routes


def _host(vals: Any) -> np.ndarray:
    return vals.cpu().numpy() if hasattr(vals, "cpu") else _cupy().asnumpy(vals)


def _route(stack: np.ndarray, route: Any, budget_s: float) -> tuple[dict[str, Any], np.ndarray]:
    """Copy, Gram and eigensolve of as many of `stack` as fit `budget_s`, timed apart."""
    put, gram, solve = route
    warm_s, _ = _timed(lambda: solve(gram(put(stack[:1]))))  # handles, workspaces, kernels
    two_s, _ = _timed(lambda: solve(gram(put(stack[:2]))))  # the cost that sizes the run
    n = len(stack) if two_s / 2 * len(stack) < budget_s else max(2, int(budget_s / two_s * 2))
    copy_s, on_device = _timed(lambda: put(stack[:n]))
    gram_s, grams = _timed(lambda: gram(on_device))
    eig_s, vals = _timed(lambda: solve(grams))
    entry = {
        "matrices": n,
        "copy_s": copy_s,
        "gram_s": gram_s,
        "eigensolve_s": eig_s,
        "s_per_matrix": (copy_s + gram_s + eig_s) / n,
        "warmup_1_s": warm_s,
    }
    return entry, _host(vals)


def stage_throughput(
    check: Check, record: dict[str, Any], sizes: dict, dry_run: bool, names: list[str]
) -> None:
    routes = _routes(dry_run, "cupy" in names)
    dim, count = sizes["dim"], sizes["experts"]
    for rows in (dim, sizes["wide"]):
        rng = np.random.default_rng(11)
        stack = np.empty((count, rows, dim), dtype=np.float32)
        for i in range(count):
            stack[i] = rng.standard_normal((rows, dim), dtype=np.float32) * np.float32(0.02)
        shape_key = f"{count}x{rows}x{dim}"
        record[shape_key] = results = {}
        first: np.ndarray | None = None
        for name, route in routes.items():
            _release()
            # each route gets a share of a quarter of what is left
            entry, vals = _route(stack, route, check.left() / 4 / len(routes))
            if first is None:
                first = vals
            else:
                k = min(len(first), len(vals))
                diff = np.abs(vals[:k] - first[:k]) / first[:k, -1:]
                entry["max_abs_over_lmax_vs_first_route"] = float(np.max(diff))
            results[name] = entry
            per = entry["s_per_matrix"]
            print(f"   {shape_key} {name}: {per:.4f} s/matrix over {entry['matrices']}", flush=True)
            check.save()
        _release()


# ----------------------------------------------------------------------------- audit


def _model_config(sizes: dict, dry_run: bool) -> Any:
    from llm_audit.source.synth import SynthConfig

    if dry_run:
        return SynthConfig(
            layers=2,
            experts=sizes["experts"],
            hidden=64,
            intermediate=64,
            heads=4,
            kv_heads=2,
            head_dim=16,
            vocab=8192,
            mxfp4=False,
            shards=3,
        )
    # gpt-oss-20b: hidden 2880, intermediate 2880, 64 heads of 64, 8 KV heads, 201088 tokens
    return SynthConfig(
        layers=2,
        experts=32,
        hidden=2880,
        intermediate=2880,
        heads=64,
        kv_heads=8,
        head_dim=64,
        vocab=201088 // sizes["vocab_fraction"],
        mxfp4=False,
        shards=3,
    )


def _breakdown(checkpoint: Any, units: list[Any], backend_name: str) -> dict[str, float]:
    """One expert tensor's stages, timed one after another on the backend the audit used."""
    from llm_audit.spectral.backends import select_backend
    from llm_audit.spectral.marchenko_pastur import fit_mp
    from llm_audit.spectral.powerlaw import fit_powerlaw
    from llm_audit.spectral.shuffle import shuffle_generator, shuffled

    backend = select_backend(backend_name)
    t = time.perf_counter()
    mats = [checkpoint.read_matrix(u) for u in units]
    mats = [m if m.shape[0] >= m.shape[1] else m.T for m in mats]
    read_s = time.perf_counter() - t
    stack = np.stack(mats)
    w_s, evals = _timed(lambda: backend.esd(stack))
    t = time.perf_counter()
    shuffles = np.stack(
        [shuffled(m, shuffle_generator(0, u.id)) for m, u in zip(mats, units, strict=True)]
    )
    shuffle_s = time.perf_counter() - t
    rand_s, rand = _timed(lambda: backend.esd(shuffles, fast=True))
    n, m = stack.shape[1:]
    t = time.perf_counter()
    for e, r in zip(evals, rand, strict=True):
        fit_powerlaw(e)
        fit_mp(e, n, m)
        fit_mp(r, n, m)
    fits_s = time.perf_counter() - t
    return {
        "matrices": len(units),
        "read_s": read_s,
        "w_eigenvalues_s": w_s,
        "shuffles_s": shuffle_s,
        "shuffled_eigenvalues_s": rand_s,
        "fits_s": fits_s,
    }


def stage_audit(
    check: Check, record: dict[str, Any], sizes: dict, dry_run: bool, work: Path
) -> None:
    from llm_audit.run.config import AuditConfig
    from llm_audit.run.local import audit_in_process
    from llm_audit.source.checkpoint import open_checkpoint
    from llm_audit.source.mxfp4 import decode_mxfp4
    from llm_audit.source.reference import resolve_model
    from llm_audit.source.synth import synth_gpt_oss

    cfg = _model_config(sizes, dry_run)
    t = time.perf_counter()
    folder = synth_gpt_oss(work / "gpt-oss-20b-2-layers", cfg)
    record["generate_s"] = time.perf_counter() - t
    record["model"] = {
        "layers": cfg.layers,
        "experts": cfg.experts,
        "hidden": cfg.hidden,
        "vocab": cfg.vocab,
        "bytes": sum(p.stat().st_size for p in folder.iterdir()),
    }
    check.save()
    # the 1/8 embedding must stream as the full one does, and a 5760x2880 expert must not
    budget_mb = 1 if dry_run else 64
    config = AuditConfig(backend="torch" if dry_run else "auto", memory_budget_mb=budget_mb)
    checkpoint = open_checkpoint(resolve_model(str(folder)))
    units = checkpoint.plan(config.min_evals, config.kind_rules()).units
    backends: set[str] = set()
    layers: dict[str, Any] = {}
    record["layers"] = layers
    top = [u for u in units if u.layer is None]
    for layer in range(cfg.layers):
        if check.left() < 60 and layer:
            layers[str(layer)] = "skipped: out of budget"
            break
        todo = [u for u in units if u.layer == layer]
        t = time.perf_counter()
        rows, stats = audit_in_process(checkpoint, todo, config, gpus=True)
        layers[str(layer)] = {
            "matrices": len(rows),
            "seconds": time.perf_counter() - t,
            "failed": sum(r["status"] == "error" for r in rows),
            **stats,
        }
        backends |= {r["backend"] for r in rows if r["backend"]}
        check.save()
    t = time.perf_counter()
    rows, _ = audit_in_process(checkpoint, top, config, gpus=True)
    record["embed_and_lm_head"] = {
        "matrices": len(rows),
        "seconds": time.perf_counter() - t,
        "vocab_fraction": sizes["vocab_fraction"],
        "backends": sorted({r["backend"] for r in rows if r["backend"]}),  # streamed: numpy
    }
    record["backends"] = sorted(backends)
    check.save()
    experts = [u for u in units if u.layer == 0 and u.expert is not None]
    first = experts[0].tensor
    record["breakdown"] = _breakdown(
        checkpoint, [u for u in experts if u.tensor == first], config.backend
    )
    record["breakdown"]["tensor"] = first
    check.save()
    rng = np.random.default_rng(0)
    decode = {}
    for rows_, cols in ((2 * cfg.intermediate, cfg.hidden), (cfg.hidden, cfg.intermediate)):
        blocks = rng.integers(0, 256, (cfg.experts, rows_, cols // 32, 16), dtype=np.uint8)
        scales = rng.integers(118, 124, (cfg.experts, rows_, cols // 32), dtype=np.uint8)
        t = time.perf_counter()
        decode_mxfp4(blocks, scales)
        decode[f"{cfg.experts}x{rows_}x{cols}"] = time.perf_counter() - t
    record["mxfp4_decode_one_layer_s"] = decode
    done = [v for v in layers.values() if isinstance(v, dict)]
    per_layer = sum(v["seconds"] for v in done) / len(done)
    projected = 24 * (per_layer + sum(decode.values()))
    projected += record["embed_and_lm_head"]["seconds"] * sizes["vocab_fraction"]
    record["projected_gpt_oss_20b_s"] = projected
    record["goal_s"] = GOAL_S
    print(f"   projected gpt-oss-20b audit: {projected:.0f} s (goal {GOAL_S:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- grok


def _train(task: Any, opt: Any, config: Any, first: int, steps: int) -> None:
    """`steps` steps of grok's training loop (llm_audit.grok.train), without checkpoints."""
    from llm_audit.grok.train import train_step

    for step in range(first, first + steps):
        train_step(task, opt, config, step)


def stage_grok(record: dict[str, Any], steps: int, dry_run: bool) -> None:
    import torch

    from llm_audit.grok.models import MLP
    from llm_audit.grok.settings import load_grok_config
    from llm_audit.grok.tasks import Task
    from llm_audit.grok.train import optimizer

    config = load_grok_config(None, "mlp-mnist")
    devices = ["cpu"] if dry_run or not torch.cuda.is_available() else ["cuda", "cpu"]
    for device in devices:
        rng = np.random.default_rng(0)
        x = torch.from_numpy(rng.random((config.n_train, 784), dtype=np.float32))
        y = torch.from_numpy(rng.integers(0, 10, config.n_train))
        torch.manual_seed(0)
        model = MLP(784, config.width, 2, 10, config.init_scale)
        task = Task(
            model,
            x,
            y,
            x,
            y,
            "random, MNIST-shaped",
            mse=True,
            batch_size=config.batch_size,
            seed=0,
        ).to(torch.device(device))
        opt = optimizer(model, config)
        _train(task, opt, config, 0, 10)  # warm-up: kernels, allocator
        seconds, _ = _timed(lambda t=task, o=opt: _train(t, o, config, 10, steps))
        record[f"{device}_steps_per_s"] = steps / seconds
        print(f"   grok mlp-mnist on {device}: {steps / seconds:.0f} steps/s", flush=True)
    if "cuda_steps_per_s" in record:
        record["cuda_over_cpu"] = record["cuda_steps_per_s"] / record["cpu_steps_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, torch on the CPU")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all stages")
    parser.add_argument("--out", help="folder for device_check.json (default: $OUT, else .)")
    args = parser.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or ".")
    check = Check(out, args.budget, args.dry_run)
    sizes = DRY if args.dry_run else FULL
    names: list[str] = []
    with check.stage("env") as record:
        names = stage_env(record, args.dry_run)
    if not names:
        print("no GPU backend works here (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    with check.stage("accuracy") as record:
        stage_accuracy(record, names, 64 if args.dry_run else 1024)
    with check.stage("throughput", needs_s=60) as record:
        if record is not None:
            stage_throughput(check, record, sizes, args.dry_run, names)
    with tempfile.TemporaryDirectory() as work, check.stage("audit", needs_s=90) as record:
        if record is not None:
            stage_audit(check, record, sizes, args.dry_run, Path(work))
    with check.stage("grok", needs_s=10) as record:
        if record is not None:
            stage_grok(record, sizes["grok_steps"], args.dry_run)
    failed = [
        k for k, v in check.data.items() if isinstance(v, dict) and v.get("status") == "failed"
    ]
    print(f"wrote {check.path}; failed stages: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
