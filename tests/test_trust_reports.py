"""Report folders from someone else, and a release gate nobody can fool (issue 13).

Every report here is crafted, as an attacker or a broken run would leave it, and written
with the real `ReportWriter`; no Ray is started.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llm_audit.cli import main
from llm_audit.errors import AuditError
from llm_audit.report.check import Rules, evaluate
from llm_audit.report.reader import MAX_ROWS, load_report
from llm_audit.report.schema import SPECTRA_SCHEMA
from llm_audit.report.writer import ReportWriter

from .conftest import write_rows

ESC_NAME = "model.layers.0.\x1b[2J\x1b]0;pwned\x07mlp\u202e.weight"


def _row(matrix: str, kind: str = "linear", **values) -> dict:
    row = {
        "matrix": matrix,
        "tensor": matrix,
        "kind": kind,
        "N": 64,
        "M": 32,
        "alpha": 3.0,
        "rand_num_spikes": 0,
        "trap_evals": [],
        "trap_ratios": [],
        "trap_ratio": 0.9,
        "max_abs_entry": 0.1,
        "entry_kurtosis": 0.0,
        "status": "ok",
        "evals": [1.0, 2.0],
        "rand_evals": [1.0, 2.0],
    }
    return row | values


def write_report(
    folder: Path, rows: list[dict], *, status: str = "complete", planned: int | None = None
) -> Path:
    """A report folder: rows as the real writer builds them, manifest and summary beside."""
    write_rows(folder, rows)
    manifest = {
        "schema_version": "2",
        "tool": "llm-audit",
        "tool_version": "test",
        "model": {"reference": "crafted", "files": []},
        "config": {},
        "seed": 0,
        "status": status,
    }
    summary = {
        "matrices_planned": len(rows) if planned is None else planned,
        "matrices_in_report": len(rows),
        "audited": len(rows),
        "skipped": 0,
        "failed": 0,
        "matrices_with_traps": 0,
        "total_traps": 0,
        "mean_alpha_by_kind": {},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _rules(tmp_path: Path, **rules) -> str:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return str(path)


def _one_line_exit_2(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


# --- check fails on unfinished reports ---------------------------------------------------


def test_check_fails_an_interrupted_report(tmp_path, capsys):
    rows = [_row(f"m{i}") for i in range(3)]
    folder = write_report(tmp_path / "r", rows, status="interrupted", planned=8)
    junit = tmp_path / "j.xml"
    rules = _rules(tmp_path, max_failed=0)
    assert main(["check", str(folder), "--rules", rules, "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert "FAIL report_complete: model: status is 'interrupted', not 'complete'" in out
    cases = ET.parse(junit).getroot().findall("testcase")
    assert [c.get("name") for c in cases if c.find("failure") is not None] == [
        "report_complete: model"
    ]


def test_check_fails_a_complete_report_missing_planned_matrices(tmp_path, capsys):
    folder = write_report(tmp_path / "r", [_row(f"m{i}") for i in range(3)], planned=8)
    assert main(["check", str(folder), "--rules", _rules(tmp_path, max_failed=0)]) == 1
    assert "report_complete: model: 3 matrices in the report, 8 planned" in capsys.readouterr().out
    folder = write_report(tmp_path / "ok", [_row(f"m{i}") for i in range(3)])
    assert main(["check", str(folder), "--rules", _rules(tmp_path, max_failed=0)]) == 0


# --- JUnit -----------------------------------------------------------------------------


def test_junit_counts_test_cases_and_agrees_with_itself(tmp_path):
    rows = [
        _row("a", rand_num_spikes=2, trap_evals=[9.0, 8.0], trap_ratios=[3.0, 1.05]),
        _row("b", rand_num_spikes=1, trap_evals=[9.0], trap_ratios=[1.1]),
        _row("c"),
    ]
    folder = write_report(tmp_path / "r", rows)
    junit = tmp_path / "j.xml"
    rules = _rules(tmp_path, max_traps_per_matrix=0, max_total_traps=10, max_failed=0)
    assert main(["check", str(folder), "--rules", rules, "--junit", str(junit)]) == 1
    suite = ET.parse(junit).getroot()
    cases = suite.findall("testcase")
    failing = [c for c in cases if c.find("failure") is not None]
    assert suite.get("tests") == str(len(cases)) == "5"  # complete, a, b, total, failed
    assert suite.get("failures") == str(len(failing)) == "2"
    assert {c.get("name") for c in failing} == {
        "max_traps_per_matrix: a",
        "max_traps_per_matrix: b",
    }


def test_min_trap_ratio_counts_only_strong_traps(tmp_path, capsys):
    rows = [
        _row("a", rand_num_spikes=2, trap_evals=[9.0, 8.0], trap_ratios=[3.0, 1.05]),
        _row("b", rand_num_spikes=1, trap_evals=[9.0], trap_ratios=[1.1]),
    ]
    folder = write_report(tmp_path / "r", rows)
    rules = _rules(tmp_path, max_traps_per_matrix=0, min_trap_ratio=2.0)
    assert main(["check", str(folder), "--rules", rules]) == 1
    out = capsys.readouterr().out
    assert "max_traps_per_matrix: a: 1 traps > 0" in out and ": b:" not in out
    loose = Rules({"max_total_traps": 0, "min_trap_ratio": 1.0})
    assert evaluate(load_report(folder), loose)[0].message == "3 traps > 0"
    strict = Rules({"max_total_traps": 0, "min_trap_ratio": 5.0})
    assert evaluate(load_report(folder), strict) == []


# --- check --baseline, diff's d_trap_ratio ----------------------------------------------


def test_baseline_regressions(tmp_path, capsys):
    old = write_report(
        tmp_path / "old",
        [
            _row("a"),
            _row("b", rand_num_spikes=1, trap_evals=[9.0], trap_ratios=[1.5], trap_ratio=1.5),
            _row("c", kind="q_proj", alpha=3.0),
            _row("d"),
        ],
    )
    new = write_report(
        tmp_path / "new",
        [
            _row("a", rand_num_spikes=1, trap_evals=[9.0], trap_ratios=[2.0], trap_ratio=2.0),
            _row("b", rand_num_spikes=3, trap_evals=[9.0] * 3, trap_ratios=[1.5] * 3),
            _row("c", kind="q_proj", alpha=4.0),
            _row("d", status="error", error="tensor 'd': NaN entries", alpha=None),
        ],
    )
    rules = _rules(tmp_path, max_alpha_drift_per_kind=0.5)
    junit = tmp_path / "j.xml"
    argv = ["check", str(new), "--rules", rules, "--baseline", str(old), "--junit", str(junit)]
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "FAIL baseline_new_traps: a: 0 traps in the baseline, 1 now" in out
    assert "baseline_new_traps: b" not in out  # b had traps already
    assert "FAIL baseline_newly_failed: d: ok in the baseline, error now: tensor 'd'" in out
    assert "FAIL max_alpha_drift_per_kind: q_proj: mean alpha 3.000 -> 4.000" in out
    assert "linear" not in out.split("max_alpha_drift_per_kind")[-1]
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "3"
    assert main(["check", str(old), "--rules", rules, "--baseline", str(old)]) == 0
    capsys.readouterr()
    other = write_report(tmp_path / "other", [_row("x")])
    _one_line_exit_2(capsys, ["check", str(new), "--baseline", str(other)], "different arch")
    assert main(["diff", str(old), str(new), "--format", "json"]) == 0
    by = {r["matrix"]: r for r in json.loads(capsys.readouterr().out)}
    assert by["a"]["d_trap_ratio"] == pytest.approx(1.1)


# --- hostile report folders -------------------------------------------------------------


def test_escape_sequences_in_names_never_reach_the_terminal_or_break_junit(tmp_path, capsys):
    rows = [_row(ESC_NAME, kind="k\x1b[31m", rand_num_spikes=1, trap_ratios=[2.0])]
    folder = write_report(tmp_path / "r", rows)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["model"]["reference"] = "evil\x1b]8;;http://x\x07\n"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["report", "show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "\\u202e" in out
    junit = tmp_path / "j.xml"
    assert main(["check", str(folder), "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and len([ln for ln in out.splitlines() if "PASSED" in ln]) == 0
    names = [c.get("name") for c in ET.parse(junit).getroot().iter("testcase")]
    assert any("\\x1b[2J" in n for n in names)


def test_csv_output_is_guarded_against_formulas(tmp_path, capsys):
    folder = write_report(tmp_path / "r", [_row('=HYPERLINK("http://x")', kind="@SUM(A1)")])
    assert main(["report", "show", str(folder), "--format", "csv"]) == 0
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["matrix"] == '\'=HYPERLINK("http://x")' and row["kind"] == "'@SUM(A1)"
    assert row["N"] == "64"


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        ("manifest.json", lambda m: m | {"model": "str"}, "model must be an object"),
        ("manifest.json", lambda m: m | {"status": 3}, "status must be a string"),
        ("manifest.json", lambda m: m | {"schema_version": "9"}, "schema_version must be"),
        ("manifest.json", lambda m: [m], "not a JSON object"),
        ("summary.json", lambda s: s | {"total_traps": float("nan")}, "unreadable (NaN is not"),
        ("summary.json", lambda s: s | {"audited": "3"}, "audited must be a non-negative"),
        ("summary.json", lambda s: s | {"mean_alpha_by_kind": []}, "mean_alpha_by_kind must"),
    ],
)
def test_bad_manifest_or_summary_is_one_line_for_every_reader(
    tmp_path, capsys, file, edit, message
):
    folder = write_report(tmp_path / "r", [_row("a")])
    path = folder / file
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    for argv in (
        ["report", "show", str(folder)],
        ["check", str(folder)],
        ["diff", str(folder), str(folder)],
        ["report", "html", str(folder), "-o", str(tmp_path / "x.html")],
    ):
        _one_line_exit_2(capsys, argv, message)


def test_deep_json_and_wrong_column_types_are_one_line(tmp_path, capsys):
    folder = write_report(tmp_path / "r", [_row("a")])
    (folder / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    _one_line_exit_2(capsys, ["check", str(folder)], "summary.json: ")
    folder = write_report(tmp_path / "t", [_row("a")])
    table = pq.read_table(folder / "layers.parquet")
    index = table.schema.get_field_index("alpha")
    table = table.set_column(index, "alpha", pa.array(["3.0"]))
    pq.write_table(table, folder / "layers.parquet")
    _one_line_exit_2(capsys, ["report", "show", str(folder)], "column 'alpha' is string")


def test_two_million_rows_are_refused_from_the_footer(tmp_path, capsys):
    folder = write_report(tmp_path / "r", [_row("a")])
    rows = 2_000_000
    assert rows > MAX_ROWS
    table = pa.table({"matrix": pa.array(["x"] * rows), "status": pa.array(["ok"] * rows)})
    pq.write_table(table, folder / "layers.parquet", compression="zstd")
    assert (folder / "layers.parquet").stat().st_size < 200_000
    t0 = time.perf_counter()
    _one_line_exit_2(capsys, ["check", str(folder)], "2000000 rows, more than 500000")
    assert time.perf_counter() - t0 < 2.0


def test_an_unreadable_layers_file_is_one_line(tmp_path, capsys):
    folder = write_report(tmp_path / "r", [_row("a")])
    (folder / "layers.parquet").write_bytes(b"")
    _one_line_exit_2(capsys, ["report", "show", str(folder)], "not a readable Parquet file")


def test_resume_redoes_rows_no_audit_writes(tmp_path, capsys):
    """--resume keeps what was computed, but not a table holding what no audit writes (a
    NaN alpha someone edited in): kept, it went into summary.json as NaN, which every
    reader then refused. Its matrices are redone, and the report is whole again."""
    folder = tmp_path / "r"
    write_rows(folder, [_row("a", alpha=float("nan")), _row("b")])
    writer = ReportWriter(folder)
    writer.add([_row("c")])
    assert writer.done() == {"c"}
    assert "layers.parquet (column 'alpha' holds NaN" in capsys.readouterr().err
    writer.add([_row("a"), _row("b")])
    table = writer.finalize(["a", "b", "c"])
    assert table["matrix"].to_pylist() == ["a", "b", "c"]
    assert table["alpha"].to_pylist() == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("name", ["manifest.json", "summary.json", "spectra.parquet"])
@pytest.mark.parametrize("special", ["fifo", "dev-zero"])
def test_fifos_and_devices_in_a_report_are_refused_not_read(name, special, tmp_path, capsys):
    """A FIFO hung every reader and /dev/zero filled memory: both have size 0, so the
    size caps did not see them, and tar keeps both in a shared report artifact."""
    folder = write_report(tmp_path / "r", [_row("a")])
    (folder / name).unlink()
    if special == "fifo":
        os.mkfifo(folder / name)
    else:
        (folder / name).symlink_to("/dev/zero")
    for argv in (["report", "show"], ["check"]):
        _one_line_exit_2(capsys, [*argv, str(folder)], f"{folder / name}: not a regular file")


@pytest.mark.parametrize("what", ["rules", "config"])
def test_a_fifo_as_rules_or_config_is_refused(what, tmp_path):
    from llm_audit.report.check import load_rules
    from llm_audit.run.config import load_config

    fifo = tmp_path / "x.yaml"
    os.mkfifo(fifo)
    with pytest.raises(AuditError, match=r"x\.yaml: not a regular file"):
        (load_rules if what == "rules" else load_config)(fifo)


def test_the_counts_shown_are_the_rows_not_summary_json(tmp_path, capsys):
    """summary.json edited to `total_traps: 0` headlined "traps 0" above rows with traps
    (show, the HTML page's card) while check, counting from the rows, failed the gate."""
    rows = [_row("a", rand_num_spikes=2, num_evals=200), _row("b"), _row("c", status="error")]
    folder = write_report(tmp_path / "r", rows)
    summary = json.loads((folder / "summary.json").read_text())
    summary |= {"total_traps": 0, "matrices_with_traps": 0, "matrices_in_report": 10}
    (folder / "summary.json").write_text(json.dumps(summary))
    counts = load_report(folder).summary
    assert (counts["total_traps"], counts["matrices_with_traps"]) == (2, 1)
    assert (counts["matrices_in_report"], counts["audited"], counts["failed"]) == (3, 2, 1)
    assert main(["report", "show", str(folder)]) == 0
    assert "matrices 3 (audited 2, skipped 0, failed 1); traps 2 in 1 matrices" in (
        capsys.readouterr().out
    )


def test_corrupt_spectra_pages_name_the_file(tmp_path, capsys):
    """A spectra.parquet whose footer is intact and pages are not: decoded only when the
    page reads it, and the error named no file."""
    rng = np.random.default_rng(0)
    rows = [_row(f"m{i}", evals=rng.random(600).round(2).tolist()) for i in range(20)]
    folder = write_report(tmp_path / "r", rows)
    raw = bytearray((folder / "spectra.parquet").read_bytes())
    for i in range(200, len(raw) - 4000, 97):
        raw[i] ^= 0xFF
    (folder / "spectra.parquet").write_bytes(bytes(raw))
    out = tmp_path / "r.html"
    _one_line_exit_2(capsys, ["report", "html", str(folder), "-o", str(out)], "spectra.parquet")


# --- safe YAML ----------------------------------------------------------------------------

BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
)


def test_alias_bombs_are_refused_as_rules_and_as_config(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB + "\n")
    assert len(BOMB) < 1000
    folder = write_report(tmp_path / "r", [_row("a")])
    for argv in (
        ["check", str(folder), "--rules", str(bomb)],
        ["audit", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--config", str(bomb)],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "llm_audit.cli", *argv], capture_output=True, text=True
        )
        assert proc.returncode == 2 and len(proc.stderr) < 300, proc.stderr[:300]
        assert "aliases (*name) are not accepted" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_long_values_in_messages_are_capped(tmp_path):
    from llm_audit.run.config import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: '" + "x" * 100_000 + "'\n")
    with pytest.raises(AuditError) as err:
        load_config(bad)
    assert len(str(err.value)) < 300
    bad.write_text(("x" * 100_000) + ": 1\n")
    with pytest.raises(AuditError) as err:
        load_config(bad)
    assert len(str(err.value)) < 400


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: " + "9" * 5000, "not valid YAML (Exceeds the limit"),
        ("gpus_per_task: 1" + "0" * 400, "gpus_per_task must be a fraction below 1 or"),
        ("1: a\nfoo: b\n", "unknown key(s) '1, foo'"),
        ("kinds: [{pattern: x, kind: q_proj, 1: a, foo: b}]", "kinds[0]: unknown key(s)"),
        ("max_retries: 1:30", "max_retries must be a non-negative integer, got '1:30'"),
    ],
    ids=["5000-digits", "huge-gpus", "number-key", "number-key-in-kinds", "base-60"],
)
def test_odd_yaml_values_give_one_line_not_a_traceback(text, message, tmp_path):
    from llm_audit.run.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(AuditError) as err:
        load_config(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value), err.value
    assert len(str(err.value).splitlines()) == 1


def test_yaml_integers_are_decimal_as_written(tmp_path, capsys):
    """YAML 1.1 reads `010` as 8 (octal): a gate `max_total_traps: 010` allowed 8, not the
    10 its author wrote. Integers are decimal, as YAML 1.2 reads them."""
    rows = [_row(f"m{i}", rand_num_spikes=1, trap_evals=[9.0], trap_ratios=[2.0]) for i in range(9)]
    folder = write_report(tmp_path / "r", rows)
    assert main(["check", str(folder), "--rules", _rules(tmp_path, max_total_traps=8)]) == 1
    (tmp_path / "rules.yaml").write_text("max_total_traps: 010\n")
    assert main(["check", str(folder), "--rules", str(tmp_path / "rules.yaml")]) == 0
    capsys.readouterr()


# --- durable writes -----------------------------------------------------------------------


def test_writes_are_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    from llm_audit import files

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "summary.json"
    files.write_json(target, {"a": 1})
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert events[0][1].endswith(".tmp") and events[2][1] == str(tmp_path)
    assert json.loads(target.read_text()) == {"a": 1}


def test_nan_or_infinite_numbers_are_refused(tmp_path, capsys):
    from llm_audit.report.reader import check_spectra

    folder = write_report(tmp_path / "r", [_row("a", alpha=float("nan"))])
    _one_line_exit_2(capsys, ["check", str(folder)], "column 'alpha' holds NaN, out-of-range")
    folder = write_report(tmp_path / "l", [_row("a", trap_ratios=[1.0, float("inf")])])
    _one_line_exit_2(capsys, ["report", "show", str(folder)], "column 'trap_ratios' holds NaN")
    folder = write_report(tmp_path / "big", [_row("a", alpha=1.7976931348623157e308)])
    _one_line_exit_2(capsys, ["report", "html", str(folder)], "'alpha' holds NaN, out-of-range")
    folder = write_report(tmp_path / "s", [_row("a")])
    (folder / "summary.json").write_text(
        (folder / "summary.json")
        .read_text()
        .replace('"mean_alpha_by_kind": {}', '"x": 1e999, "mean_alpha_by_kind": {}')
    )
    _one_line_exit_2(capsys, ["check", str(folder)], "1e999 is out of range")
    batch = pa.RecordBatch.from_pylist(
        [{"matrix": "a", "evals": [1.0, float("nan")], "rand_evals": None}], schema=SPECTRA_SCHEMA
    )
    with pytest.raises(AuditError, match="evals holds NaN, null or out-of-range values"):
        check_spectra(batch, folder / "spectra.parquet")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("trap_entries", [{"row": 1, "col": 2, "value": float("nan")}]),
        ("trap_entries", [{"row": 1, "col": 2, "value": None}]),
        ("trap_entries", [None]),
        ("trap_evals", [None, 2.0]),
        ("evals", [1.0, None]),
    ],
    ids=["nan-entry", "null-value", "null-entry", "null-trap-eval", "null-eval"],
)
def test_holes_and_nan_inside_lists_are_refused(column, value, tmp_path, capsys):
    """A NaN in a trap entry (printed as bare NaN by `show --format json`, not JSON) or a
    null inside a list (the HTML page crashed on it) is no row we write: every reader
    refuses it in one line."""
    from llm_audit.report.reader import check_spectra

    folder = write_report(tmp_path / "r", [_row("a", **{column: value})])
    if column == "evals":  # spectra.parquet, read in batches by the HTML page
        batch = pa.RecordBatch.from_pylist(
            [{"matrix": "a", "evals": value, "rand_evals": None}], schema=SPECTRA_SCHEMA
        )
        with pytest.raises(AuditError, match="evals holds NaN, null or out-of-range"):
            check_spectra(batch, folder / "spectra.parquet")
        return
    for argv in (["report", "show"], ["check"], ["report", "html"]):
        _one_line_exit_2(capsys, [*argv, str(folder)], f"column {column!r} holds NaN")


def test_parquet_written_by_another_schema_version_is_refused(tmp_path, capsys):
    """Each Parquet file names the schema it was written with; a manifest saying 2 over a
    table written as 3 (or 1) is not one report."""
    folder = write_report(tmp_path / "r", [_row("a")])
    table = pq.read_table(folder / "layers.parquet")
    table = table.replace_schema_metadata({b"llm_audit_schema": b"3"})
    pq.write_table(table, folder / "layers.parquet")
    _one_line_exit_2(
        capsys, ["check", str(folder)], "written as schema version '3', but manifest.json says '2'"
    )


def test_a_column_given_twice_is_refused(tmp_path, capsys):
    folder = write_report(tmp_path / "r", [_row("a")])
    table = pq.read_table(folder / "layers.parquet")
    pq.write_table(table.append_column("alpha", table["alpha"]), folder / "layers.parquet")
    for argv in (["report", "show"], ["check"], ["diff", str(folder)]):
        _one_line_exit_2(capsys, [*argv, str(folder)], "column 'alpha' appears more than once")


def test_csv_output_escapes_what_would_drive_a_terminal(tmp_path, capsys):
    folder = write_report(tmp_path / "r", [_row(ESC_NAME, kind="k\x1b[31m")])
    for argv in (["report", "show"], ["diff", str(folder)]):
        assert main([*argv, str(folder), "--format", "csv"]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, argv
    assert main(["report", "show", str(folder), "--format", "csv"]) == 0
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["matrix"] == "model.layers.0.\\x1b[2J\\x1b]0;pwned\\x07mlp\\u202e.weight"


def test_outputs_never_replace_a_reports_own_files_or_anything_else(tmp_path, capsys):
    """`-o` and `--junit` name where a new page goes: a report's manifest, its layers
    table or a checkpoint shard is not one, and is left as it was (exit 2, one line)."""
    folder = write_report(tmp_path / "r", [_row("a")])
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"weights")
    before = {p: p.read_bytes() for p in (folder / "manifest.json", folder / "layers.parquet")}
    for target in (folder / "manifest.json", shard):
        _one_line_exit_2(capsys, ["report", "html", str(folder), "-o", str(target)], "refusing")
    _one_line_exit_2(
        capsys, ["check", str(folder), "--junit", str(folder / "layers.parquet")], "refusing"
    )
    _one_line_exit_2(
        capsys, ["check", str(folder), "--junit", str(tmp_path / "no" / "j.xml")], "no such folder"
    )
    assert {p: p.read_bytes() for p in before} == before and shard.read_bytes() == b"weights"
    assert main(["report", "html", str(folder), "-o", str(tmp_path / "page.html")]) == 0
    assert main(["check", str(folder), "--junit", str(tmp_path / "j.xml")]) == 0


def test_a_kind_typo_in_max_traps_per_kind_fails_the_gate(tmp_path, capsys):
    rows = [
        _row("a.experts.0.down_proj", kind="expert_down", rand_num_spikes=4, trap_ratios=[2.0] * 4)
    ]
    folder = write_report(tmp_path / "r", rows)
    typo = _rules(tmp_path, max_traps_per_kind={"expert_dwn": 0})
    assert main(["check", str(folder), "--rules", typo]) == 1
    assert "FAIL max_traps_per_kind: expert_dwn: no matrix has this kind" in capsys.readouterr().out
    # a known kind the model lacks (a shared rules file) checks nothing, and passes
    shared = _rules(tmp_path, max_traps_per_kind={"router": 0})
    assert main(["check", str(folder), "--rules", shared]) == 0


def test_yaml_exponent_numbers_are_numbers(tmp_path, capsys):
    """YAML 1.1 reads `1e9` as text: a threshold written so is the number meant."""
    folder = write_report(tmp_path / "r", [_row("a", rand_num_spikes=1, trap_ratios=[1.5])])
    path = tmp_path / "rules.yaml"
    path.write_text("min_trap_ratio: 2e0\nmax_total_traps: 0\n")
    assert main(["check", str(folder), "--rules", str(path)]) == 0  # the trap is below 2.0
    path.write_text("min_trap_ratio: 1e0\nmax_total_traps: 0\n")
    assert main(["check", str(folder), "--rules", str(path)]) == 1
