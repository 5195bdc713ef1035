"""`llm-audit check` (release gate) and `llm-audit report show` on a real report."""

from __future__ import annotations

import csv
import io
import json
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from llm_audit.cli import main
from llm_audit.report.check import DEFAULT_RULES, trap_count
from llm_audit.run.audit import run_audit
from llm_audit.run.config import AuditConfig
from llm_audit.source.synth import write_bundled_model
from llm_audit.spectral.analyze import analyze_matrix

from .test_trust_reports import _row, write_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("checked")
    model = write_bundled_model(base / "model")
    out = base / "report"
    run_audit(str(model), out, AuditConfig(), quiet=True)
    return out


def _rules(tmp_path: Path, **rules) -> str:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return str(path)


def test_default_rules_file_is_the_built_in_default():
    assert yaml.safe_load((ROOT / "configs" / "release-check.yaml").read_text()) == DEFAULT_RULES


def test_pass(report, tmp_path, capsys):
    rules = _rules(
        tmp_path,
        max_traps_per_matrix=4,
        max_total_traps=9,
        max_failed=0,
        alpha_range=[1.0, 40.0],
        max_share_alpha_outside=0.0,
    )
    junit = tmp_path / "junit.xml"
    assert main(["check", str(report), "--rules", rules, "--junit", str(junit)]) == 0
    assert "PASSED" in capsys.readouterr().out
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "5" and suite.get("failures") == "0"


def test_check_verdict_as_json(report, tmp_path, capsys):
    rules = _rules(tmp_path, max_traps_per_matrix=3)
    assert main(["check", str(report), "--rules", rules, "--format", "json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["verdict"] == "FAILED" and verdict["matrices"] == 44
    assert [(v["rule"], v["subject"]) for v in verdict["violations"]] == [
        ("max_traps_per_matrix", "model.layers.1.mlp.experts.down_proj[5]")
    ]


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (
            {"max_traps_per_matrix": 3},
            "max_traps_per_matrix: model.layers.1.mlp.experts.down_proj[5]: 4 traps > 3",
        ),
        ({"max_traps_per_kind": {"o_proj": 2}}, "max_traps_per_kind: o_proj: 3 traps > 2"),
        ({"max_total_traps": 8}, "max_total_traps: model: 9 traps > 8"),
        (
            {"alpha_range": [2.0, 6.0], "max_share_alpha_outside": 0.1},
            "max_share_alpha_outside: model: 23 of 44 matrices (52.3%) have alpha outside",
        ),
    ],
)
def test_each_violation(report, tmp_path, capsys, rules, expected):
    junit = tmp_path / "junit.xml"
    assert (
        main(["check", str(report), "--rules", _rules(tmp_path, **rules), "--junit", str(junit)])
        == 1
    )
    out = capsys.readouterr().out
    assert f"FAIL {expected}" in out and "FAILED" in out
    failures = ET.parse(junit).getroot().findall(".//failure")
    assert failures and expected.split(": ", 1)[1] in failures[0].get("message")


def test_failed_matrices(report, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("manifest.json", "summary.json", "spectra.parquet"):
        (broken / name).write_bytes((report / name).read_bytes())
    table = pq.read_table(report / "layers.parquet")
    status = table["status"].to_pylist()
    error = table["error"].to_pylist()
    status[5], error[5] = "error", "tensor 'x': MXFP4 scale byte 255"
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(error))
    pq.write_table(table, broken / "layers.parquet")
    assert main(["check", str(broken), "--rules", _rules(tmp_path, max_failed=0)]) == 1
    assert "1 matrices failed > 0; first:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_trap: 1\n", "unknown rule 'max_trap'"),
        ("max_total_traps: -1\n", "must be a non-negative integer"),
        ("alpha_range: [6, 2]\n", "low < high"),
        ("max_share_alpha_outside: 2\n", "share between 0 and 1"),
        ("[1, 2]\n", "mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_malformed_rules_exit_2(report, tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["check", str(report), "--rules", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_not_a_report_exit_2(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 2
    assert "not a report folder" in capsys.readouterr().err


def test_report_show(report, capsys):
    assert (
        main(
            [
                "report",
                "show",
                str(report),
                "--where",
                "rand_num_spikes > 0",
                "--sort",
                "rand_num_spikes",
                "--desc",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "traps 9 in 3 matrices; showing 3" in out
    lines = out.splitlines()
    assert "down_proj[5]" in lines[3] and "gate_up_proj[2]" in lines[5]
    assert main(["report", "show", str(report), "--kind", "router", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["kind"] for r in rows] == ["router", "router"]
    assert main(["report", "show", str(report), "--top", "2", "--format", "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2
    assert main(["report", "show", str(report), "--where", "alpha >> 3"]) == 2
    assert main(["report", "show", str(report), "--sort", "nope"]) == 2


def test_diff_same_architecture_puts_new_traps_first(report, tmp_path, capsys):
    from llm_audit.source.synth import SynthConfig, synth_gpt_oss

    tuned = synth_gpt_oss(
        tmp_path / "tuned",
        SynthConfig(
            seed=2026,
            traps={
                "model.layers.0.mlp.experts.down_proj[1]": 5,
                "model.layers.1.self_attn.o_proj.weight": 3,
            },
        ),
    )
    run_audit(str(tuned), tmp_path / "b", AuditConfig(), quiet=True)
    assert main(["diff", str(report), str(tmp_path / "b"), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 44
    assert rows[0]["matrix"] == "model.layers.0.mlp.experts.down_proj[1]"
    assert rows[0]["new_traps"] == 5 and rows[0]["rand_num_spikes_a"] == 0
    o_proj = next(r for r in rows if r["matrix"] == "model.layers.1.self_attn.o_proj.weight")
    assert o_proj["new_traps"] == 0 and o_proj["d_alpha"] == pytest.approx(0.0, abs=1e-12)
    gone = next(r for r in rows if r["matrix"] == "model.layers.1.mlp.experts.down_proj[5]")
    assert gone["rand_num_spikes_a"] == 4 and gone["rand_num_spikes_b"] == 0
    assert main(["diff", str(report), str(tmp_path / "b")]) == 0
    assert "5 new traps in 1 matrices" in capsys.readouterr().out


def test_diff_refuses_different_architectures(report, tmp_path, capsys):
    from llm_audit.source.synth import SynthConfig, synth_gpt_oss

    other = synth_gpt_oss(tmp_path / "other", SynthConfig(layers=1))
    run_audit(str(other), tmp_path / "o", AuditConfig(), quiet=True)
    assert main(["diff", str(report), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "different architectures" in err and len(err.strip().splitlines()) == 1


def test_check_fails_a_report_that_audited_nothing(tmp_path, capsys):
    model = tmp_path / "empty"
    model.mkdir()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")  # no tensor
    out = tmp_path / "report"
    run_audit(str(model), out, AuditConfig(), quiet=True)
    junit = tmp_path / "junit.xml"
    no_rules = _rules(tmp_path)  # an empty rules file: the precondition is not a rule
    for rules in ([], ["--rules", no_rules]):
        assert main(["check", str(out), *rules, "--junit", str(junit)]) == 1
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith(f"FAIL report_complete: model: {out}: no matrix audited: ")
        assert "0 matrices planned" in lines[0] and f"llm-audit plan {model}" in lines[0]
        assert lines[1].startswith(f"FAILED: {model}: ") and lines[1].endswith(", 0 matrices")
        failing = [c for c in ET.parse(junit).getroot() if c.find("failure") is not None]
        assert [c.get("name") for c in failing] == ["report_complete: model"]
    assert main(["check", str(out), "--format", "json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["verdict"] == "FAILED"
    assert [(v["rule"], v["subject"]) for v in verdict["violations"]] == [
        ("report_complete", "model")
    ]


def test_check_fails_when_every_matrix_was_skipped_or_failed(tmp_path, capsys):
    rows = [
        _row("a", status="skipped", reason="all entries are zero", alpha=None),
        _row("b", status="error", error="tensor 'b': NaN entries", alpha=None),
        _row("c", status="skipped", reason="all entries are zero", alpha=None),
    ]
    folder = write_report(tmp_path / "r", rows)
    assert main(["check", str(folder), "--rules", _rules(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        f"FAIL report_complete: model: {folder}: no matrix audited: 0 of 3 matrices ok "
        "(2 skipped, 1 failed); first: b: tensor 'b': NaN entries"
    ) in out
    rows[2] = _row("c")  # one audited matrix is enough to pass the precondition
    assert (
        main(["check", str(write_report(tmp_path / "one", rows)), "--rules", _rules(tmp_path)]) == 0
    )
    capsys.readouterr()


def test_check_fails_against_a_baseline_that_audited_nothing(tmp_path, capsys):
    new = write_report(tmp_path / "new", [_row("a", alpha=3.0), _row("b", alpha=3.0)])
    old = write_report(
        tmp_path / "old",
        [_row(m, status="skipped", reason="all entries are zero", alpha=None) for m in "ab"],
    )
    rules = _rules(tmp_path, max_alpha_drift_per_kind=0.5)  # vacuous without a baseline alpha
    junit = tmp_path / "junit.xml"
    assert (
        main(["check", str(new), "--rules", rules, "--baseline", str(old), "--junit", str(junit)])
        == 1
    )
    out = capsys.readouterr().out
    assert f"FAIL report_complete: baseline: {old}: no matrix audited: 0 of 2 matrices ok" in out
    assert "report_complete: model" not in out
    failing = [c for c in ET.parse(junit).getroot() if c.find("failure") is not None]
    assert [c.get("name") for c in failing] == ["report_complete: baseline"]
    assert main(["check", str(new), "--rules", rules, "--baseline", str(new)]) == 0
    capsys.readouterr()


def test_the_gate_counts_traps_per_shuffle():
    """One planted entry: a trap per shuffle. Below 100 eigenvalues WeightWatcher's
    rand_num_spikes pools 5 shuffles (5 traps for a 32-expert router); the gate counts
    1, the number of entries behind the trap, above 100 as below."""
    for shape in ((256, 32), (256, 128)):
        w = np.random.default_rng(2).standard_normal(shape)
        w[7, 3] = 40.0
        row = analyze_matrix(w, matrix_id=str(shape))
        pooled = 5 if shape[1] < 100 else 1
        assert row["rand_num_spikes"] == len(row["trap_ratios"]) == pooled
        assert trap_count(row, None) == trap_count(row, 1.5) == len(row["trap_entries"]) == 1
        assert trap_count(row, 1e9) == 0


def test_every_command_counts_traps_as_the_gate_does(tmp_path, capsys):
    """A router of 32 experts (32 eigenvalues: rand_num_spikes pools 5 shuffles) and a
    256x128 matrix, one planted entry each: the audit's summary, report show, diff and
    the HTML page count 1 trap each, 2 in all, as check does (they said 6)."""
    from safetensors.numpy import save_file

    from llm_audit.report.diff import diff_reports
    from llm_audit.report.html import build_payload
    from llm_audit.report.reader import load_report

    rng = np.random.default_rng(2)
    weights = {
        "layers.0.mlp.router.weight": rng.standard_normal((32, 256), np.float32),
        "layers.0.mlp.up_proj.weight": rng.standard_normal((256, 128), np.float32),
    }
    for w in weights.values():
        w[7, 3] = 40.0
    (tmp_path / "m").mkdir()
    save_file(weights, str(tmp_path / "m" / "model.safetensors"))
    out = tmp_path / "report"
    assert main(["audit", str(tmp_path / "m"), "--out", str(out), "--quiet"]) == 0
    assert "correlation traps: 2 in 2 matrices" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["total_traps"], summary["matrices_with_traps"]) == (2, 2)
    report = load_report(out)
    assert [r["rand_num_spikes"] for r in report.rows] == [5, 1]  # WeightWatcher's, kept
    assert build_payload(report)["rows"]["traps"] == [1, 1]
    assert main(["report", "show", str(out)]) == 0
    assert "traps 2 in 2 matrices" in capsys.readouterr().out
    assert main(["check", str(out), "--rules", _rules(tmp_path, max_total_traps=1)]) == 1
    assert "2 traps > 1" in capsys.readouterr().out
    clean = [
        _row(r["matrix"], r["kind"], N=r["N"], M=r["M"], num_evals=r["num_evals"])
        for r in report.rows
    ]
    base = load_report(write_report(tmp_path / "base", clean))
    assert [c["new_traps"] for c in diff_reports(base, report)] == [1, 1]
    assert build_payload(report, base)["compare"]["base_traps"] == [0, 0]
    # a baseline's pooled count is divided by the baseline's own shuffles, also where the
    # matrix failed in the new report (its num_evals null)
    trapped = [_row(r["matrix"], r["kind"], N=r["N"], M=r["M"], num_evals=r["num_evals"],
                    rand_num_spikes=r["rand_num_spikes"]) for r in report.rows]  # fmt: skip
    failed = [_row(r["matrix"], r["kind"], N=r["N"], M=r["M"], status="error", num_evals=None,
                   rand_num_spikes=None, alpha=None) for r in report.rows]  # fmt: skip
    base = load_report(write_report(tmp_path / "trapped", trapped))
    now = load_report(write_report(tmp_path / "failed", failed))
    assert build_payload(now, base)["compare"]["base_traps"] == [1, 1]


def test_weights_the_plan_leaves_out_are_in_the_summary_and_shown(tmp_path, capsys):
    """A weight the plan cannot read (here a 3-D stack of an unknown layout) is not a
    matrix of the report, so 'skipped 0' alone would hide it: summary.json counts every
    tensor left out by reason, and the weights among them (not the vectors) are shown."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    model = tmp_path / "m"
    model.mkdir()
    save_file(
        {
            "layers.0.mlp.up_proj.weight": rng.standard_normal((64, 32), np.float32),
            "layers.0.mlp.mystery.weight": rng.standard_normal((4, 64, 32), np.float32),
            "layers.0.norm.weight": np.ones(32, np.float32),
        },
        str(model / "model.safetensors"),
    )
    out = tmp_path / "report"
    assert main(["audit", str(model), "--out", str(out), "--quiet"]) == 0
    reason = "3-D tensor of shape [4, 64, 32] is not a known layout"
    printed = capsys.readouterr().out
    assert f"weights not audited: 1 tensors (1: {reason}); `llm-audit plan` lists each" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights_not_planned"] == {reason: 1}
    assert summary["not_planned"] == {reason: 1, "norm (vector)": 1}
    assert main(["report", "show", str(out)]) == 0
    heading = capsys.readouterr().out.splitlines()
    assert heading[2] == f"weights not audited: 1 tensors (1: {reason})"


def test_the_gate_never_passes_what_it_did_not_check(tmp_path, capsys):
    """Four ways a gate could print PASSED without having checked: trap rules over matrices
    with no trap count (audited without the shuffle), an alpha range without its share, a
    rule given twice (YAML keeps the last), negative trap counts cancelling real ones."""
    rows = [_row("a", rand_num_spikes=None), _row("b", rand_num_spikes=None), _row("c")]
    folder = write_report(tmp_path / "norand", rows)
    assert main(["check", str(folder), "--rules", _rules(tmp_path, max_total_traps=0)]) == 1
    assert (
        "FAIL max_total_traps: model: 2 audited matrices have no trap count (rand_num_spikes "
        "null: audited without the shuffle?), first a: traps cannot be checked"
    ) in capsys.readouterr().out
    assert main(["check", str(folder), "--rules", _rules(tmp_path, max_failed=0)]) == 0
    capsys.readouterr()

    for rules in ({"alpha_range": [2, 6]}, {"max_share_alpha_outside": 0.0}):
        assert main(["check", str(folder), "--rules", _rules(tmp_path, **rules)]) == 2
        err = capsys.readouterr().err
        assert "alpha_range and max_share_alpha_outside go together" in err
        assert len(err.splitlines()) == 1
    twice = tmp_path / "twice.yaml"
    twice.write_text("max_total_traps: 0\nmax_failed: 0\nmax_total_traps: 100\n")
    assert main(["check", str(folder), "--rules", str(twice)]) == 2
    assert "key 'max_total_traps' given twice (line 3)" in capsys.readouterr().err

    trapped = write_report(tmp_path / "neg", [_row("a", rand_num_spikes=3), _row("b")])
    negative = write_report(tmp_path / "neg2", [_row("a", rand_num_spikes=3),
                                               _row("b", rand_num_spikes=-3)])  # fmt: skip
    assert main(["check", str(trapped), "--rules", _rules(tmp_path, max_total_traps=0)]) == 1
    capsys.readouterr()
    assert main(["check", str(negative), "--rules", _rules(tmp_path, max_total_traps=0)]) == 2
    assert "column 'rand_num_spikes' holds negative counts or indices" in capsys.readouterr().err
    entries = [{"row": -5, "col": 1, "value": 2.0}]
    bad_entry = write_report(tmp_path / "neg3", [_row("a", trap_entries=entries)])
    assert main(["report", "show", str(bad_entry)]) == 2
    assert "column 'trap_entries' holds negative" in capsys.readouterr().err
