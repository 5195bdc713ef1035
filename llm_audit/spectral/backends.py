"""Array backends that turn weight matrices into eigenvalues: numpy, torch (CPU or CUDA), CuPy.

Why this shape: every ESD here is "float64 Gram of the smaller side, then a symmetric
eigensolve" (or, as a reference route, float64 singular values). Only where the arrays
live differs, so a backend is four operations — Gram, batched eigvalsh, batched singular
values and a top-k eigensolve — and everything above it (orientation, shuffling, fits)
is shared host code. Eigenvalues always come back as float64 numpy arrays, ascending.

Accuracy: the Gram is formed after upcasting to float64 (a float32 Gram loses eigenvalues
below ~1e-6 lambda_max), accumulated over row chunks so a 201088 x 2880 embedding never
needs a float64 copy of itself. Tiny negative eigenvalues from round-off are clipped to 0.

Selection: `select_backend("auto")` takes CUDA through torch when a GPU is visible (CuPy
when asked for, or when torch has no CUDA but CuPy does), else numpy. `LLM_AUDIT_BACKEND`
overrides "auto".
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dsyrk, ssyrk
from scipy.sparse.linalg import eigsh

from ..errors import BackendError

GRAM_ROW_CHUNK = 16384  # rows upcast to float64 at a time when forming a Gram
BACKEND_NAMES = ("auto", "numpy", "torch", "cuda", "cupy")
GPU_BACKENDS = ("cuda", "cupy")


class Backend(Protocol):
    """What the spectral code needs from an array library."""

    name: str

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
    for start in range(0, matrix.shape[0], GRAM_ROW_CHUNK):
        chunk = matrix[start : start + GRAM_ROW_CHUNK]
        if fast:
            # chunk.T is Fortran-ordered without a copy; syrk(a) = a @ a.T
            gram += ssyrk(1.0, chunk.astype(np.float32, copy=False).T, trans=0, lower=0)
        else:
            chunk = chunk.astype(np.float64, copy=False)
            gram = dsyrk(1.0, chunk.T, beta=1.0, c=gram, trans=0, lower=0, overwrite_c=1)
    return gram


class NumpyBackend:
    """LAPACK through numpy/scipy on the host; always available."""

    name = "numpy"

    def esd(self, stack: np.ndarray, *, fast: bool = False) -> np.ndarray:
        out = np.empty((stack.shape[0], stack.shape[2]))
        for i, matrix in enumerate(stack):
            gram = gram_upper(matrix, fast)
            if fast:
                gram = gram.astype(np.float32)
            out[i] = scipy.linalg.eigvalsh(gram, lower=False, check_finite=False)
        return np.clip(out, 0.0, None)

    def svd_esd(self, stack: np.ndarray) -> np.ndarray:
        sv = np.stack([scipy.linalg.svdvals(m.astype(np.float64)) for m in stack])
        return np.sort(sv * sv, axis=1)

    def top_esd(self, matrix: np.ndarray, k: int) -> np.ndarray:
        upper = gram_upper(matrix)
        gram = upper + np.triu(upper, 1).T
        vals = eigsh(gram, k=k, which="LA", return_eigenvectors=False, tol=0.0)
        return np.clip(np.sort(vals), 0.0, None)


class TorchBackend:
    """torch.linalg on CPU or CUDA; on CUDA the batch is one call per stack."""

    def __init__(self, device: str = "cpu") -> None:
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.name = "cuda" if self.device.type == "cuda" else "torch"

    def _gram(self, stack: np.ndarray, fast: bool = False):
        torch = self._torch
        t = torch.from_numpy(np.ascontiguousarray(stack)).to(self.device)
        b, n, m = t.shape
        gram = torch.zeros((b, m, m), dtype=torch.float64, device=self.device)
        for start in range(0, n, GRAM_ROW_CHUNK):
            chunk = t[:, start : start + GRAM_ROW_CHUNK]
            chunk = chunk.to(torch.float32 if fast else torch.float64)
            gram += chunk.transpose(1, 2) @ chunk
        return gram

    def esd(self, stack: np.ndarray, *, fast: bool = False) -> np.ndarray:
        gram = self._gram(stack, fast)
        if fast:
            gram = gram.to(self._torch.float32)
        vals = self._torch.linalg.eigvalsh(gram)
        return np.clip(vals.cpu().numpy().astype(np.float64), 0.0, None)

    def svd_esd(self, stack: np.ndarray) -> np.ndarray:
        torch = self._torch
        t = torch.from_numpy(np.ascontiguousarray(stack)).to(self.device, torch.float64)
        kwargs = {"driver": "gesvd"} if self.device.type == "cuda" else {}
        sv = torch.linalg.svdvals(t, **kwargs).cpu().numpy()
        return np.sort(sv * sv, axis=1)

    def top_esd(self, matrix: np.ndarray, k: int) -> np.ndarray:
        # Lanczos on the host Gram: exact where randomized SVD under-estimates flat spectra.
        gram = self._gram(matrix[None])[0].cpu().numpy()
        vals = eigsh(gram, k=k, which="LA", return_eigenvectors=False, tol=0.0)
        return np.clip(np.sort(vals), 0.0, None)


class CupyBackend:
    """CuPy on the GPU: batched eigvalsh, and Lanczos (cupyx eigsh) for the top-k route."""

    name = "cupy"

    def __init__(self) -> None:
        import cupy

        self._cp = cupy

    def _gram(self, stack: np.ndarray, fast: bool = False):
        cp = self._cp
        t = cp.asarray(stack)
        b, n, m = t.shape
        gram = cp.zeros((b, m, m), dtype=cp.float64)
        for start in range(0, n, GRAM_ROW_CHUNK):
            chunk = t[:, start : start + GRAM_ROW_CHUNK]
            chunk = chunk.astype(cp.float32 if fast else cp.float64)
            gram += cp.matmul(chunk.transpose(0, 2, 1), chunk)
        return gram

    def esd(self, stack: np.ndarray, *, fast: bool = False) -> np.ndarray:
        gram = self._gram(stack, fast)
        if fast:
            gram = gram.astype(self._cp.float32)
        vals = self._cp.linalg.eigvalsh(gram)
        return np.clip(self._cp.asnumpy(vals).astype(np.float64), 0.0, None)

    def svd_esd(self, stack: np.ndarray) -> np.ndarray:
        cp = self._cp
        sv = cp.linalg.svd(cp.asarray(stack, dtype=cp.float64), compute_uv=False)
        return np.sort(cp.asnumpy(sv) ** 2, axis=1)

    def top_esd(self, matrix: np.ndarray, k: int) -> np.ndarray:
        from cupyx.scipy.sparse.linalg import eigsh as cupy_eigsh

        gram = self._gram(matrix[None])[0]
        vals = cupy_eigsh(gram, k=k, which="LA", return_eigenvectors=False)
        return np.clip(np.sort(self._cp.asnumpy(vals)), 0.0, None)


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


def select_backend(name: str | None = None) -> Backend:
    """Return a backend by name; "auto" (default, or $LLM_AUDIT_BACKEND) picks the GPU if any."""
    if name in (None, "auto"):
        name = os.environ.get("LLM_AUDIT_BACKEND") or "auto"
    if name not in BACKEND_NAMES:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name == "auto":
        if _torch_cuda_available():
            return TorchBackend("cuda")
        if _cupy_available():
            return CupyBackend()
        return NumpyBackend()
    if name == "numpy":
        return NumpyBackend()
    if name == "torch":
        return TorchBackend("cpu")
    if name == "cuda":
        if not _torch_cuda_available():
            raise BackendError("backend 'cuda' asked for, but torch sees no CUDA device")
        return TorchBackend("cuda")
    if not _cupy_available():
        raise BackendError("backend 'cupy' asked for, but CuPy or a CUDA device is missing")
    return CupyBackend()
