"""`llm-audit report html`: one self-contained, offline HTML file for a report folder.

Why one file: a report is passed around (CI artifact, e-mail, a ticket) and opened from
disk, so the page carries its data, script and style inline and fetches nothing — its
Content-Security-Policy (`default-src 'none'`, the inline script and style allowed by
hash) makes that a guarantee, and also blocks inline event handlers should a hostile
tensor name ever reach the markup.

Why compact spectra: gpt-oss-120b has 9,398 matrices of up to 2,880 eigenvalues each,
twice (W and its shuffle); all of them would be hundreds of MB. Per matrix the page gets
a log-spaced histogram of each spectrum (`[lo, hi, nonpositive, counts]`, bins equal on a
log axis between the smallest positive and the largest eigenvalue), its `TOP` largest
eigenvalues (the power-law tail's end, the spikes), the trap eigenvalues and the entries
behind them (at most `MAX_TRAPS`). With `alpha`, `xmin`, `sigma_mp` and the bulk edges
from the row that redraws the fits faithfully. Spectra sit in their own JSON block that
the page parses only on the first drill-down, so the table appears without it.

Why the escaping: tensor names come from untrusted checkpoints. Data goes into
`<script type="application/json">` blocks with `<`, `>`, `&`, U+2028 and U+2029 written
as `\\uXXXX`, so no name can close the block; the page's script puts every string into
the DOM as text, never as markup; what Python writes into markup is `html.escape`d.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import __version__
from ..errors import AuditError, ReportError
from ..files import output_path, write_atomic
from ..inputs import first_line
from ..spectral.analyze import traps_per_shuffle
from ..spectral.columns import OVER_TRAINED, UNDER_TRAINED
from .diff import COMPARED, diff_reports
from .reader import Report, check_spectra, load_report
from .schema import LAYERS_SCHEMA, REPORT_COLUMNS

TOP = 32  # largest eigenvalues kept per spectrum
MAX_TRAPS = 256  # trap eigenvalues and entries kept per matrix
MAX_BINS = 48
MIN_BINS = 8
TABLE_DIGITS = 6  # significant digits of the numbers in the table rows
SPECTRUM_DIGITS = 5  # ... and of the eigenvalues kept

_SCALAR_FIELDS = [f.name for f in LAYERS_SCHEMA if not pa.types.is_list(f.type)]
_JS_UNSAFE = {
    ord("<"): "\\u003c",
    ord(">"): "\\u003e",
    ord("&"): "\\u0026",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def script_json(data: Any) -> str:
    """JSON that is safe inside a <script> element: it cannot end it or break the script."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).translate(_JS_UNSAFE)


def _round(value: Any, digits: int) -> Any:
    """Floats to `digits` significant digits (None if not finite: JSON has no NaN)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    return value


def _values(values: np.ndarray) -> list[float]:
    return [float(f"{v:.{SPECTRUM_DIGITS}g}") for v in values.tolist()]


def histogram(values: np.ndarray) -> list[Any]:
    """`[lo, hi, nonpositive, counts]`: log-spaced bins over the positive eigenvalues."""
    positive = values[values > 0]
    if positive.size == 0:
        return [None, None, int(values.size), []]
    lo, hi = float(positive.min()), float(positive.max())
    if hi <= lo * (1 + 1e-9):  # one distinct value: give the single bin a width
        lo, hi = lo / 1.01, hi * 1.01
    bins = int(np.clip(2 * math.sqrt(positive.size), MIN_BINS, MAX_BINS))
    counts, _ = np.histogram(positive, np.geomspace(lo, hi, bins + 1))
    return [lo, hi, int(values.size - positive.size), counts.tolist()]


def compact_spectrum(
    evals: np.ndarray | None, rand_evals: np.ndarray | None, row: dict[str, Any]
) -> dict[str, Any]:
    """What the drill-down plots need of one matrix (see the module docstring)."""
    out: dict[str, Any] = {}
    for key, values in (("e", evals), ("r", rand_evals)):
        if values is not None and values.size:
            out[key] = histogram(values)
            out[f"t{key}"] = _values(np.sort(values)[::-1][:TOP])
    traps = row.get("trap_evals") or []
    if traps:
        out["traps"] = _values(np.asarray(traps[:MAX_TRAPS], dtype=np.float64))
    entries = row.get("trap_entries") or []
    if entries:
        out["entries"] = [
            [e["row"], e["col"], _round(e["value"], TABLE_DIGITS)] for e in entries[:MAX_TRAPS]
        ]
    return out


def _split(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """A list<double> column as one numpy array per row (None for a null list)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    parts = np.split(array.flatten().to_numpy(zero_copy_only=False), np.cumsum(lengths)[:-1])
    nulls = array.is_null().to_numpy(zero_copy_only=False)
    return [None if null else part for part, null in zip(parts, nulls, strict=True)]


def _read_spectra(path: Path) -> Iterator[tuple[str, np.ndarray | None, np.ndarray | None]]:
    """(matrix, evals, rand_evals), a few hundred rows at a time: bounded memory."""
    if not path.is_file():
        raise AuditError(f"{path.parent}: no spectra.parquet (not a finished report?)")
    try:  # pages are decoded batch by batch: a corrupt one is this file's error, named so
        for batch in pq.ParquetFile(path).iter_batches(
            batch_size=256, columns=["matrix", "evals", "rand_evals"]
        ):
            check_spectra(batch, path)
            yield from zip(
                batch.column("matrix").to_pylist(),
                _split(batch.column("evals")),
                _split(batch.column("rand_evals")),
                strict=True,
            )
    except (OSError, pa.ArrowException) as err:
        raise ReportError(f"{path}: unreadable rows ({first_line(err)})") from None


def _spectra(report: Report) -> list[dict[str, Any]]:
    index = {row["matrix"]: i for i, row in enumerate(report.rows)}
    out: list[dict[str, Any]] = [{} for _ in report.rows]
    for matrix, evals, rand_evals in _read_spectra(report.folder / "spectra.parquet"):
        i = index.get(matrix)
        if i is not None:
            out[i] = compact_spectrum(evals, rand_evals, report.rows[i])
    return out


def _compare(report: Report, base: Report) -> dict[str, Any]:
    """Changes from `base` to `report`, columns aligned with the report's rows."""
    changes = diff_reports(base, report)  # raises one line on different architectures
    index = {row["matrix"]: i for i, row in enumerate(report.rows)}
    by_matrix = {c["matrix"]: c for c in changes}
    ordered = [by_matrix[row["matrix"]] for row in report.rows]
    return {
        "label": f"{base.manifest.get('model', {}).get('reference', '?')} ({base.folder})",
        "order": [index[c["matrix"]] for c in changes],  # new traps first, as `diff`
        "base": {col: [_round(c[f"{col}_a"], TABLE_DIGITS) for c in ordered] for col in COMPARED},
        "delta": {col: [_round(c[f"d_{col}"], TABLE_DIGITS) for c in ordered] for col in COMPARED},
        "new_traps": [c["new_traps"] for c in ordered],
        "base_traps": [c["traps_a"] for c in ordered],
    }


def build_payload(report: Report, base: Report | None = None) -> dict[str, Any]:
    """The page's data: summary, table rows (column-wise) and, if `base`, the changes."""
    model = report.manifest.get("model", {})
    return {
        "meta": {
            "model": model.get("reference"),
            "tool_version": report.manifest.get("tool_version"),
            "seed": report.manifest.get("seed"),
            "status": report.manifest.get("status"),
            "finished": report.manifest.get("finished"),
            "report": str(report.folder),
            "rendered_by": f"llm-audit {__version__}",
        },
        "summary": report.summary,
        "columns": {name: meaning for name, (_, meaning) in REPORT_COLUMNS.items()},
        "rows": {
            name: [_round(row.get(name), TABLE_DIGITS) for row in report.rows]
            for name in _SCALAR_FIELDS
        }
        | {"traps": [traps_per_shuffle(r["rand_num_spikes"], r["num_evals"]) for r in report.rows]},
        "compare": _compare(report, base) if base is not None else None,
        "caps": {"top": TOP, "traps": MAX_TRAPS},
        "alpha_limits": [OVER_TRAINED, UNDER_TRAINED],
    }


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


def _hash(source: str) -> str:
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def render_html(report: Report, base: Report | None = None) -> str:
    """The whole page for `report` (compared with `base` if given)."""
    script, style = _asset("report.js"), _asset("report.css")
    csp = (
        f"default-src 'none'; script-src {_hash(script)}; style-src {_hash(style)}; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )
    model = report.manifest.get("model", {}).get("reference", "?")
    fields = {
        "csp": csp,
        "title": html.escape(f"llm-audit report: {model}"),
        "style": style,
        "script": script,
        "data": script_json(build_payload(report, base)),
        "spectra": script_json(_spectra(report)),
    }
    # one pass: text substituted in is never scanned for placeholders again
    return _PLACEHOLDER.sub(lambda m: fields[m.group(1)], _asset("report.html"))


def write_html_report(
    folder: str | Path, output: str | Path | None = None, compare: str | Path | None = None
) -> Path:
    """Write the HTML page of report `folder` to `output` (default `folder`/report.html)."""
    report = load_report(folder)
    base = load_report(compare) if compare is not None else None
    out = output_path(output or report.folder / "report.html", (".html", ".htm"), "HTML")
    page = render_html(report, base)
    write_atomic(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out
