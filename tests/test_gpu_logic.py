"""The GPU code paths, run on CPU: no GPU has been lent yet, so this is where they are proven.

- A numpy-backed stand-in for `cupy` (a module put in `sys.modules`) runs `CupyBackend`'s
  own code: it must hand the eigensolver only 2-D matrices (cuSOLVER syevd; a 3-D stack
  would go to the batched Jacobi solver) under `cupyx.errstate(linalg="raise")`, and give
  numpy's eigenvalues.
- Backend selection proves a backend with a tiny solve: a broken one makes "auto" fall
  back with one warning line, and an explicit name an error.
- Out-of-memory errors of the real types halve the batch; a matrix that does not fit
  alone is an error row, the others go on.
- A Ray cluster that *declares* a GPU (`num_gpus=1`, none real) runs the GPU scheduling
  path with the torch CPU backend — tasks of a layer's experts on 0.25 of the GPU,
  streamed units as CPU-only tasks, stacks of `gpu_batch_size`, an out-of-memory error
  injected into the workers for stacks above 5 matrices — and must write the report a CPU
  audit gives: float64-path columns to 1e-9, float32-path ones to 1e-5, equal trap counts.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg
import torch

from llm_audit.errors import BackendError
from llm_audit.report.reader import load_report
from llm_audit.run.config import AuditConfig
from llm_audit.run.local import audit_in_process
from llm_audit.run.tasks import group_units
from llm_audit.run.units import analyze_units, streams
from llm_audit.source.checkpoint import open_checkpoint
from llm_audit.source.reference import resolve_model
from llm_audit.source.synth import SynthConfig, synth_gpt_oss
from llm_audit.spectral import backends
from llm_audit.spectral.backends import (
    CupyBackend,
    NumpyBackend,
    TorchBackend,
    is_out_of_memory,
    select_backend,
)

TRAPS = {"model.layers.0.mlp.experts.down_proj[5]": 3, "model.layers.0.self_attn.o_proj.weight": 2}
# 8 experts of 256x128 and 128x128; embedding and lm_head 4096x128 (2 MB: streamed at 1 MB)
SYNTH = SynthConfig(
    layers=1, experts=8, hidden=128, intermediate=128, vocab=4096, seed=5, traps=TRAPS
)
OOM_ABOVE = 5  # the injected device holds stacks of at most 5 matrices
# columns computed from the float32 Gram and eigensolve of the shuffle (see analyze.py)
FLOAT32_PATH = (
    "rand_sigma_mp",
    "rand_mp_softrank",
    "rand_bulk_max",
    "max_rand_eval",
    "rand_distance",
    "ww_softrank",
    "ww_maxdist",
    "trap_ratio",
)
NOT_COMPARED = ("seconds", "node", "backend", "evals", "rand_evals")


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch):
    """Each test selects backends anew (the module keeps the proven one per process)."""
    monkeypatch.setattr(backends, "_SELECTED", {})


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return synth_gpt_oss(tmp_path_factory.mktemp("synth") / "gpt-oss-mini", SYNTH)


# ----------------------------------------------------------------- the CuPy stand-in


class FakeCupyOOM(MemoryError):
    """Stands in for cupy.cuda.memory.OutOfMemoryError."""


def fake_cupy(monkeypatch, *, broken: bool = False) -> dict[str, list]:
    """Put a numpy-backed `cupy` and `cupyx` in sys.modules; returns what they saw."""
    seen: dict[str, list] = {"solves": [], "errstate": [], "freed": []}
    mode: list[str] = ["ignore"]

    def eigvalsh(a: np.ndarray) -> np.ndarray:
        seen["solves"].append((a.shape, a.dtype, mode[-1]))
        if a.ndim != 2:  # what cupy does: a stack goes to the batched Jacobi solver
            raise AssertionError(f"a {a.ndim}-D stack reached eigvalsh")
        vals = np.linalg.eigvalsh(a)
        return vals * 1.5 if broken else vals

    @contextlib.contextmanager
    def errstate(linalg: str) -> Iterator[None]:
        seen["errstate"].append(linalg)
        mode.append(linalg)
        try:
            yield
        finally:
            mode.pop()

    cupy = types.ModuleType("cupy")
    cupy.float32, cupy.float64 = np.float32, np.float64
    cupy.asarray = lambda a, dtype=None: np.array(a, dtype=dtype)  # a copy, as to a device
    cupy.asnumpy = np.asarray
    cupy.zeros, cupy.empty, cupy.matmul = np.zeros, np.empty, np.matmul
    cupy.linalg = types.SimpleNamespace(eigvalsh=eigvalsh, svd=np.linalg.svd)
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        memory=types.SimpleNamespace(OutOfMemoryError=FakeCupyOOM),
    )
    pool = types.SimpleNamespace(free_all_blocks=lambda: seen["freed"].append(True))
    cupy.get_default_memory_pool = lambda: pool
    cupyx = types.ModuleType("cupyx")
    cupyx.errstate = errstate
    sparse_linalg = types.ModuleType("cupyx.scipy.sparse.linalg")
    sparse_linalg.eigsh = scipy.sparse.linalg.eigsh
    for name, module in {
        "cupy": cupy,
        "cupyx": cupyx,
        "cupyx.scipy": types.ModuleType("cupyx.scipy"),
        "cupyx.scipy.sparse": types.ModuleType("cupyx.scipy.sparse"),
        "cupyx.scipy.sparse.linalg": sparse_linalg,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    return seen


def test_cupy_backend_hands_only_2d_matrices_to_the_solver(monkeypatch):
    seen = fake_cupy(monkeypatch)
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((3, 300, 120)).astype(np.float32)
    host = NumpyBackend()
    cupy = CupyBackend()
    got = cupy.esd(stack)
    ref = host.esd(stack)
    assert np.max(np.abs(got - ref) / ref.max(axis=1, keepdims=True)) < 1e-12
    fast = cupy.esd(stack, fast=True)
    assert np.max(np.abs(fast - ref) / ref.max(axis=1, keepdims=True)) < 1e-5
    shapes = [shape for shape, _, _ in seen["solves"]]
    assert shapes == [(120, 120)] * 6  # one 2-D solve per matrix, never the stack
    dtypes = [dtype for _, dtype, _ in seen["solves"]]
    assert dtypes == [np.float64] * 3 + [np.float32] * 3
    assert {m for _, _, m in seen["solves"]} == {"raise"}  # cuSOLVER's info is checked
    sv = cupy.svd_esd(stack[:2])
    assert np.allclose(sv, ref[:2], rtol=1e-9, atol=1e-9 * ref.max())
    top = cupy.top_esd(stack[0], 6)
    assert np.allclose(top, ref[0, -6:], rtol=1e-8)
    assert cupy.busy_s > 0


def test_auto_proves_a_backend_before_using_it(monkeypatch, capsys):
    monkeypatch.setattr(backends, "_torch_cuda_available", lambda: False)
    monkeypatch.delenv("LLM_AUDIT_BACKEND", raising=False)
    seen = fake_cupy(monkeypatch)
    assert select_backend("auto").name == "cupy"
    assert seen["solves"]  # the tiny test solve ran
    assert capsys.readouterr().err == ""

    monkeypatch.setattr(backends, "_SELECTED", {})
    fake_cupy(monkeypatch, broken=True)  # a CuPy whose solver gives wrong eigenvalues
    assert select_backend("auto").name == "numpy"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "'cupy' failed a test solve" in err[0]
    with pytest.raises(BackendError, match="'cupy' failed a test solve"):
        select_backend("cupy")


def test_out_of_memory_errors_of_both_libraries_are_recognized(monkeypatch):
    fake_cupy(monkeypatch)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(FakeCupyOOM("out of memory allocating 4 GB"))
    assert not is_out_of_memory(MemoryError("host"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access"))


@pytest.mark.parametrize("cols", [24, 96])  # torch's batched route, and one solve per matrix
def test_torch_routes_match_numpy_in_float64(cols):
    assert (cols <= backends.TORCH_BATCHED_MAX_N) == (cols == 24)
    stack = np.random.default_rng(1).standard_normal((4, 2 * cols, cols)).astype(np.float32)
    ref = NumpyBackend().esd(stack)
    got = TorchBackend("cpu").esd(stack)
    assert np.max(np.abs(got - ref) / ref.max(axis=1, keepdims=True)) < 1e-13


# ----------------------------------------------------------------- grouping, OOM halving


def test_gpu_grouping_puts_streamed_units_on_the_host(model):
    checkpoint = open_checkpoint(resolve_model(str(model)))
    units = checkpoint.plan(8).units
    config = AuditConfig(memory_budget_mb=1, gpu_batch_size=3)
    assert [len(t.units) for t in group_units(units, config, gpus=False)] == [1] * len(units)
    tasks = group_units(units, config, gpus=True)
    assert sorted(u.id for t in tasks for u in t.units) == sorted(u.id for u in units)
    host = [t for t in tasks if not t.gpu]
    assert {t.units[0].id for t in host} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert tasks[: len(host)] == host  # the long host tasks start first
    assert all(len(t.units) == 1 and streams(t.units[0], config) for t in host)
    for task in tasks[len(host) :]:
        assert task.gpu and len({u.tensor for u in task.units}) == 1
        assert not any(streams(u, config) for u in task.units)
    experts = [len(t.units) for t in tasks if "experts.down_proj" in t.units[0].tensor]
    assert experts == [3, 3, 2]


def _failing_above(limit: int, calls: list[int]):
    real = TorchBackend.esd

    def esd(self, stack, *, fast=False):
        calls.append(len(stack))
        if len(stack) > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {len(stack)} matrices (test)")
        return real(self, stack, fast=fast)

    return esd


def test_out_of_memory_halves_the_batch_then_fails_only_what_cannot_fit(model, monkeypatch):
    checkpoint = open_checkpoint(resolve_model(str(model)))
    units = [u for u in checkpoint.plan(8).units if "experts.down_proj" in u.id]
    config = AuditConfig(backend="torch", randomize=False)
    reference = analyze_units(checkpoint, units, config.analysis(), batch_size=1)
    calls: list[int] = []
    monkeypatch.setattr(TorchBackend, "esd", _failing_above(3, calls))
    stats: dict = {}
    rows = analyze_units(checkpoint, units, config.analysis(), batch_size=8, stats=stats)
    assert calls == [8, 4, 2, 2, 2, 2]  # 8 and 4 fail; the rest goes on at 2
    assert stats["oom_halvings"] == 2
    assert [r["alpha"] for r in rows] == pytest.approx([r["alpha"] for r in reference], rel=1e-9)
    assert all(r["status"] == "ok" for r in rows)

    monkeypatch.setattr(TorchBackend, "esd", _failing_above(0, []))  # nothing fits
    rows = analyze_units(checkpoint, units[:2], config.analysis(), batch_size=2, stats={})
    assert [(r["status"], r["error_kind"]) for r in rows] == [("error", "task")] * 2
    assert "out of device memory" in rows[0]["error"]


# ----------------------------------------------------------------- declared-GPU Ray audit

WORKER_OOM = """
import os

import torch

from llm_audit.spectral import backends


def install():
    real = backends.TorchBackend.esd

    def esd(self, stack, *, fast=False):
        with open(os.environ["LLM_AUDIT_TEST_OOM_LOG"], "a") as log:
            log.write(f"{len(stack)} {int(fast)}\\n")
        if len(stack) > LIMIT:
            raise torch.OutOfMemoryError(f"CUDA out of memory: {len(stack)} (test)")
        return real(self, stack, fast=fast)

    backends.TorchBackend.esd = esd
"""


def _same_rows(gpu: dict, cpu: dict) -> None:
    for col, want in cpu.items():
        if col in NOT_COMPARED:
            continue
        got = gpu[col]
        if isinstance(want, float) and not isinstance(want, bool):
            rel = 1e-5 if col in FLOAT32_PATH else 1e-9
            # differences of nearly equal things, accurate to 1e-5 of their scale only:
            # lambda_max - max_rand_eval, and a distance between two spectra (in [0, 1])
            scale = {"ww_maxdist": cpu["lambda_max"], "rand_distance": 1.0}.get(col, 1e-7)
            tol = 1e-5 * scale
            assert got == pytest.approx(want, rel=rel, abs=tol), (cpu["matrix"], col)
        elif col in ("trap_evals", "trap_ratios"):
            assert got == pytest.approx(want, rel=1e-5), (cpu["matrix"], col)
        elif col != "trap_entries":
            assert got == want, (cpu["matrix"], col)
    assert gpu["trap_entries"] == cpu["trap_entries"], cpu["matrix"]


def test_declared_gpu_ray_audit_equals_the_cpu_audit(model, tmp_path, monkeypatch):
    import ray

    from llm_audit.run.audit import run_audit

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "inject_oom.py").write_text(WORKER_OOM.replace("LIMIT", str(OOM_ABOVE)))
    log = tmp_path / "solves.log"
    monkeypatch.setenv("LLM_AUDIT_TEST_OOM_LOG", str(log))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    common = {"memory_budget_mb": 1, "gpu_batch_size": 8, "seed": 3}
    gpu_config = AuditConfig(backend="torch", gpus_per_task=0.25, cpus_per_task=0.5, **common)
    ray.init(  # every worker gets the injected out-of-memory error before its first task
        address="local",
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"worker_process_setup_hook": "inject_oom.install"},
    )
    try:
        run_audit(str(model), tmp_path / "report", gpu_config, quiet=True)
    finally:
        ray.shutdown()
    report = load_report(tmp_path / "report")

    checkpoint = open_checkpoint(resolve_model(str(model)))
    units = checkpoint.plan(8).units
    cpu_rows, _ = audit_in_process(
        checkpoint, units, AuditConfig(backend="numpy", **common), gpus=False
    )
    assert [r["matrix"] for r in report.rows] == [u.id for u in units]
    gpu_rows = {r["matrix"]: r for r in report.rows}
    for cpu in cpu_rows:
        assert cpu["status"] == "ok"
        _same_rows(gpu_rows[cpu["matrix"]], cpu)
    traps = {r["matrix"]: r["rand_num_spikes"] for r in cpu_rows if r["rand_num_spikes"]}
    assert set(traps) == set(TRAPS)
    streamed = {"model.embed_tokens.weight", "lm_head.weight"}
    assert {r["matrix"] for r in report.rows if r["backend"] == "numpy"} == streamed
    assert {r["backend"] for r in report.rows if r["matrix"] not in streamed} == {"torch"}

    stacks = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    w_stacks = [size for size, fast in stacks if not fast]
    assert w_stacks.count(8) == 2  # each expert tensor tried as one stack of 8, and
    assert w_stacks.count(4) == 4  # after the injected OOM as two of 4
    manifest = json.loads((tmp_path / "report" / "manifest.json").read_text())
    assert manifest["io"]["oom_halvings"] == 2
    busy = manifest["io"]["gpu_busy_s"]
    assert len(busy) == 1 and next(iter(busy)).endswith("/0") and next(iter(busy.values())) > 0
