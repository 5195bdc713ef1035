"""`llm_audit.WeightWatcher`: WeightWatcher 0.7.7's interface on llm-audit's analysis.

Why: WeightWatcher users switch by changing one import. `WeightWatcher(model=m)
.analyze(randomize=True)` returns a pandas DataFrame with WeightWatcher's rows — the
same `layer_id` numbering and `name`s, found by walking the model the way WeightWatcher
0.7.7 does — and its columns, computed by `llm_audit.spectral` (WeightWatcher's fits,
tested against its code), plus ours (traps, trap entries, entry statistics, status).
The shuffles are seeded from (`seed`, the layer's long name), so trap counts repeat from
run to run, where WeightWatcher's use numpy's global generator.

What is walked, as WeightWatcher 0.7.7 walks it:
- a torch `nn.Module`: every module of `named_modules()` gets a `layer_id` (the root is
  0, or `start_ids`); a module's type comes from its class (`Linear`, `Conv1d` —
  transformers' GPT-2 `Conv1D` too —, `Conv2d`, `Embedding`, norms) or, failing that,
  from those words in its class name; `name` is the last component of the module's
  dotted name. Norms, modules without a `weight` and unknown types give no row.
- a state dict: each `*.weight` key in order gets a `layer_id` from 1; `name` is the key
  without `.weight`; 2-D tensors are dense, 4-D ones Conv2D, others give no row.
- Conv2D kernels [out, in, kh, kw] become kh·kw slices whose eigenvalues are pooled into
  one ESD (WeightWatcher's `pool=True`), each slice times √½ (its `conv2d_norm`).
- a layer whose pooled ESD has fewer than `min_evals` or more than `max_evals`
  eigenvalues, or whose N exceeds `max_N`, gives no row.
- a checkpoint path or a hub id in the local cache goes through the real audit
  (`llm_audit.audit`: plan, Ray tasks, report) in a temporary folder; its rows are the
  report's rows, `layer_id` counting from 1 in plan order.

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
from ..spectral.analyze import analyze_batch, analyze_pooled
from ..spectral.settings import AnalysisSettings

if TYPE_CHECKING:  # pandas and torch are needed only by the calls that use them
    import pandas as pd

DEFAULT_MIN_EVALS = 8  # WeightWatcher 0.7.7's constants
DEFAULT_MAX_EVALS = 15000
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
# WeightWatcher options whose every value is fine: they change nothing in our numbers
_IGNORED = ("savefig", "svd_method", "tolerance", "pl_package", "sparsify")
_FILTER_TYPES = ("conv2d", "conv1d", "dense", "embedding", "norm")  # its LAYER_TYPES_SUPPORTED
_LEAD = ("layer_id", "name", "longname", "layer_type", "N", "M", "rf", "Q")


@dataclass
class _Layer:
    """One WeightWatcher layer: its matrix (in the module's layout, so trap_entries
    coordinates index its weight) or a Conv2D's slices (rows >= columns)."""

    layer_id: int
    name: str
    longname: str
    layer_type: str
    mats: list[np.ndarray]
    rf: int

    @property
    def n(self) -> int:
        return max(self.mats[0].shape)

    @property
    def m(self) -> int:
        return min(self.mats[0].shape)


def _oriented(matrix: np.ndarray) -> np.ndarray:
    return matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T


def _conv2d_slices(kernel: np.ndarray, conv2d_norm: bool) -> tuple[list[np.ndarray], int]:
    """WeightWatcher's `conv2D_Wmats` for a torch kernel [out, in, kh, kw]: one matrix per
    kernel position (its "channels first" branch slices the same way), rf = kh·kw."""
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
    if kind in ("dense", "conv1d", "embedding") and weight.ndim == 2:
        return _Layer(layer_id, name, longname, kind, [weight], 1)
    if kind == "conv2d" and weight.ndim == 4:
        mats, rf = _conv2d_slices(weight, conv2d_norm)
        return _Layer(layer_id, name, longname, kind, mats, rf)
    return None


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


def _filter(layers: Sequence[int | str]) -> Any:
    """WeightWatcher's `layers=` filter: ids to keep (or, all negative, to drop), names to
    keep (or, all starting with '-', to drop), or layer types."""
    items = list(layers) if isinstance(layers, list | tuple) else [layers]
    types = {x for x in items if isinstance(x, str) and x in _FILTER_TYPES}
    ids = [int(x) for x in items if isinstance(x, int | np.integer)]
    names = [x for x in items if isinstance(x, str) and x not in types]
    if names and any(n.startswith("-") for n in names) != all(n.startswith("-") for n in names):
        raise UsageError("layers: give names to keep or names ('-name') to skip, not both")

    def keep(layer: _Layer) -> bool:
        ok = True
        if types:
            ok = layer.layer_type in types
        if ids:
            ok = layer.layer_id in ids if min(ids) >= 0 else -layer.layer_id not in ids
        if names:
            ok = f"-{layer.name}" not in names if names[0].startswith("-") else layer.name in names
        return ok

    return keep


class WeightWatcher:
    """Drop-in for `weightwatcher.WeightWatcher` (0.7.7): `analyze`, `get_details`,
    `get_summary`. `model` is a torch `nn.Module`, a state dict, a checkpoint path or a hub
    id in the local Hugging Face cache."""

    def __init__(
        self,
        model: Any = None,
        framework: str | None = None,
        base_model: Any = None,
        log_level: Any = None,
    ) -> None:
        if base_model is not None:
            raise UsageError("WeightWatcher: base_model (weight deltas) is not supported")
        self.model = model
        self.details: pd.DataFrame | None = None
        self._mp_fit = False

    def analyze(
        self,
        model: Any = None,
        layers: Sequence[int | str] = (),
        min_evals: int = DEFAULT_MIN_EVALS,
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
            if key not in _IGNORED and value != _ACCEPTED_DEFAULTS[key]:
                raise UsageError(
                    f"WeightWatcher.analyze: {key}={value!r} is not supported "
                    f"(only {_ACCEPTED_DEFAULTS[key]!r})"
                )
        model = self.model if model is None else model
        if model is None:
            raise UsageError("WeightWatcher: no model given")
        self.model, self._mp_fit = model, mp_fit
        settings = AnalysisSettings(
            seed=seed, randomize=randomize, min_evals=min_evals, backend=backend
        )
        if isinstance(model, str | Path):
            if start_ids != 0 or not conv2d_norm:  # the report's rows, as the audit plans them
                raise UsageError(
                    "WeightWatcher.analyze: start_ids and conv2d_norm apply to an nn.Module "
                    "or a state dict; a folder or hub id gives the audit's rows"
                )
            frame = self._audit(str(model), settings, max_evals, max_N, layers)
        else:
            frame = self._analyze_layers(
                self._walk(model, start_ids, conv2d_norm), settings, max_evals, max_N, layers
            )
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
        max_evals: int,
        max_N: int,
        layers: Sequence[int | str],
    ) -> pd.DataFrame:
        pd = _pandas()
        keep = _filter(layers)
        chosen = [
            layer
            for layer in walked
            if keep(layer)
            and settings.min_evals <= layer.m * layer.rf <= max_evals
            and layer.n <= max_N
        ]
        single = [layer for layer in chosen if layer.rf == 1]
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
        max_evals: int,
        max_N: int,
        layers: Sequence[int | str],
    ) -> pd.DataFrame:
        from .api import audit

        with tempfile.TemporaryDirectory(prefix="llm-audit-ww-") as tmp:
            report = audit(
                reference,
                Path(tmp) / "report",
                seed=settings.seed,
                randomize=settings.randomize,
                min_evals=settings.min_evals,
                backend=settings.backend,
            )
            frame = report.to_pandas()
        frame.insert(0, "layer_id", np.arange(1, len(frame) + 1))
        frame.insert(1, "name", frame["matrix"])
        frame.insert(2, "longname", frame["matrix"])
        frame.insert(3, "layer_type", frame["kind"])
        frame.insert(4, "rf", 1)
        keep = _filter(layers)
        mask = [
            keep(_Layer(int(r.layer_id), r.name, r.longname, r.layer_type, [], 1))
            and (r.M is None or np.isnan(r.M) or r.M <= max_evals)
            and (r.N is None or np.isnan(r.N) or r.N <= max_N)
            for r in frame.itertuples()
        ]
        return _ordered(frame[mask].reset_index(drop=True))

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


def _ww_columns(row: dict[str, Any]) -> dict[str, Any]:
    """Our row plus the WeightWatcher columns that follow from it."""
    out = dict(row)
    lam = row.get("lambda_max")
    out["has_esd"] = lam is not None
    out["sv_max"] = float(np.sqrt(lam)) if lam is not None else None
    out["spectral_norm"] = lam
    out["num_traps"] = row.get("rand_num_spikes")
    return out


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """WeightWatcher's lead columns first, then the rest as they come."""
    lead = [c for c in _LEAD if c in frame.columns]
    return frame[lead + [c for c in frame.columns if c not in lead]]
