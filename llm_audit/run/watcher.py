"""`llm_audit.WeightWatcher`: WeightWatcher 0.7.7's interface on llm-audit's analysis.

Why: WeightWatcher users switch by changing one import. `WeightWatcher(model=m)
.analyze(randomize=True)` returns a pandas DataFrame with WeightWatcher's rows — the
same `layer_id` numbering and `name`s, found by walking the model the way WeightWatcher
0.7.7 does — and its columns, computed by `llm_audit.spectral` (WeightWatcher's fits,
tested against its code), plus ours (traps, trap entries, entry statistics). `status` is
WeightWatcher's ('success', or 'failed' for a layer not analyzed); ours ('ok', 'skipped',
'error') is `audit_status`, with `reason`. The shuffles are seeded from (`seed`, the
layer's long name), so trap counts repeat from run to run, where WeightWatcher's use
numpy's global generator.

What is walked, as WeightWatcher 0.7.7 walks it:
- a torch `nn.Module`: every module of `named_modules()` gets a `layer_id` (the root is
  0, or `start_ids`); a module's type comes from its class (`Linear`, `Conv1d` —
  transformers' GPT-2 `Conv1D` too —, `Conv2d`, `Embedding`, norms) or, failing that,
  from those words in its class name; `name` is the last component of the module's
  dotted name. Norms, modules without a `weight` and unknown types give no row. A weight
  of 3 or more dimensions in a dense-like module (`nn.Bilinear`, `nn.Conv1d`) is not a
  matrix: its row (WeightWatcher's N = largest, M = smallest dimension) is 'failed',
  with the reason.
- a state dict: each `*.weight` key in order gets a `layer_id` from 1; `name` is the key
  without `.weight`; 2-D tensors are dense, 4-D ones Conv2D, others give no row.
- Conv2D kernels [out, in, kh, kw] become kh·kw slices whose eigenvalues are pooled into
  one ESD (WeightWatcher's `pool=True`), each slice times √½ (its `conv2d_norm`).
- a layer whose pooled ESD has fewer than `min_evals` or more than `max_evals`
  eigenvalues (a falsy limit is none, as in WeightWatcher), or whose N exceeds `max_N`,
  gives no row.
- a checkpoint path or a hub id in the local cache goes through the real audit
  (`llm_audit.audit`: plan, Ray tasks, report) in a temporary folder; its rows are the
  report's rows (a fused qkv is three), `layer_id` counting from 1 in plan order, so
  integer `layers=` ids are refused there. `layer_type` is the type WeightWatcher's
  folder walk gives the tensor (`dense` for every 2-D one, embeddings included; a conv
  kernel position `conv1d` or `conv2d`), the audit's role is `kind`; a name in `layers=`
  matches the module (the tensor's name without `.weight`) or the row's `name`.

Only WeightWatcher's analysis options that change nothing here or that we compute are
accepted; any other (plots, FFT, intra-layer, ...) is refused by name rather than
silently ignored.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from ..source import weight_norm
from ..spectral.analyze import analyze_batch, analyze_pooled
from ..spectral.settings import AnalysisSettings

if TYPE_CHECKING:  # pandas and torch are needed only by the calls that use them
    import pandas as pd

DEFAULT_MAX_EVALS = 15000  # WeightWatcher 0.7.7's constants (min_evals: AnalysisSettings')
DEFAULT_MAX_N = 50000
CONV2D_NORM = np.sqrt(0.5)  # WeightWatcher scales each Conv2D slice by sqrt(conv2d_count / 2)
SUMMARY_METRICS = (
    "log_norm",
    "alpha",
    "alpha_weighted",
    "log_alpha_norm",
    "log_spectral_norm",
    "stable_rank",
    "mp_softrank",
)
# the module classes WeightWatcher recognises, in its order: (type, torch class name, word)
_MODULE_TYPES = (
    ("dense", "Linear", "linear"),
    ("conv1d", "Conv1d", "conv1d"),
    ("conv2d", "Conv2d", "conv2d"),
    ("embedding", "Embedding", "embedding"),
)
# WeightWatcher's other public methods (0.7.7)
NOT_PROVIDED = (
    "describe", "get_ESD", "get_Weights", "distances", "matrix_distance", "same_models",
    "model_deltas", "SVDSharpness", "SVDSmoothing", "analyze_vectors", "vector_metrics",
    "plot_random_esd", "banner", "header",
)  # fmt: skip
# WeightWatcher.analyze keywords whose default we implement; any other value is refused
_ACCEPTED_DEFAULTS: dict[str, Any] = {
    "plot": False,
    "savefig": "ww-img",
    "pool": True,
    "conv2d_fft": False,
    "fft": False,
    "deltas": False,
    "intra": False,
    "vectors": False,
    "stacked": False,
    "fix_fingers": False,
    "fit": "PL",
    "detX": False,
    "ERG": False,
    "glorot_fix": False,
    "base_model": None,
    "peft": False,
    "inverse": False,
    "channels": None,
    "ww2x": False,
    "xmax": None,
    "min_size": None,
    "max_size": None,
    "pl_package": "ww",
    "sparsify": True,
    "svd_method": "fast",
    "tolerance": 1e-6,
    "max_fingers": 10,
    "finger_thresh": 1.0,
    "xmin_max": None,
}
# WeightWatcher options whose every value is fine: `savefig` names plots (plot=True is
# refused), `sparsify` acts on intra-layer products (intra=True is refused)
_IGNORED = ("savefig", "sparsify")
# options with more than one accepted value: any SVD method gives the same eigenvalues
# (ours come from the Gram matrix), but WeightWatcher refuses names outside its list
_CHOICES: dict[str, tuple[Any, ...]] = {"svd_method": ("fast", "accurate")}
# the frameworks WeightWatcher names whose models we read (its `framework=` is otherwise
# unused: it infers the framework from the model)
_FRAMEWORKS = ("pytorch", "pystatedict", "pystatedict_dir")
_FILTER_TYPES = ("conv2d", "conv1d", "dense", "embedding", "norm")  # its LAYER_TYPES_SUPPORTED
_LEAD = ("layer_id", "name", "longname", "layer_type", "N", "M", "rf", "Q")


@dataclass
class _Layer:
    """One WeightWatcher layer: its matrix (in the module's layout, so trap_entries
    coordinates index its weight) or a Conv2D's slices (rows >= columns), with
    WeightWatcher's N and M; no matrices for a weight that is not one (`reason` says so)."""

    layer_id: int
    name: str
    longname: str
    layer_type: str
    mats: list[np.ndarray]
    rf: int
    n: int
    m: int
    reason: str = ""


@dataclass(frozen=True)
class _LayerFilter:
    """WeightWatcher's `layers=` filter: layer types, ids to keep (or, all negative, to
    drop), names to keep (or, all starting with '-', to drop); as in WeightWatcher, the
    later kinds override the earlier for a layer."""

    types: frozenset[str]
    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def parse(cls, layers: Sequence[int | str] | int | str) -> _LayerFilter:
        items = list(layers) if isinstance(layers, list | tuple) else [layers]
        types = frozenset(x for x in items if isinstance(x, str) and x in _FILTER_TYPES)
        ids = tuple(int(x) for x in items if isinstance(x, int | np.integer))
        names = tuple(x for x in items if isinstance(x, str) and x not in types)
        if len({n.startswith("-") for n in names}) > 1:
            raise UsageError("layers: give names to keep or names ('-name') to skip, not both")
        return cls(types, ids, names)

    def keep(self, layer_id: int, layer_type: str, names: Sequence[str]) -> bool:
        """Whether the layer with this id, type and names (any of which may match) stays."""
        ok = True
        if self.types:
            ok = layer_type in self.types
        if self.ids:
            ok = layer_id in self.ids if min(self.ids) >= 0 else -layer_id not in self.ids
        if self.names:
            if self.names[0].startswith("-"):
                ok = not any(f"-{name}" in self.names for name in names)
            else:
                ok = any(name in self.names for name in names)
        return ok


def _size_ok(num_evals: int, n: int, min_evals: int, max_evals: int, max_n: int) -> bool:
    """WeightWatcher's `layer_supported` size tests; a falsy min_evals or max_evals is no
    limit there, and so here."""
    return (
        (not min_evals or num_evals >= min_evals)
        and (not max_evals or num_evals <= max_evals)
        and n <= max_n
    )


def _oriented(matrix: np.ndarray) -> np.ndarray:
    return matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T


def _conv2d_slices(kernel: np.ndarray, conv2d_norm: bool) -> tuple[list[np.ndarray], int]:
    """The matrices of WeightWatcher's `conv2D_Wmats` for a torch kernel [out, in, kh, kw]:
    the (out, in) slice at each kernel position, oriented rows >= columns (both of its
    branches take these slices), rf = kh·kw. Its N and M differ where out < in and
    out + in < kh + kw: its channels-flip branch then reports N = out < M = in (Q < 1),
    which its MP fits use; ours keep N >= M (README, "What is computed")."""
    _, _, kh, kw = kernel.shape
    scale = CONV2D_NORM if conv2d_norm else 1.0
    mats = [_oriented(kernel[:, :, i, j] * scale) for i in range(kh) for j in range(kw)]
    return mats, kh * kw


def _module_type(module: Any) -> str:
    import torch

    for kind, cls, word in _MODULE_TYPES:
        if isinstance(module, getattr(torch.nn, cls)) or word in str(type(module)).lower():
            return kind
    return "norm" if "norm" in str(type(module)).lower() else "unknown"


def _layer(
    layer_id: int, name: str, longname: str, kind: str, weight: np.ndarray, conv2d_norm: bool
) -> _Layer | None:
    if kind == "conv2d":
        if weight.ndim != 4:
            return None
        mats, rf = _conv2d_slices(weight, conv2d_norm)
        return _Layer(layer_id, name, longname, kind, mats, rf, *mats[0].shape)
    if weight.ndim < 2:
        return None
    n, m = max(weight.shape), min(weight.shape)
    if weight.ndim == 2:
        return _Layer(layer_id, name, longname, kind, [weight], 1, n, m)
    reason = (
        f"its weight is {weight.ndim}-D {list(weight.shape)}, not a matrix: not analyzed "
        f"(WeightWatcher 0.7.7 fits the {m} largest singular values of its slices pooled)"
    )
    return _Layer(layer_id, name, longname, kind, [], 1, n, m, reason)


def _pandas() -> Any:
    """pandas, or one line saying how to get it (a plain install has none)."""
    try:
        import pandas
    except ImportError:
        raise UsageError(
            "llm_audit.WeightWatcher returns pandas DataFrames: pip install 'llm-audit[pandas]'"
        ) from None
    return pandas


def _to_numpy(tensor: Any) -> np.ndarray:
    """A float32 host copy, as WeightWatcher's `torch_T_to_np` (float64 kept)."""
    torch = sys.modules.get("torch")  # a torch tensor implies torch is imported already
    if torch is not None and isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().to("cpu")
        return (tensor if tensor.dtype == torch.float64 else tensor.float()).numpy()
    array = np.asarray(tensor)
    if not np.issubdtype(array.dtype, np.floating):
        raise UsageError(f"a weight of dtype {array.dtype} is not a floating-point tensor")
    return array if array.dtype == np.float64 else array.astype(np.float32)


def _module_layers(model: Any, start_id: int, conv2d_norm: bool) -> Iterator[_Layer]:
    for offset, (longname, module) in enumerate(model.named_modules()):
        kind = _module_type(module)
        weight = getattr(module, "weight", None)
        if kind in ("norm", "unknown") or weight is None:
            continue
        name = longname.split(".")[-1] if longname else type(module).__name__
        layer = _layer(
            start_id + offset, name, longname or name, kind, _to_numpy(weight), conv2d_norm
        )
        if layer is not None:
            yield layer


def _state_dict_layers(state: Mapping[str, Any], conv2d_norm: bool) -> Iterator[_Layer]:
    layer_id = 1
    for key, tensor in state.items():
        if not isinstance(key, str) or not key.endswith(".weight"):
            continue
        weight = _to_numpy(tensor)
        kind = {2: "dense", 4: "conv2d"}.get(weight.ndim)
        name = key[: -len(".weight")]
        if kind is not None and weight.shape[0] >= 2:
            layer = _layer(layer_id, name, name, kind, weight, conv2d_norm)
            if layer is not None:
                yield layer
        layer_id += 1


def _missing(value: Any) -> bool:
    """None, or the NaN pandas puts for a null number."""
    return value is None or (isinstance(value, float) and np.isnan(value))


def _module_name(tensor: str) -> str:
    """The module a weight tensor belongs to: its name without `.weight` (or without a
    weight norm's direction `.weight_v`, `.parametrizations.weight.original1`)."""
    for suffix in ("weight", *(v for _, v in weight_norm.PAIRS)):
        if tensor.endswith("." + suffix):
            return tensor[: -len(suffix) - 1]
    return tensor


def _folder_type(row: Mapping[str, Any]) -> str:
    """The type WeightWatcher's folder walk gives a report row's tensor (2-D: dense; a conv
    kernel: by its dimensions): a conv kernel position's id is `weight[i,j]`."""
    matrix = row["matrix"]
    if not _missing(row.get("expert")) or not matrix.endswith("]") or "[" not in matrix:
        return "dense"
    position = matrix[matrix.rindex("[") :]
    return {1: "conv1d", 2: "conv2d"}.get(position.count(",") + 1, "conv3d")


class WeightWatcher:
    """Drop-in for `weightwatcher.WeightWatcher` (0.7.7): `analyze`, `get_details`,
    `get_summary`. `model` is a torch `nn.Module`, a state dict, a checkpoint path or a hub
    id in the local Hugging Face cache. `log_level` is taken and changes nothing: the
    drop-in writes no log."""

    def __init__(
        self,
        model: Any = None,
        framework: str | None = None,
        base_model: Any = None,
        log_level: Any = None,
    ) -> None:
        if base_model is not None:
            raise UsageError("WeightWatcher: base_model (weight deltas) is not supported")
        if framework is not None and framework not in _FRAMEWORKS:
            raise UsageError(
                f"WeightWatcher: framework={framework!r} is not supported (llm-audit reads "
                f"torch modules, state dicts and checkpoint folders: None or "
                f"{', '.join(map(repr, _FRAMEWORKS))})"
            )
        self.model = model
        self.details: pd.DataFrame | None = None
        self._mp_fit = False

    def analyze(
        self,
        model: Any = None,
        layers: Sequence[int | str] = (),
        min_evals: int = AnalysisSettings.min_evals,
        max_evals: int = DEFAULT_MAX_EVALS,
        max_N: int = DEFAULT_MAX_N,
        randomize: bool = False,
        mp_fit: bool = False,
        conv2d_norm: bool = True,
        start_ids: int = 0,
        seed: int = 0,
        backend: str = "auto",
        **options: Any,
    ) -> pd.DataFrame:
        """Analyze every supported layer; returns (and keeps, for `get_details`) a DataFrame
        with WeightWatcher's columns first (`layer_id`, `name`, ...), then ours.

        `seed` fixes the shuffles (with each layer's long name); `backend` is llm-audit's
        (numpy, torch, cuda, cupy, auto). Other WeightWatcher options are accepted at
        their defaults and refused otherwise.
        """
        pd = _pandas()
        for key, value in options.items():
            if key not in _ACCEPTED_DEFAULTS:
                raise UsageError(f"WeightWatcher.analyze: unknown option {key!r}")
            allowed = _CHOICES.get(key, (_ACCEPTED_DEFAULTS[key],))
            if key not in _IGNORED and value not in allowed:
                raise UsageError(
                    f"WeightWatcher.analyze: {key}={value!r} is not supported "
                    f"(only {', '.join(map(repr, allowed))})"
                )
        model = self.model if model is None else model
        if model is None:
            raise UsageError("WeightWatcher: no model given")
        self.model, self._mp_fit = model, mp_fit
        settings = AnalysisSettings(
            seed=seed, randomize=randomize, min_evals=min_evals, backend=backend
        )
        keep = _LayerFilter.parse(layers)
        sizes = (min_evals, max_evals, max_N)
        if isinstance(model, str | Path):
            if start_ids != 0 or not conv2d_norm:  # the report's rows, as the audit plans them
                raise UsageError(
                    "WeightWatcher.analyze: start_ids and conv2d_norm apply to an nn.Module "
                    "or a state dict; a folder or hub id gives the audit's rows"
                )
            if keep.ids:
                raise UsageError(
                    f"WeightWatcher.analyze: layers={list(keep.ids)}: on a folder or hub id "
                    "the rows are the audit report's (a fused qkv is three), so integer ids "
                    "are not WeightWatcher's; filter by name or type (e.g. layers=['dense'])"
                )
            frame = self._audit(str(model), settings, keep, sizes)
        else:
            walked = self._walk(model, start_ids, conv2d_norm)
            frame = self._analyze_layers(walked, settings, keep, sizes)
        self.details = frame if len(frame) else pd.DataFrame()
        return self.details

    @staticmethod
    def _walk(model: Any, start_ids: int, conv2d_norm: bool) -> Iterator[_Layer]:
        if isinstance(model, Mapping):
            if isinstance(model.get("state_dict"), Mapping):  # a training checkpoint, as
                model = model["state_dict"]  # WeightWatcher unwraps it
            nested = [k for k, v in model.items() if isinstance(v, Mapping)]
            if nested and not any(str(k).endswith(".weight") for k in model):
                raise UsageError(
                    f"WeightWatcher: the state dict has no '*.weight' tensors but mappings "
                    f"under {', '.join(map(repr, nested[:5]))}: pass the one holding the "
                    f"weights, e.g. model=checkpoint[{nested[0]!r}]"
                )
            return _state_dict_layers(model, conv2d_norm)
        if hasattr(model, "named_modules"):
            return _module_layers(model, start_ids, conv2d_norm)
        raise UsageError(
            f"WeightWatcher: model must be a torch nn.Module, a state dict, a checkpoint path "
            f"or a hub id, not {type(model).__name__}"
        )

    @staticmethod
    def _analyze_layers(
        walked: Iterator[_Layer],
        settings: AnalysisSettings,
        keep: _LayerFilter,
        sizes: tuple[int, int, int],
    ) -> pd.DataFrame:
        pd = _pandas()
        chosen = [
            layer
            for layer in walked
            if keep.keep(layer.layer_id, layer.layer_type, (layer.name,))
            and _size_ok(layer.m * layer.rf, layer.n, *sizes)
        ]
        single = [layer for layer in chosen if layer.mats and layer.rf == 1]
        rows = dict(
            zip(
                (id(layer) for layer in single),
                analyze_batch(
                    [layer.mats[0] for layer in single],
                    matrix_ids=[layer.longname for layer in single],
                    settings=settings,
                ),
                strict=True,
            )
        )
        records = []
        for layer in chosen:
            if not layer.mats:
                row = {"N": layer.n, "M": layer.m, "Q": layer.n / layer.m}
                row |= {"status": "skipped", "reason": layer.reason}
            else:
                row = rows.get(id(layer)) or analyze_pooled(
                    layer.mats, matrix_id=layer.longname, settings=settings
                )
            records.append(
                {
                    "layer_id": layer.layer_id,
                    "name": layer.name,
                    "longname": layer.longname,
                    "layer_type": layer.layer_type,
                    "rf": layer.rf,
                }
                | _ww_columns(row)
            )
        return _ordered(pd.DataFrame.from_records(records))

    def _audit(
        self,
        reference: str,
        settings: AnalysisSettings,
        keep: _LayerFilter,
        sizes: tuple[int, int, int],
    ) -> pd.DataFrame:
        from .api import audit

        pd = _pandas()
        with tempfile.TemporaryDirectory(prefix="llm-audit-ww-") as tmp:
            report = audit(
                reference,
                Path(tmp) / "report",
                seed=settings.seed,
                randomize=settings.randomize,
                min_evals=settings.min_evals,
                backend=settings.backend,
            )
            rows = report.to_pandas().to_dict("records")
        records = []
        for layer_id, row in enumerate(rows, start=1):
            lead = {
                "layer_id": layer_id,
                "name": row["matrix"],
                "longname": row["matrix"],
                "layer_type": _folder_type(row),
                "rf": 1,
            }
            names = (_module_name(row["tensor"]), row["matrix"])
            shape = (row["M"], row["N"])
            if keep.keep(layer_id, lead["layer_type"], names) and (
                any(_missing(x) for x in shape) or _size_ok(*shape, *sizes)
            ):
                records.append(lead | _ww_columns(row))
        return _ordered(pd.DataFrame.from_records(records))

    def get_details(self) -> pd.DataFrame | None:
        """The DataFrame of the last `analyze`."""
        return self.details

    def __getattr__(self, name: str) -> Any:
        # WeightWatcher methods the drop-in does not provide: refused by name, not with a
        # bare AttributeError a migrating script cannot act on
        if name in NOT_PROVIDED:
            raise UsageError(
                f"WeightWatcher.{name} is not provided by llm-audit's drop-in (it has "
                "analyze, get_details and get_summary); see llm-audit's README"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def get_summary(self, details: pd.DataFrame | None = None) -> dict[str, float]:
        """Means of WeightWatcher's summary metrics over the layers (`mp_softrank` only
        after `analyze(mp_fit=True)`, as WeightWatcher reports it only then)."""
        details = self.details if details is None else details
        if details is None or len(details) == 0:
            return {}
        metrics = [m for m in SUMMARY_METRICS if m != "mp_softrank" or self._mp_fit]
        return {m: float(details[m].mean()) for m in metrics if m in details.columns}


def _ww_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """Our row plus the WeightWatcher columns that are exact functions of it, computed as
    WeightWatcher computes them; `status` becomes its 'success' / 'failed', ours is kept
    as `audit_status`."""
    out = dict(row)
    lam, alpha, norm = (row.get(k) for k in ("lambda_max", "alpha", "norm"))
    fitted, rand_fitted = (not _missing(row.get(k)) for k in ("bulk_max", "rand_bulk_max"))
    out["has_esd"] = not _missing(lam)
    out["sv_max"] = None if _missing(lam) else float(np.sqrt(lam))
    out["spectral_norm"] = lam
    # its power-law fit's xmax is the largest eigenvalue it fitted: lambda_max
    out["xmax"] = None if _missing(alpha) else lam
    # its MP fits rescale the ESD to mean 1 by W_scale**2 = num_evals / norm; a shuffle
    # keeps the norm (and the pooled shuffles' count), so rand_W_scale is W_scale
    w_scale = float(np.sqrt(row["num_evals"] / norm)) if fitted else None
    out["W_scale"] = w_scale
    out["num_traps"] = row.get("rand_num_spikes")
    out["rand_W_scale"] = w_scale if rand_fitted else None
    # one MP fit's bulk_min / bulk_max: (sigma (1 - 1/sqrt Q))^2 / (sigma (1 + 1/sqrt Q))^2
    out["rand_bulk_min"] = None
    if rand_fitted:
        root = 1.0 / np.sqrt(row["Q"])
        out["rand_bulk_min"] = float(row["rand_bulk_max"] * ((1 - root) / (1 + root)) ** 2)
    out["audit_status"] = row["status"]
    out["status"] = "success" if row["status"] == "ok" else "failed"
    return out


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """WeightWatcher's lead columns first, then the rest as they come."""
    lead = [c for c in _LEAD if c in frame.columns]
    return frame[lead + [c for c in frame.columns if c not in lead]]
