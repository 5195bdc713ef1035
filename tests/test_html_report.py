"""`llm-audit report html`: the page's data, its self-containment and its escaping.

What a browser does with the page is tested in test_html_browser.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from llm_audit.cli import main
from llm_audit.report.html import TOP, histogram, script_json

from .conftest import HOSTILE_RENAMES

SVG_NS = "http://www.w3.org/2000/svg"


def _render(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["report", "html", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _block(page: str, block_id: str):
    match = re.search(
        rf'<script type="application/json" id="{block_id}">(.*?)</script>', page, re.S
    )
    assert match, block_id
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def page(bundled_report, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("html") / "report.html"
    assert main(["report", "html", str(bundled_report), "-o", str(out)]) == 0
    return out.read_text(encoding="utf-8")


def test_every_matrix_and_its_spectrum_are_in_the_page(page, bundled_report):
    rows = pq.read_table(bundled_report / "layers.parquet").to_pylist()
    spectra = pq.read_table(bundled_report / "spectra.parquet").to_pylist()
    data = _block(page, "report-data")
    compact = _block(page, "spectra-data")
    assert data["rows"]["matrix"] == [r["matrix"] for r in rows]
    assert len(rows) == 44 and len(compact) == 44
    assert data["summary"]["total_traps"] == 9
    for k, (row, spectrum) in enumerate(zip(rows, spectra, strict=True)):
        shown = compact[k]
        assert data["rows"]["alpha"][k] == pytest.approx(row["alpha"], rel=1e-5)
        assert data["rows"]["rand_num_spikes"][k] == row["rand_num_spikes"]
        for key, hist, top in (("evals", "e", "te"), ("rand_evals", "r", "tr")):
            values = np.asarray(spectrum[key])
            lo, hi, nonpositive, counts = shown[hist]
            assert nonpositive + sum(counts) == values.size
            assert lo == values[values > 0].min() and hi == values.max()
            assert shown[top] == pytest.approx(np.sort(values)[::-1][:TOP], rel=1e-4)
        traps = row["trap_evals"]
        assert shown.get("traps", []) == pytest.approx(traps, rel=1e-4)
        assert shown.get("entries", []) == [
            [e["row"], e["col"], pytest.approx(e["value"], rel=1e-5)] for e in row["trap_entries"]
        ]
        assert len(traps) == row["rand_num_spikes"]


def test_histogram_counts_every_eigenvalue_in_log_spaced_bins():
    values = np.array([-1e-9, 0.0, 1e-3, 1e-2, 0.1, 0.1, 1.0, 10.0])
    lo, hi, nonpositive, counts = histogram(values)
    assert (lo, hi, nonpositive) == (1e-3, 10.0, 2)
    assert len(counts) == 8 and sum(counts) == 6
    edges = np.geomspace(lo, hi, len(counts) + 1)
    assert np.allclose(np.diff(np.log(edges)), np.log(1e4) / 8)
    assert counts[0] == 1 and counts[-1] == 1
    lo, hi, nonpositive, counts = histogram(np.full(5, 2.0))
    assert lo < 2.0 < hi and sum(counts) == 5
    assert histogram(np.zeros(3)) == [None, None, 3, []]


def test_page_is_self_contained_and_its_policy_allows_only_its_own_code(page):
    assert set(re.findall(r"https?://[^\s\"'`)]*", page)) == {SVG_NS}  # a namespace, no fetch
    assert not re.search(r"\b(src|href)\s*=", page)
    assert "@import" not in page and "url(" not in page.replace("url(#", "")
    csp = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert csp
    policy = dict(p.strip().split(" ", 1) for p in csp.group(1).split(";"))
    assert policy["default-src"] == "'none'" and policy["img-src"] == "data:"
    assert "unsafe" not in csp.group(1)
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        assert len(bodies) == 1
        digest = base64.b64encode(hashlib.sha256(bodies[0].encode()).digest()).decode()
        assert policy[directive] == f"'sha256-{digest}'"


def test_script_json_cannot_close_its_script_element():
    hostile = "</script><script>alert(1)</script><!-- & \u2028\u2029 >"
    text = script_json({"name": hostile})
    assert not set(text) & set("<>&\u2028\u2029")
    assert json.loads(text) == {"name": hostile}
    with pytest.raises(ValueError):
        script_json({"alpha": float("nan")})  # NaN is not JSON: rows carry None instead


def test_hostile_names_are_escaped(hostile_report, tmp_path, capsys):
    out = tmp_path / "hostile.html"
    code, _, _ = _render(capsys, str(hostile_report), "-o", str(out))
    assert code == 0
    page = out.read_text(encoding="utf-8")
    assert "alert(" in page  # the names are there ...
    assert "<img" not in page and "<script>alert" not in page
    assert page.count("<script") == 3 and page.count("</script>") == 3  # ... never as markup
    assert "<title>llm-audit report: &lt;script&gt;alert(3)&lt;/script&gt;</title>" in page
    data = _block(page, "report-data")
    for name, kind in HOSTILE_RENAMES.values():
        assert name in data["rows"]["matrix"] and name in data["rows"]["tensor"]
        if kind is not None:
            assert kind in data["rows"]["kind"]
    assert data["meta"]["model"] == "<script>alert(3)</script>"


def test_default_output_goes_into_the_report_folder(bundled_report, tmp_path, capsys):
    report = shutil.copytree(bundled_report, tmp_path / "report")
    code, out, _ = _render(capsys, str(report))
    assert code == 0
    assert out.startswith(f"{report / 'report.html'} (") and (report / "report.html").is_file()
    code, out, _ = _render(capsys, str(report), "-o", str(tmp_path / "p.html"), "--format", "json")
    written = json.loads(out)
    assert code == 0 and written["html"] == str(tmp_path / "p.html")
    assert written["bytes"] == (tmp_path / "p.html").stat().st_size > 0


def test_compare_lists_new_traps_first(bundled_report, rewrite_report, tmp_path, capsys):
    target = "model.layers.0.self_attn.q_proj.weight"

    def add_traps(row):
        if row["matrix"] == target:
            row.update(rand_num_spikes=5, alpha=row["alpha"] + 1.5)

    changed = rewrite_report(bundled_report, tmp_path / "changed", add_traps)
    out = tmp_path / "compare.html"
    code, _, _ = _render(capsys, str(changed), "-o", str(out), "--compare", str(bundled_report))
    assert code == 0
    data = _block(out.read_text(encoding="utf-8"), "report-data")
    rows = pq.read_table(bundled_report / "layers.parquet").to_pylist()
    k = data["rows"]["matrix"].index(target)
    cmp = data["compare"]
    assert cmp["order"][0] == k and cmp["new_traps"][k] == 5
    assert sum(cmp["new_traps"]) == 5
    assert cmp["base"]["alpha"][k] == pytest.approx(rows[k]["alpha"], rel=1e-5)
    assert cmp["delta"]["alpha"][k] == pytest.approx(1.5, rel=1e-4)
    assert cmp["delta"]["rand_num_spikes"][k] == 5
    assert str(bundled_report) in cmp["label"]


def test_compare_with_another_architecture_is_one_line(
    bundled_report, hostile_report, tmp_path, capsys
):
    out = tmp_path / "x.html"
    args = (str(bundled_report), "-o", str(out), "--compare", str(hostile_report))
    code, _, err = _render(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and "different architectures" in err
    assert not out.exists()


@pytest.mark.parametrize("case", ["not_a_report", "no_spectra", "no_output_folder", "bad_base"])
def test_bad_input_is_one_line_and_exit_2(case, bundled_report, tmp_path, capsys):
    report, out, extra = str(bundled_report), str(tmp_path / "r.html"), []
    if case == "not_a_report":
        report = str(tmp_path)
    elif case == "no_spectra":
        copy = shutil.copytree(bundled_report, tmp_path / "copy")
        (copy / "spectra.parquet").unlink()
        report = str(copy)
    elif case == "no_output_folder":
        out = str(tmp_path / "missing" / "r.html")
    else:
        extra = ["--compare", str(tmp_path / "nothing")]
    code, _, err = _render(capsys, report, "-o", out, *extra)
    assert code == 2
    assert err.startswith("llm-audit: error: ") and err.count("\n") == 1
    assert not Path(out).exists()
