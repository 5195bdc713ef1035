"""GPU backends (torch CUDA, CuPy) against the host: run on a machine with a CUDA device.

Skipped, with the reason shown by `-ra`, where there is none (CI, this project's dev
machines); their logic runs on CPU in `tests/test_gpu_logic.py`, and
`benchmarks/device_check.py` measures the backends on a lent GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm_audit import analyze_batch
from llm_audit.errors import BackendError
from llm_audit.spectral.backends import NumpyBackend, select_backend

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _gpu_backends() -> list[str]:
    names = []
    if torch.cuda.is_available():
        names.append("cuda")
        try:
            select_backend("cupy")
            names.append("cupy")
        except BackendError:
            pass
    return names


@needs_cuda
def test_auto_selects_the_gpu():
    assert select_backend("auto").name == "cuda"


@needs_cuda
@pytest.mark.parametrize("name", _gpu_backends())
def test_gpu_eigenvalues_match_the_host(name):
    rng = np.random.default_rng(0)
    stack = rng.standard_normal((4, 1024, 512)).astype(np.float32)
    ref = NumpyBackend().esd(stack)
    got = select_backend(name).esd(stack)
    assert np.max(np.abs(got - ref) / ref.max(axis=1, keepdims=True)) < 1e-10
    top = select_backend(name).top_esd(stack[0], 8)
    assert np.allclose(top, ref[0, -8:], rtol=1e-8)


@needs_cuda
@pytest.mark.parametrize("name", _gpu_backends())
def test_gpu_batch_gives_the_host_report(name):
    rng = np.random.default_rng(1)
    mats = [rng.standard_normal((768, 384)).astype(np.float32) for _ in range(4)]
    mats[2].ravel()[rng.choice(mats[2].size, 3, replace=False)] = 70.0
    ids = [f"expert.{i}" for i in range(4)]
    host = analyze_batch(mats, matrix_ids=ids, backend="numpy")
    gpu = analyze_batch(mats, matrix_ids=ids, backend=name, batch_size=4)
    for a, b in zip(host, gpu, strict=True):
        assert b["backend"] == name
        assert a["rand_num_spikes"] == b["rand_num_spikes"]
        assert a["num_spikes"] == b["num_spikes"]
        for col in ("alpha", "lambda_max", "sigma_mp"):
            assert b[col] == pytest.approx(a[col], rel=1e-7), col
        for col in ("rand_bulk_max", "max_rand_eval"):  # float32 eigensolve of the shuffle
            assert b[col] == pytest.approx(a[col], rel=1e-5), col
