"""Fuzz the report readers: `python benchmarks/fuzz_reports.py --cases 10000`.

A report folder is untrusted input (a CI artifact, a colleague's share). Each case is a
folder built by hypothesis from a valid report with its manifest, summary, layers and
spectra mutated: fields deleted or replaced by any JSON value (NaN, deep nesting, huge
integers), names with control, bidi and formula characters, columns of the wrong type or
missing, statuses unknown, files empty, truncated, missing or random bytes. On each,
`report show` (table and CSV), `check --junit`, `diff` (against itself and a valid
report) and `report html` must exit 0, 1 or 2; exit 2 must print exactly one line on
stderr; no output may hold a raw control character; a JUnit file written must parse.
Anything else — a traceback, a second line, an unparsable XML — fails the run (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import re
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llm_audit import cli as cli_module
from llm_audit.cli import main as cli
from llm_audit.report.schema import LAYERS_SCHEMA, SPECTRA_SCHEMA

_RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
NAME = st.text(
    alphabet=st.one_of(
        st.characters(blacklist_categories=("Cs",)),
        st.sampled_from("\x1b\x07\n\r\t\u202e\u2028=+-@\"'<>&"),
    ),
    max_size=24,
)
SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    NAME,
)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAME, inner, max_size=3),
    max_leaves=10,
)
FILE = st.sampled_from(["keep", "keep", "keep", "keep", "missing", "empty", "bytes", "cut"])


def _manifest() -> dict[str, Any]:
    return {
        "schema_version": "2",
        "tool": "llm-audit",
        "tool_version": "0",
        "model": {"reference": "fuzz", "files": []},
        "config": {},
        "seed": 0,
        "status": "complete",
        "finished": "2026-01-01T00:00:00+00:00",
    }


def _summary(n: int) -> dict[str, Any]:
    return {
        "matrices_planned": n,
        "matrices_in_report": n,
        "audited": n,
        "skipped": 0,
        "failed": 0,
        "matrices_with_traps": 0,
        "total_traps": 0,
        "mean_alpha_by_kind": {"linear": 3.0},
    }


@st.composite
def _json_file(draw: st.DrawFn, base: dict[str, Any]) -> Any:
    data: Any = dict(base)
    for key in draw(st.lists(st.sampled_from([*base, "model.reference", "extra"]), max_size=3)):
        if key == "model.reference" and isinstance(data.get("model"), dict):
            data["model"] = {**data["model"], "reference": draw(JSON)}
        elif draw(st.booleans()):
            data.pop(key, None)
        else:
            data[key] = draw(JSON)
    if draw(st.integers(0, 9)) == 9:
        data = draw(JSON)
    return data


FLOAT = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
INT = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))
COLUMN_VALUES = {
    "kind": st.one_of(st.none(), NAME),
    "status": st.one_of(st.sampled_from(["ok", "ok", "skipped", "error"]), NAME, st.none()),
    "error": st.one_of(st.none(), NAME),
    "N": INT,
    "M": INT,
    "layer": INT,
    "alpha": FLOAT,
    "rand_num_spikes": INT,
    "max_abs_entry": FLOAT,
    "entry_kurtosis": FLOAT,
    "trap_ratio": FLOAT,
    "trap_ratios": st.one_of(st.none(), st.lists(FLOAT, max_size=3)),
    "warning": st.one_of(st.none(), NAME),
}


@st.composite
def report_folder(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(0, 5))
    matrices = draw(st.lists(NAME, min_size=n, max_size=n))
    columns: dict[str, pa.Array] = {"matrix": pa.array(matrices, pa.string())}
    for name, values in COLUMN_VALUES.items():
        how = draw(st.sampled_from(["typed"] * 6 + ["missing", "string"]))
        if how == "missing":
            continue
        cells = [draw(values) for _ in range(n)]
        if how == "string":
            columns[name] = pa.array([None if c is None else str(c) for c in cells], pa.string())
        else:
            columns[name] = pa.array(cells, LAYERS_SCHEMA.field(name).type)
    if draw(st.integers(0, 4)) != 4:  # every other column, as the writer gives them
        for f in LAYERS_SCHEMA:
            columns.setdefault(f.name, pa.nulls(n, f.type))
    spectra = pa.table(
        {
            "matrix": pa.array(matrices, pa.string()),
            "evals": pa.array(
                [draw(st.one_of(st.none(), st.lists(FLOAT, max_size=6))) for _ in range(n)],
                SPECTRA_SCHEMA.field("evals").type,
            ),
            "rand_evals": pa.array([None] * n, SPECTRA_SCHEMA.field("rand_evals").type),
        }
    )
    return {
        "manifest": draw(_json_file(_manifest())),
        "summary": draw(_json_file(_summary(n))),
        "layers": pa.table(columns),
        "spectra": spectra,
        "files": {name: draw(FILE) for name in ("manifest", "summary", "layers", "spectra")},
        "noise": draw(st.binary(max_size=64)),
    }


def write_folder(case: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    payloads = {
        "manifest": ("manifest.json", json.dumps(case["manifest"]).encode()),
        "summary": ("summary.json", json.dumps(case["summary"]).encode()),
    }
    for key in ("layers", "spectra"):
        sink = pa.BufferOutputStream()
        pq.write_table(case[key], sink)
        payloads[key] = (f"{key}.parquet", sink.getvalue().to_pybytes())
    for key, (name, data) in payloads.items():
        how = case["files"][key]
        if how == "missing":
            continue
        if how == "empty":
            data = b""
        elif how == "bytes":
            data = case["noise"]
        elif how == "cut":
            data = data[: len(data) // 2]
        (folder / name).write_bytes(data)


def run_command(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli(argv)
    return code, out.getvalue(), err.getvalue()


def check_case(case: dict[str, Any], tmp: Path, valid: Path, outcomes: Counter) -> None:
    folder = tmp / "case"
    write_folder(case, folder)
    junit, page = tmp / "check.xml", tmp / "page.html"
    junit.unlink(missing_ok=True)
    commands = {
        "show": ["report", "show", str(folder)],
        "show-csv": ["report", "show", str(folder), "--format", "csv"],
        "check": ["check", str(folder), "--junit", str(junit)],
        "diff-self": ["diff", str(folder), str(folder)],
        "diff-valid": ["diff", str(valid), str(folder)],
        "html": ["report", "html", str(folder), "-o", str(page)],
    }
    for label, argv in commands.items():
        try:
            code, out, err = run_command(argv)
        except BaseException as exc:  # the point: nothing may escape
            raise AssertionError(f"{label} raised {type(exc).__name__}: {exc}") from exc
        if code not in (0, 1, 2):
            raise AssertionError(f"{label}: exit code {code}")
        if code == 2 and (len(err.splitlines()) != 1 or not err.startswith("llm-audit: error:")):
            raise AssertionError(f"{label}: exit 2 with stderr {err[:300]!r}")
        if code != 2 and err:
            raise AssertionError(f"{label}: exit {code} with stderr {err[:300]!r}")
        if label in ("show", "check", "diff-self") and _RAW_CONTROL.search(out + err):
            raise AssertionError(f"{label}: raw control character in {(out + err)[:300]!r}")
        if label == "check" and code != 2:
            ET.parse(junit)
        reason = re.sub(r"^llm-audit: error: \S*?: ", "", err.strip())[:48] if code == 2 else ""
        outcomes[f"{label} exit {code} {reason}".rstrip()] += 1


def valid_report(folder: Path) -> Path:
    rows = [{"matrix": "m0", "kind": "linear", "status": "ok", "alpha": 3.0, "N": 8, "M": 8}]
    layers = pa.Table.from_pylist(
        [{f.name: r.get(f.name) for f in LAYERS_SCHEMA} for r in rows], schema=LAYERS_SCHEMA
    )
    case = {
        "manifest": _manifest(),
        "summary": _summary(1),
        "layers": layers,
        "spectra": SPECTRA_SCHEMA.empty_table(),
        "files": dict.fromkeys(("manifest", "summary", "layers", "spectra"), "keep"),
        "noise": b"",
    }
    write_folder(case, folder)
    return folder


def main() -> int:
    # the CLI's parser, built once: argparse setup was 80% of a case's time
    cli_module.build_parser = functools.cache(cli_module.build_parser)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000, help="report folders to try")
    args = parser.parse_args()
    outcomes: Counter = Counter()
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        valid = valid_report(tmp / "valid")

        @settings(
            max_examples=args.cases,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=report_folder())
        def prop(case: dict[str, Any]) -> None:
            try:
                check_case(case, tmp, valid, outcomes)
            except AssertionError:
                failures.append(traceback.format_exc())
                raise

        start = time.perf_counter()
        try:
            prop()
        except AssertionError:
            print(failures[-1] if failures else "failed", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - start
    cases = sum(outcomes.values()) // 6
    print(
        f"{cases} report folders, 6 commands each, in {seconds:.1f} s "
        f"({cases / seconds:.0f} folders/s): exit codes 0/1/2 only, every error one line"
    )
    codes: Counter = Counter()
    for outcome, count in outcomes.items():
        codes[outcome.split(" exit ")[1][0]] += count
    print("command runs by exit code: " + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())))
    for outcome, count in outcomes.most_common(25):
        print(f"  {count:6d}  {outcome}")
    return 0 if not math.isnan(seconds) else 1


if __name__ == "__main__":
    sys.exit(main())
