"""Array backends that turn weight matrices into eigenvalues: numpy, torch (CPU or CUDA), CuPy.

Why this shape: every ESD here is "float64 Gram of the smaller side, then a symmetric
eigensolve" (or, as a reference route, float64 singular values). Only where the arrays
live differs, so a backend is four operations — Gram, batched eigvalsh, batched singular
values and a top-k eigensolve — and everything above it (orientation, shuffling, fits)
is shared host code. Eigenvalues always come back as float64 numpy arrays, ascending.

Accuracy: the Gram is formed after upcasting to float64 (a float32 Gram loses eigenvalues
below ~1e-6 lambda_max), accumulated over row chunks so a 201088 x 2880 embedding never
needs a float64 copy of itself. Tiny negative eigenvalues from round-off are clipped to 0.

Solvers on a GPU: CuPy's `eigvalsh` sends any array of more than two dimensions to the
batched Jacobi solver (`syevjBatched`), several times slower than `syevd` and, per CuPy's
documentation, possibly wrong unless its info is checked; so the CuPy backend hands it one
2-D Gram at a time (`syevd`) under `cupyx.errstate(linalg="raise")`, which checks that info.
torch batches `eigvalsh` on CUDA only up to n = 32 and loops inside itself above that
(pytorch #175585); the torch backend makes that rule its own (`TORCH_BATCHED_MAX_N`) until
device figures (`benchmarks/device_check.py`) say otherwise.

Selection: `select_backend("auto")` takes CUDA through torch when a GPU is visible, else
CuPy when it sees a device, else numpy; `LLM_AUDIT_BACKEND` overrides "auto". A GPU
backend must first pass a tiny solve checked against numpy: a broken install (a CuPy
built for another CUDA major version, a driver too old) makes "auto" fall back with one
warning line, and an explicit "cuda" or "cupy" a `BackendError`, never a failure at the
first real matrix. The proven backend is kept for the life of the process.

Device memory: `is_out_of_memory` recognizes torch's and CuPy's out-of-memory errors (the
caller halves its batch, `llm_audit.run.units`) and `release_memory` hands both caching
allocators' pools back between tasks. Every backend adds the seconds its calls take to
`busy_s`, the GPU busy time the driver reports.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dsyrk, ssyrk
from scipy.sparse.linalg import eigsh

from ..errors import BackendError

# Rows handled at a time wherever a matrix is too large to copy whole: upcast to float64
# when forming a Gram, read from a streamed matrix, in a bucket of its streamed shuffle.
ROW_CHUNK = 16384
BACKEND_NAMES = ("auto", "numpy", "torch", "cuda", "cupy")
GPU_BACKENDS = ("cuda", "cupy")
TORCH_BATCHED_MAX_N = 32  # torch's own batched-eigvalsh bound on CUDA; above: one per matrix


class Backend(Protocol):
    """What the spectral code needs from an array library."""

    name: str
    busy_s: float  # seconds spent in this backend's calls so far

    def esd(self, stack: np.ndarray, *, fast: bool = False) -> np.ndarray:
        """Eigenvalues of the float64 Gram of each matrix in a [B, n, m] stack (n >= m).

        `fast` multiplies and solves in float32 (2x faster here): eigenvalues within
        ~1e-5 lambda_max, enough for the MP fit and trap count of a shuffled matrix,
        not for the power-law tail of a trained one.
        """

    def svd_esd(self, stack: np.ndarray) -> np.ndarray:
        """Squared float64 singular values of each matrix of a [B, n, m] stack."""

    def top_esd(self, matrix: np.ndarray, k: int) -> np.ndarray:
        """The k largest eigenvalues of one n x m matrix's float64 Gram (n >= m)."""


def gram_upper(matrix: np.ndarray, fast: bool = False) -> np.ndarray:
    """Upper triangle of W^T W, accumulated in float64 over row chunks.

    BLAS `syrk` computes only one triangle: 30% faster here than a full `W.T @ W`, and
    the eigensolver reads only that triangle. Chunking bounds the upcast copy. `fast`
    multiplies each chunk in float32 (3x faster, ~1e-6 relative error per entry).
    """
    m = matrix.shape[1]
    gram = np.zeros((m, m), dtype=np.float64, order="F")
    for start in range(0, matrix.shape[0], ROW_CHUNK):
        chunk = matrix[start : start + ROW_CHUNK]
        if fast:
            # chunk.T is Fortran-ordered without a copy; syrk(a) = a @ a.T
            gram += ssyrk(1.0, chunk.astype(np.float32, copy=False).T, trans=0, lower=0)
        else:
            chunk = chunk.astype(np.float64, copy=False)
            gram = dsyrk(1.0, chunk.T, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)
    return gram


def _timed(method: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """Add the seconds a backend call takes to the backend's `busy_s` (results come back
    as host arrays, so a GPU call's time includes its device work)."""

    def timed(self: Any, *args: Any, **kwargs: Any) -> np.ndarray:
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.busy_s += time.perf_counter() - start

    timed.__doc__ = method.__doc__
    return timed


class NumpyBackend:
    """LAPACK through numpy/scipy on the host; always available."""

    name = "numpy"
    busy_s = 0.0

    @_timed
    def esd(self, stack: np.ndarray, *, fast: bool = False) -> np.ndarray:
        out = np.empty((stack.shape[0], stack.shape[2]))
        for i, matrix in enumerate(stack):
            gram = gram_upper(matrix, fast)
            if fast:
                gram = gram.astype(np.float32)
            out[i] = scipy.linalg.eigvalsh(gram, lower=False, check_finite=False)
        return np.clip(out, 0.0, None)

    @_timed
    def svd_esd(self, stack: np.ndarray) -> np.ndarray:
        sv = np.stack([scipy.linalg.svdvals(m.astype(np.float64)) for m in stack])
        return np.sort(sv * sv, axis=1)

    @_timed
    def top_esd(self, matrix: np.ndarray, k: int) -> np.ndarray:
        upper = gram_upper(matrix)
        gram = upper + np.triu(upper, 1).T
        vals = eigsh(gram, k=k, which="LA", return_eigenvectors=False, tol=0.0)
        return np.clip(np.sort(vals), 0.0, None)


class TorchBackend:
    """torch.linalg on CPU or CUDA: one batched eigvalsh up to `TORCH_BATCHED_MAX_N`
    columns, one 2-D eigvalsh per matrix above (the route torch itself takes there)."""

    busy_s = 0.0

    def __init__(self, device: str = "cpu") -> None:
        try:
            import torch
        except ImportError:
            raise BackendError(
                f"backend {'cuda' if device == 'cuda' else 'torch'!r} needs torch: "
                "pip install 'llm-audit[gpu]' (CPU only: pip install torch "
                "--index-url https://download.pytorch.org/whl/cpu)"
            ) from None

        self._torch = torch
        self.device = torch.device(device)
        self.name = "cuda" if self.device.type == "cuda" else "torch"

    def _gram(self, stack: np.ndarray, fast: bool = False):
        torch = self._torch
        t = torch.from_numpy(np.ascontiguousarray(stack)).to(self.device)
        b, n, m = t.shape
        gram = torch.zeros((b, m, m), dtype=torch.float64, device=self.device)
        for start in range(0, n, ROW_CHUNK):
            chunk = t[:, start : start + ROW_CHUNK]
            chunk = chunk.to(torch.float32 if fast else torch.float64)
            gram += chunk.transpose(1, 2) @ chunk
        return gram

    @_timed
    def esd(self, stack: np.ndarray, *, fast: bool = False) -> np.ndarray:
        gram = self._gram(stack, fast)
        if fast:
            gram = gram.to(self._torch.float32)
        eigvalsh = self._torch.linalg.eigvalsh
        if gram.shape[-1] <= TORCH_BATCHED_MAX_N:
            vals = eigvalsh(gram)
        else:
            vals = self._torch.stack([eigvalsh(g) for g in gram])
        return np.clip(vals.cpu().numpy().astype(np.float64), 0.0, None)

    @_timed
    def svd_esd(self, stack: np.ndarray) -> np.ndarray:
        torch = self._torch
        t = torch.from_numpy(np.ascontiguousarray(stack)).to(self.device, torch.float64)
        kwargs = {"driver": "gesvd"} if self.device.type == "cuda" else {}
        sv = torch.linalg.svdvals(t, **kwargs).cpu().numpy()
        return np.sort(sv * sv, axis=1)

    @_timed
    def top_esd(self, matrix: np.ndarray, k: int) -> np.ndarray:
        # Lanczos on the host Gram: exact where randomized SVD under-estimates flat spectra.
        gram = self._gram(matrix[None])[0].cpu().numpy()
        vals = eigsh(gram, k=k, which="LA", return_eigenvectors=False, tol=0.0)
        return np.clip(np.sort(vals), 0.0, None)


class CupyBackend:
    """CuPy on the GPU: the stack copied once, then per matrix a float64 Gram and a 2-D
    `eigvalsh` (cuSOLVER syevd, its info checked); Lanczos (cupyx eigsh) for top-k."""

    name = "cupy"
    busy_s = 0.0

    def __init__(self) -> None:
        import cupy
        import cupyx

        self._cp = cupy
        self._cupyx = cupyx

    def _gram(self, matrix: Any, fast: bool = False) -> Any:
        """Float64 Gram of one 2-D device matrix, upcast a row chunk at a time."""
        cp = self._cp
        gram = cp.zeros((matrix.shape[1], matrix.shape[1]), dtype=cp.float64)
        dtype = cp.float32 if fast else cp.float64
        for start in range(0, matrix.shape[0], ROW_CHUNK):
            chunk = matrix[start : start + ROW_CHUNK].astype(dtype)
            gram += chunk.T @ chunk
        return gram

    @_timed
    def esd(self, stack: np.ndarray, *, fast: bool = False) -> np.ndarray:
        cp = self._cp
        t = cp.asarray(stack)
        vals = cp.empty((stack.shape[0], stack.shape[2]), dtype=cp.float64)
        # raise: a solve whose cuSOLVER info is not 0 raises instead of returning garbage
        with self._cupyx.errstate(linalg="raise"):
            for i in range(stack.shape[0]):
                gram = self._gram(t[i], fast)
                vals[i] = cp.linalg.eigvalsh(gram.astype(cp.float32) if fast else gram)
        return np.clip(cp.asnumpy(vals), 0.0, None)

    @_timed
    def svd_esd(self, stack: np.ndarray) -> np.ndarray:
        cp = self._cp
        t = cp.asarray(stack, dtype=cp.float64)
        with self._cupyx.errstate(linalg="raise"):
            sv = [cp.asnumpy(cp.linalg.svd(t[i], compute_uv=False)) for i in range(len(stack))]
        return np.sort(np.stack(sv) ** 2, axis=1)

    @_timed
    def top_esd(self, matrix: np.ndarray, k: int) -> np.ndarray:
        from cupyx.scipy.sparse.linalg import eigsh as cupy_eigsh

        gram = self._gram(self._cp.asarray(matrix))
        vals = cupy_eigsh(gram, k=k, which="LA", return_eigenvectors=False)
        return np.clip(np.sort(self._cp.asnumpy(vals)), 0.0, None)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is torch's or CuPy's device out-of-memory error (only a library
    already imported can have raised one)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return True
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(err, cupy.cuda.memory.OutOfMemoryError)


def release_memory() -> None:
    """Hand torch's and CuPy's cached device blocks back to the driver."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        cupy.get_default_memory_pool().free_all_blocks()


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _cupy_available() -> bool:
    try:
        import cupy
    except ImportError:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - any CUDA runtime failure means "no usable GPU"
        return False


def _proven(backend: Backend) -> Backend:
    """`backend`, once a tiny float64 and float32 solve on it matches numpy's."""
    stack = np.random.default_rng(0).standard_normal((2, 24, 12)).astype(np.float32)
    host = NumpyBackend()
    for fast, rtol in ((False, 1e-9), (True, 1e-4)):
        want, got = host.esd(stack, fast=fast), backend.esd(stack, fast=fast)
        if got.shape != want.shape or not np.allclose(got, want, rtol=rtol, atol=rtol * want.max()):
            raise BackendError(f"its eigenvalues differ from numpy's (float32 path: {fast})")
    backend.busy_s = 0.0
    return backend


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


_GPU_BACKENDS: dict[str, tuple[Callable[[], bool], Callable[[], Backend], str]] = {
    "cuda": (
        _torch_cuda_available,
        lambda: TorchBackend("cuda"),
        "torch sees no CUDA device (or torch is missing: pip install 'llm-audit[gpu]')",
    ),
    "cupy": (_cupy_available, CupyBackend, "CuPy or a CUDA device is missing"),
}
_SELECTED: dict[str, Backend] = {}  # the backend each name gave in this process, proven


def _gpu_backend(name: str) -> Backend:
    """The proven GPU backend `name`; BackendError if it is missing or fails its test solve."""
    available, make, missing = _GPU_BACKENDS[name]
    if not available():
        raise BackendError(f"backend {name!r} asked for, but {missing}")
    try:
        return _proven(make())
    except Exception as err:  # noqa: BLE001 - any failure of the install is this one error
        raise BackendError(f"backend {name!r} failed a test solve: {_first_line(err)}") from None


def _select(name: str) -> Backend:
    if name == "numpy":
        return NumpyBackend()
    if name == "torch":
        return TorchBackend("cpu")
    if name != "auto":
        return _gpu_backend(name)
    for gpu in GPU_BACKENDS:
        if _GPU_BACKENDS[gpu][0]():
            try:
                return _gpu_backend(gpu)
            except BackendError as err:
                print(f"llm-audit: warning: {err}; not using it", file=sys.stderr)
    return NumpyBackend()


def select_backend(name: str | None = None) -> Backend:
    """Return a backend by name; "auto" (default, or $LLM_AUDIT_BACKEND) picks a GPU that
    passes a test solve, else numpy (see the module docstring)."""
    if name in (None, "auto"):
        name = os.environ.get("LLM_AUDIT_BACKEND") or "auto"
    if name not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name not in _SELECTED:
        _SELECTED[name] = _select(name)
    return _SELECTED[name]
