"""`analyze_matrix` and its batched form: the one place where a matrix becomes report columns.

Data flow per matrix: validate -> orient (N >= M) -> ESD of W -> power-law and MP fits ->
seeded shuffle -> ESD of the shuffle (full, or top-k only) -> MP fit of it -> traps and the
entries behind them. Same-shape matrices (the experts of one layer) share one backend call
per stack, which is what makes a GPU worth having; on the host they go one at a time so
memory stays one matrix deep.

Bad data never raises: NaN/Inf entries, entries too large to square safely, all-zero or
constant matrices and matrices with too few eigenvalues come back with `status` and
`reason` set and the columns that cannot be computed left as None. Wrong *types* (not
2-D, not floating point) are programming errors and raise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import scipy.linalg
from scipy.special import rel_entr

from .backends import ROW_CHUNK, Backend, NumpyBackend, gram_upper, select_backend
from .columns import COLUMN_NAMES, OVER_TRAINED, UNDER_TRAINED
from .entries import EntryAccumulator, EntrySummary, largest_abs, summarize
from .marchenko_pastur import MPFit, fit_mp, mp_edge_from_entries
from .powerlaw import EVALS_THRESH, fit_powerlaw
from .settings import AnalysisSettings
from .shuffle import BucketShuffle, shuffle_generator, shuffled

SMALL_ESD = 100  # below this many eigenvalues WeightWatcher pools 5 shuffles
SMALL_ESD_REPLICAS = 5
TOPK_START = 16
# BF16 and F32 hold entries up to 3.4e38, whose squares overflow float32 and whose fourth
# powers (the kurtosis) overflow float64. Above MAX_ENTRY a matrix is an error row; below
# it the shuffled ESD is computed in float32 only while its Gram's entries (at most
# rows * max|w|^2) stay under FAST_GRAM_LIMIT, else in float64.
MAX_ENTRY = 1e30
FAST_GRAM_LIMIT = 1e30


@dataclass
class _Prepared:
    """A validated matrix: `oriented` is W or W^T with rows >= columns."""

    original: np.ndarray | None
    oriented: np.ndarray | None
    status: str
    reason: str
    largest: float = 0.0  # max |w|


def _to_numpy(matrix: Any) -> np.ndarray:
    """Host numpy view of a numpy array or torch tensor, float32 unless it was float64."""
    if type(matrix).__module__.startswith("torch"):
        import torch

        if not torch.is_floating_point(matrix):
            raise TypeError(f"matrix must have a floating dtype, got {matrix.dtype}")
        if matrix.dtype != torch.float64:
            matrix = matrix.to(torch.float32)
        matrix = matrix.detach().cpu().numpy()
    arr = np.asarray(matrix)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"matrix must have a floating dtype, got {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(arr.shape)}")
    return arr if arr.dtype in (np.float32, np.float64) else arr.astype(np.float32)


def _prepare(matrix: Any, min_evals: int) -> _Prepared:
    arr = _to_numpy(matrix)
    rows, cols = arr.shape
    finite = np.isfinite(arr)
    if not finite.all():
        nan = int(np.isnan(arr).sum())
        return _Prepared(None, None, "error", _not_finite(nan, arr.size - int(finite.sum()) - nan))
    if min(rows, cols) < min_evals:
        return _Prepared(None, None, "skipped", _too_few(rows, cols, min_evals))
    largest = float(max(arr.max(), -arr.min()))  # max |w| without an |arr| copy
    if largest > MAX_ENTRY:
        return _Prepared(None, None, "error", _too_large(largest))
    if largest == 0:
        return _Prepared(None, None, "skipped", ALL_ZERO)
    oriented = arr if rows >= cols else arr.T
    return _Prepared(arr, oriented, "ok", "", largest)


# Why a matrix gets no analysis: one wording for the in-memory and the streamed routes.
ALL_ZERO = "all entries are zero"


def _not_finite(nan: int, inf: int) -> str:
    return f"matrix has {nan} NaN and {inf} Inf entries"


def _too_few(rows: int, cols: int, min_evals: int) -> str:
    return f"shape {rows}x{cols} gives {min(rows, cols)} eigenvalues, fewer than {min_evals}"


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """scipy's `jensenshannon(p, q)` (WeightWatcher's rand_distance), its divergence
    clamped at 0 before the square root: for spectra equal but for round-off (a depthwise
    conv's one-eigenvalue slices, which a shuffle leaves as they are) the sum came out
    -1e-17, and its root NaN, half the time."""
    p, q = p / p.sum(), q / q.sum()
    mid = (p + q) / 2
    divergence = (rel_entr(p, mid).sum() + rel_entr(q, mid).sum()) / 2
    return float(np.sqrt(max(divergence, 0.0)))


def _too_large(largest: float) -> str:
    return f"largest |w| is {largest:.3g}, above {MAX_ENTRY:g}: too large to square safely"


def _fast_gram(largest: float, rows: int) -> bool:
    """Whether a float32 Gram holds a rows-row matrix with entries up to `largest`."""
    return largest * largest * rows < FAST_GRAM_LIMIT


def empty_row(seed: int, matrix_id: str, backend: str | None, rand_route: str) -> dict[str, Any]:
    """A row before any eigenvalue: `backend` names the one that computes them (None for a
    matrix refused or skipped before its ESD, or that failed: `report.schema.failure_row`)."""
    row: dict[str, Any] = dict.fromkeys(COLUMN_NAMES)
    row.update(seed=seed, matrix_id=matrix_id, backend=backend, rand_route=rand_route)
    row.update(trap_evals=[], trap_ratios=[], trap_entries=[], warning="", status="ok", reason="")
    return row


def _scale_columns(evals: np.ndarray, n: int, m: int) -> dict[str, Any]:
    lambda_max = float(evals[-1])
    norm = float(evals.sum())
    return {
        "N": n,
        "M": m,
        "Q": n / m,
        "num_evals": int(evals.size),
        "lambda_max": lambda_max,
        "log_spectral_norm": float(np.log10(lambda_max)),
        "norm": norm,
        "log_norm": float(np.log10(norm)),
        "stable_rank": norm / lambda_max,
    }


def _powerlaw_columns(evals: np.ndarray) -> dict[str, Any]:
    fit = fit_powerlaw(evals)
    if fit is None:
        return {}
    warning = ""
    if fit.alpha < OVER_TRAINED:
        warning = "over-trained"
    elif fit.alpha > UNDER_TRAINED:
        warning = "under-trained"
    # log10(sum lambda^alpha) in log space: a flat spectrum (an orthogonal matrix) fits
    # alpha ~ 1e6, whose lambda^alpha overflows to inf or underflows to 0
    # (numpy, not scipy.special.logsumexp: its array-API dispatch imports torch, which the
    # WeightWatcher drop-in must work without)
    powers = fit.alpha * np.log(evals[evals > 0])
    top = powers.max()
    log_alpha_norm = float((top + np.log(np.sum(np.exp(powers - top)))) / np.log(10.0))
    return {
        "alpha": fit.alpha,
        "xmin": fit.xmin,
        "D": fit.D,
        "sigma": fit.sigma,
        "num_pl_spikes": fit.num_pl_spikes,
        "alpha_weighted": fit.alpha * float(np.log10(evals[-1])),
        "log_alpha_norm": log_alpha_norm,
        "warning": warning,
    }


def _mp_columns(fit: MPFit, prefix: str) -> dict[str, Any]:
    cols = {
        f"{prefix}num_spikes": fit.num_spikes,
        f"{prefix}sigma_mp": fit.sigma_mp,
        f"{prefix}mp_softrank": fit.mp_softrank,
        f"{prefix}bulk_max": fit.bulk_max,
    }
    if not prefix:
        cols["bulk_min"] = fit.bulk_min
    return cols


def shuffle_replicas(num_evals: int) -> int:
    """Shuffles pooled for one matrix's trap count: WeightWatcher pools 5 below 100
    eigenvalues. `rand_num_spikes` counts over all of them; per shuffle, divide by this."""
    return SMALL_ESD_REPLICAS if num_evals < SMALL_ESD else 1


def traps_per_shuffle(pooled: int | None, num_evals: int | None) -> int:
    """A matrix's traps as every summary and the gate count them: `pooled` (its
    `rand_num_spikes`, over `shuffle_replicas` shuffles) per shuffle, rounded up — the
    number of entries behind them (`trap_entries`), so one planted entry in a router of
    32 experts is 1 trap, not 5. None counts as 0 (a matrix not analyzed)."""
    return -(-(pooled or 0) // shuffle_replicas(num_evals or SMALL_ESD))


def _stack(matrices: list[np.ndarray]) -> np.ndarray:
    """[B, n, m] stack; a view, not a 30 MB copy, for the usual single matrix."""
    return matrices[0][None] if len(matrices) == 1 else np.stack(matrices)


class _Analyzer:
    """Holds the run settings; turns stacks of same-shape matrices into rows."""

    def __init__(self, backend: Backend, settings: AnalysisSettings) -> None:
        self.backend = backend
        self.randomize = settings.randomize
        self.seed = settings.seed
        self.rand_route = settings.rand_route
        self.min_evals = settings.min_evals

    def rows(
        self, prepared: Sequence[_Prepared], ids: Sequence[str], keep_spectra: bool
    ) -> list[dict[str, Any]]:
        all_evals = self.backend.esd(_stack([p.oriented for p in prepared]))
        rand_stacks = self._rand_full_esd(prepared, ids) if self.randomize else None
        out = []
        for i, (prep, matrix_id) in enumerate(zip(prepared, ids, strict=True)):
            rand = None if rand_stacks is None else rand_stacks[i]
            entries = summarize(prep.original)
            out.append(
                self.row(
                    prep.oriented.shape, entries, matrix_id, all_evals[i], rand, keep_spectra, prep
                )
            )
        return out

    def _rand_full_esd(
        self, prepared: Sequence[_Prepared], ids: Sequence[str]
    ) -> list[list[np.ndarray] | None]:
        """Full shuffled ESDs (one per replica) where the route or a small ESD needs them."""
        m = prepared[0].oriented.shape[1]
        if self.rand_route == "topk" and m >= SMALL_ESD:
            return [None] * len(prepared)
        replicas = shuffle_replicas(m)
        per_matrix: list[list[np.ndarray] | None] = []
        for prep, matrix_id in zip(prepared, ids, strict=True):
            rng = shuffle_generator(self.seed, matrix_id)
            per_matrix.append([shuffled(prep.oriented, rng) for _ in range(replicas)])
        flat = _stack([s for shuf in per_matrix for s in shuf])
        # float32 Gram and eigensolve: the shuffled ESD feeds only the MP fit (KDE bandwidth
        # 0.1 in mean-1 units) and a count against its edge; 1e-5 lambda_max errors change
        # neither (tests/test_parity_weightwatcher.py checks it against a float64 SVD)
        fast = all(_fast_gram(p.largest, p.oriented.shape[0]) for p in prepared)
        evals = self.backend.esd(flat, fast=fast)
        return [list(evals[i * replicas : (i + 1) * replicas]) for i in range(len(prepared))]

    def row(
        self,
        shape: tuple[int, int],
        entries: EntrySummary,
        matrix_id: str,
        evals: np.ndarray,
        rand: list[np.ndarray] | None,
        keep_spectra: bool,
        prep: _Prepared | None = None,
    ) -> dict[str, Any]:
        """One report row from W's ESD, its shuffled ESDs (None: top-k route, which needs
        the in-memory `prep`) and its entry statistics."""
        n, m = shape
        row = empty_row(self.seed, matrix_id, self.backend.name, self.rand_route)
        row.update(_scale_columns(evals, n, m))
        row.update(entries.columns())
        if keep_spectra:
            row["evals"] = evals
        usable = int(np.count_nonzero(evals > EVALS_THRESH))
        if usable < self.min_evals:
            row["status"] = "skipped"
            row["reason"] = (
                f"only {usable} eigenvalues above {EVALS_THRESH:g}, WeightWatcher's absolute"
                f" cutoff (a rank-deficient or constant matrix, or entries too small: largest"
                f" |w| {entries.max_abs:.3g}); the power-law and MP fits need {self.min_evals}"
            )
            return row
        row.update(_powerlaw_columns(evals))
        row.update(_mp_columns(fit_mp(evals, n, m), ""))
        if self.randomize:
            row.update(
                self._rand_columns(shape, entries, matrix_id, evals, rand, keep_spectra, prep)
            )
        return row

    def _rand_columns(
        self,
        shape: tuple[int, int],
        entries: EntrySummary,
        matrix_id: str,
        evals: np.ndarray,
        rand: list[np.ndarray] | None,
        keep_spectra: bool,
        prep: _Prepared | None,
    ) -> dict[str, Any]:
        n, m = shape
        if rand is None:  # top-k route: only the eigenvalues beyond the edge are computed
            fit, traps, max_rand, spectrum = self._topk_traps(prep, matrix_id, evals.sum())
            distance = None
        else:
            pooled = np.sort(np.concatenate(rand))
            fit = fit_mp(pooled, n, m)
            traps = pooled[pooled > fit.edge_with_tw][::-1]
            max_rand = float(pooled[-1])
            distance = js_distance(evals, rand[0])
            spectrum = pooled
        cols = _mp_columns(fit, "rand_")
        cols["rand_route"] = "topk" if rand is None else "full"
        lambda_max = float(evals[-1])
        per_replica = int(np.ceil(len(traps) / (len(rand) if rand else 1)))
        edge = fit.bulk_max
        cols.update(
            max_rand_eval=max_rand,
            rand_distance=distance,
            ww_softrank=max_rand / lambda_max,
            ww_maxdist=lambda_max - max_rand,
            trap_ratio=max_rand / edge if edge > 0 else None,
            trap_evals=[float(v) for v in traps],
            trap_ratios=[float(v) / edge for v in traps] if edge > 0 else [],
            trap_entries=entries.top(per_replica),
        )
        if keep_spectra:
            cols["rand_evals"] = spectrum
        return cols

    def _topk_traps(
        self, prep: _Prepared, matrix_id: str, total: float
    ) -> tuple[MPFit, np.ndarray, float, np.ndarray]:
        """Traps from a Lanczos top-k solve, doubling k until the edge is inside the top-k."""
        n, m = prep.oriented.shape
        shuf = shuffled(prep.oriented, shuffle_generator(self.seed, matrix_id))
        squares = np.sort(largest_abs(prep.original, m) ** 2)[::-1]
        k = min(TOPK_START, m - 1)
        while True:
            top = self.backend.top_esd(shuf, k)
            fit, traps = mp_edge_from_entries(top, squares, total, n, m)
            if len(traps) < k or k == m - 1:
                return fit, traps, float(top.max()), top
            k = min(2 * k, m - 1)


def _settings(settings: AnalysisSettings | None, options: dict[str, Any]) -> AnalysisSettings:
    return replace(settings or AnalysisSettings(), **options)


def analyze_batch(
    matrices: Iterable[Any],
    *,
    matrix_ids: Sequence[str] | None = None,
    settings: AnalysisSettings | None = None,
    backend: Backend | str | None = None,
    batch_size: int | None = None,
    keep_spectra: bool = False,
    **options: Any,
) -> list[dict[str, Any]]:
    """Analyze many matrices; same-shape ones go to the backend as one stack.

    Settings come from `settings`, updated by `options` (any `AnalysisSettings` field:
    seed, randomize, rand_route, min_evals, ...); `backend` may also be a `Backend`.
    Returns one mapping per matrix, in input order, keyed by report column names (plus,
    when `keep_spectra`, `evals` and `rand_evals`: the shuffled eigenvalues the trap count
    was computed from — 5 pooled shuffles below 100 eigenvalues, the top-k in that route).
    `batch_size` caps a stack; the default is 1 on the host (memory one matrix deep) and
    `gpu_batch_size` on a GPU (a layer's experts).
    """
    if isinstance(backend, str):
        options["backend"] = backend
    cfg = _settings(settings, options)
    mats = list(matrices)
    ids = list(matrix_ids) if matrix_ids is not None else [str(i) for i in range(len(mats))]
    if len(ids) != len(mats):
        raise ValueError(f"{len(mats)} matrices but {len(ids)} matrix_ids")
    be = select_backend(cfg.backend) if backend is None or isinstance(backend, str) else backend
    batch_size = batch_size or cfg.batch_size(be.name)
    analyzer = _Analyzer(be, cfg)
    rows: list[dict[str, Any] | None] = [None] * len(mats)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, matrix in enumerate(mats):
        prep = _prepare(matrix, cfg.min_evals)
        mats[i] = prep
        if prep.status == "ok":
            groups.setdefault(prep.oriented.shape, []).append(i)
        else:  # its shape is known, as in WeightWatcher's rows of skipped layers
            row = empty_row(cfg.seed, ids[i], None, cfg.rand_route)
            shape = np.shape(matrix)
            row.update(N=max(shape), M=min(shape), status=prep.status, reason=prep.reason)
            rows[i] = row
    for members in groups.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            done = analyzer.rows([mats[i] for i in chunk], [ids[i] for i in chunk], keep_spectra)
            for i, row in zip(chunk, done, strict=True):
                rows[i] = row
    return rows  # type: ignore[return-value]


def analyze_matrix(
    matrix: Any,
    *,
    matrix_id: str = "",
    settings: AnalysisSettings | None = None,
    backend: Backend | str | None = None,
    keep_spectra: bool = False,
    **options: Any,
) -> Mapping[str, Any]:
    """HTSR metrics, MP fit and correlation traps of one 2-D matrix (numpy or torch).

    `seed` and `matrix_id` fix the shuffle; `rand_route="topk"` finds traps with a
    Lanczos top-k solve instead of the full shuffled ESD (see README for when it agrees).
    Other settings as in `analyze_batch`.
    """
    return analyze_batch(
        [matrix],
        matrix_ids=[matrix_id],
        settings=settings,
        backend=backend,
        keep_spectra=keep_spectra,
        **options,
    )[0]


def analyze_pooled(
    matrices: Sequence[np.ndarray], *, matrix_id: str, settings: AnalysisSettings
) -> Mapping[str, Any]:
    """One row for same-shape matrices analyzed as one: their ESDs pooled, and each shuffle
    replica every matrix shuffled on its own and pooled — how WeightWatcher treats a Conv2D
    layer's kernel positions (`combined_eigenvalues`, `random_eigenvalues`). Entry
    statistics and trap_entries are over the matrices stacked by rows (rows >= columns)."""
    backend = select_backend(settings.backend)
    stack = np.stack(matrices)
    n, m = stack.shape[1:]
    evals = np.sort(np.concatenate(list(backend.esd(stack))))
    rand = None
    if settings.randomize:
        rng = shuffle_generator(settings.seed, matrix_id)
        rand = []
        for _ in range(shuffle_replicas(evals.size)):
            shuffles = np.stack([shuffled(w, rng) for w in matrices])
            rand.append(np.sort(np.concatenate(list(backend.esd(shuffles)))))
    entries = summarize(np.concatenate(matrices, axis=0))
    return _Analyzer(backend, settings).row((n, m), entries, matrix_id, evals, rand, False)


def analyze_streamed(
    chunks: Callable[[], Iterable[Any]],
    shape: tuple[int, int],
    *,
    matrix_id: str = "",
    settings: AnalysisSettings | None = None,
    rows_per_bucket: int = ROW_CHUNK,
    keep_spectra: bool = False,
    **options: Any,
) -> Mapping[str, Any]:
    """`analyze_matrix` for a tall matrix read in row chunks (rows >= columns), never whole.

    `chunks()` must yield the matrix's rows in order; it is called once: the same pass
    feeds W's Gram, the entry statistics and the shuffle's bucketing, so the matrix is
    read once. Memory is one chunk, two (columns x columns) Grams and one shuffle bucket
    of `rows_per_bucket` rows; the shuffle spills one float32 copy to `spill_dir` (see
    `llm_audit.spectral.shuffle`). Numbers equal the in-memory route's except the
    shuffle's permutation, which the streamed algorithm draws differently from the same
    seed. Always on the host (numpy), whatever `backend` says, and always the full route.
    """
    cfg = replace(_settings(settings, options), backend="numpy", rand_route="full")
    rows, cols = shape
    if rows < cols:
        raise ValueError(f"streamed analysis needs rows >= columns, got {rows}x{cols}")
    backend = NumpyBackend()
    analyzer = _Analyzer(backend, cfg)
    row = empty_row(cfg.seed, matrix_id, None, "full")  # for a refusal before the ESD
    row.update(N=rows, M=cols)
    if cols < cfg.min_evals:
        row.update(status="skipped", reason=_too_few(rows, cols, cfg.min_evals))
        return row
    replicas = shuffle_replicas(cols) if cfg.randomize else 0
    rng = shuffle_generator(cfg.seed, matrix_id)
    shuffles = [
        BucketShuffle(shape, rng, bucket_rows=rows_per_bucket, spill_dir=cfg.spill_dir)
        for _ in range(replicas)
    ]
    try:
        acc = EntryAccumulator()
        gram = np.zeros((cols, cols), order="F")
        nan = inf = 0
        for chunk in chunks():  # one read of the matrix feeds W's Gram and every shuffle
            chunk = _to_numpy(chunk)
            chunk_nan = int(np.isnan(chunk).sum())
            nan, inf = nan + chunk_nan, inf + chunk.size - int(np.isfinite(chunk).sum()) - chunk_nan
            if not nan + inf:
                acc.add(chunk)
                gram += gram_upper(chunk)
                for shuffle in shuffles:
                    shuffle.add(chunk)
        if nan + inf or acc.n != rows * cols:
            reason = (
                _not_finite(nan, inf)
                if nan + inf
                else f"streamed {acc.n} entries for shape {rows}x{cols}"
            )
            row.update(status="error", reason=reason)
            return row
        entries = acc.summary()
        if entries.max_abs > MAX_ENTRY:
            row.update(status="error", reason=_too_large(entries.max_abs))
            return row
        if entries.max_abs == 0:
            row.update(status="skipped", reason=ALL_ZERO)
            return row
        evals = _eigvalsh_upper(gram)
        rand = []
        fast = _fast_gram(entries.max_abs, rows)
        for shuffle in shuffles:
            shuffled_gram = np.zeros((cols, cols), order="F")
            for block in shuffle.blocks():
                shuffled_gram += gram_upper(block, fast=fast)
            rand.append(_eigvalsh_upper(shuffled_gram.astype(np.float32 if fast else np.float64)))
    finally:
        for shuffle in shuffles:
            shuffle.close()
    return analyzer.row(shape, entries, matrix_id, evals, rand or None, keep_spectra)


def _eigvalsh_upper(gram: np.ndarray) -> np.ndarray:
    vals = scipy.linalg.eigvalsh(gram, lower=False, check_finite=False)
    return np.clip(vals.astype(np.float64), 0.0, None)
