"""`llm-audit report html` at gpt-oss-120b scale: file size and page load time.

Builds a synthetic report of 10,000 matrices with gpt-oss-120b's names and shapes (its
36 layers extended until there are 10,000 matrices; 2,880 eigenvalues for most spectra,
the shuffled ones too) through `ReportWriter`, renders it, and opens the page from disk in
headless Chromium (Debian's /usr/bin/chromium via /usr/bin/chromedriver), a fresh
profile per run. The rows and spectra are fabricated (gamma-distributed bulks, power-law
tails, a few planted traps): this measures the page, not the analysis.

Figures: HTML size; Python render time; per browser run, the time from navigation start
until the table is in the DOM and until the next frame is painted (the page records both
with performance.now()), the first drill-down (which also parses the spectra block), a
second drill-down, a sort of all rows and a text filter.

    python benchmarks/bench_html.py [--matrices 10000] [--runs 3] [--json PATH] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.chromium

from llm_audit import __version__
from llm_audit.files import write_json
from llm_audit.report.html import write_html_report
from llm_audit.report.schema import SCHEMA_VERSION
from llm_audit.report.writer import ReportWriter
from tests.chromium import CHROMEDRIVER, CHROMIUM, start_chromium

HIDDEN, EXPERTS, VOCAB = 2880, 128, 201088


def units(count: int) -> list[tuple[str, str, int | None, int | None, int, int]]:
    """(matrix, kind, layer, expert, N, M) in gpt-oss-120b's plan order, `count` of them."""
    out = [("model.embed_tokens.weight", "embedding", None, None, VOCAB, HIDDEN)]
    layer = 0
    while len(out) < count - 1:
        prefix = f"model.layers.{layer}"
        attn = {"q_proj": (4096, HIDDEN), "k_proj": (HIDDEN, 512), "v_proj": (HIDDEN, 512)}
        attn["o_proj"] = (4096, HIDDEN)
        for kind, (n, m) in attn.items():
            out.append((f"{prefix}.self_attn.{kind}.weight", kind, layer, None, n, m))
        out.append((f"{prefix}.mlp.router.weight", "router", layer, None, HIDDEN, EXPERTS))
        for name, kind, n in (
            ("gate_up_proj", "expert_gate_up", 2 * HIDDEN),
            ("down_proj", "expert_down", HIDDEN),
        ):
            for e in range(EXPERTS):
                out.append((f"{prefix}.mlp.experts.{name}[{e}]", kind, layer, e, n, HIDDEN))
        layer += 1
    out = out[: count - 1]
    out.append(("lm_head.weight", "lm_head", None, None, VOCAB, HIDDEN))
    return out


def fabricate(unit: tuple, rng: np.random.Generator, seed: int) -> dict[str, Any]:
    """One report row with spectra of realistic size and plausible (not computed) values."""
    matrix, kind, layer, expert, n, m = unit
    q = n / m
    evals = np.sort(rng.gamma(2.0, 0.5 / q, m))
    alpha = float(rng.uniform(2.0, 8.0))
    tail = max(8, m // 20)
    evals[-tail:] = np.sort(evals[-tail] * (1 + rng.pareto(alpha - 1, tail)))
    rand = np.sort(rng.gamma(2.0, 0.5 / q, m))
    traps = int(rng.random() < 0.03) * int(rng.integers(1, 5))
    if traps:
        rand[-traps:] = np.sort(rand[-1] * rng.uniform(1.5, 4.0, traps))
    lmax, norm = float(evals[-1]), float(evals.sum())
    xmin = float(evals[-tail])
    bulk_max, rand_bulk_max = float(np.quantile(evals, 0.98)), float(rand[-traps - 1] * 1.01)
    return {
        "matrix": matrix,
        "tensor": matrix.split("[")[0],
        "kind": kind,
        "layer": layer,
        "expert": expert,
        "source_dtype": "MXFP4" if expert is not None else "BF16",
        "N": n,
        "M": m,
        "Q": q,
        "num_evals": m,
        "lambda_max": lmax,
        "log_spectral_norm": np.log10(lmax),
        "norm": norm,
        "log_norm": np.log10(norm),
        "stable_rank": norm / lmax,
        "alpha": alpha,
        "xmin": xmin,
        "D": 0.05,
        "sigma": (alpha - 1) / np.sqrt(tail),
        "num_pl_spikes": tail,
        "alpha_weighted": alpha * np.log10(lmax),
        "log_alpha_norm": 1.0,
        "warning": "under-trained" if alpha > 6 else "",
        "num_spikes": int(np.sum(evals > bulk_max)),
        "sigma_mp": 1.0,
        "mp_softrank": bulk_max / lmax,
        "bulk_max": bulk_max,
        "bulk_min": float(evals[0]),
        "rand_num_spikes": traps,
        "rand_sigma_mp": 1.0,
        "rand_mp_softrank": rand_bulk_max / rand[-1],
        "rand_bulk_max": rand_bulk_max,
        "max_rand_eval": float(rand[-1]),
        "rand_distance": 0.01,
        "ww_softrank": rand[-1] / lmax,
        "ww_maxdist": lmax - rand[-1],
        "trap_evals": rand[::-1][:traps].tolist(),
        "trap_entries": [
            {"row": int(rng.integers(n)), "col": int(rng.integers(m)), "value": 0.5}
            for _ in range(traps)
        ],
        "entry_kurtosis": 0.1,
        "max_abs_entry": 0.5,
        "rand_route": "full",
        "backend": "numpy",
        "seed": seed,
        "matrix_id": matrix,
        "status": "ok",
        "reason": "",
        "seconds": 0.1,
        "node": "bench",
        "evals": evals,
        "rand_evals": rand,
    }


def build_report(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    plan = units(count)
    writer = ReportWriter(folder)
    rows: list[dict[str, Any]] = []
    summary_rows = []
    for unit in plan:
        row = fabricate(unit, rng, seed)
        rows.append(row)
        summary_rows.append((row["kind"], row["alpha"], row["rand_num_spikes"], row["warning"]))
        if len(rows) == 250:
            writer.add(rows)
            rows = []
    writer.add(rows)
    writer.finalize([u[0] for u in plan])
    traps = [t for _, _, t, _ in summary_rows]
    by_kind: dict[str, list[float]] = {}
    for kind, alpha, _, _ in summary_rows:
        by_kind.setdefault(kind, []).append(alpha)
    write_json(
        folder / "summary.json",
        {
            "matrices_planned": count,
            "matrices_in_report": count,
            "audited": count,
            "skipped": 0,
            "failed": 0,
            "matrices_with_traps": sum(t > 0 for t in traps),
            "total_traps": sum(traps),
            "mean_alpha_by_kind": {k: float(np.mean(v)) for k, v in sorted(by_kind.items())},
            "warnings": {"under-trained": sum(w != "" for *_, w in summary_rows)},
        },
    )
    write_json(
        folder / "manifest.json",
        {
            "schema_version": SCHEMA_VERSION,
            "tool": "llm-audit",
            "tool_version": __version__,
            "model": {"reference": f"synthetic gpt-oss-120b-like ({count} matrices)"},
            "seed": seed,
            "status": "complete",
            "finished": "synthetic",
        },
    )


def browser_run(url: str) -> dict[str, float]:
    """One fresh Chromium: load, then time a drill-down (twice), a sort and a filter."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp(prefix="bench-html-")
    driver = start_chromium(profile)
    try:
        t0 = time.perf_counter()
        driver.get(url)
        dataset = "return document.documentElement.dataset"
        WebDriverWait(driver, 300).until(lambda d: d.execute_script(dataset).get("tablePaintedMs"))
        wall = time.perf_counter() - t0
        marks = driver.execute_script(dataset)
        nav = driver.execute_script(
            "const n = performance.getEntriesByType('navigation')[0];"
            "return {response_end: n.responseEnd, dom_content_loaded: n.domContentLoadedEventEnd,"
            " load: n.loadEventEnd};"
        )
        detail_ms = []
        for k in (3, 4):  # opening one re-renders the rows: look them up each time
            driver.find_elements(By.CSS_SELECTOR, "#table-body tr.row")[k].click()
            detail_ms.append(float(driver.execute_script(dataset)["detailMs"]))
            driver.find_element(By.CSS_SELECTOR, "#detail button.close").click()
        sort_ms = driver.execute_script(
            "const t = performance.now();"
            "document.querySelector('th[data-key=alpha]').click();"
            "return performance.now() - t;"
        )
        filter_ms = driver.execute_script(
            "const box = document.getElementById('filter'); const t = performance.now();"
            "box.value = 'layers.7.mlp'; box.dispatchEvent(new Event('input'));"
            "return performance.now() - t;"
        )
        return {
            "table_in_dom_ms": float(marks["tableBuiltMs"]),
            "table_painted_ms": float(marks["tablePaintedMs"]),
            "dom_content_loaded_ms": round(nav["dom_content_loaded"], 1),
            "load_event_ms": round(nav["load"], 1),
            "wall_get_to_painted_s": round(wall, 3),
            "first_drilldown_ms": detail_ms[0],
            "second_drilldown_ms": detail_ms[1],
            "sort_all_rows_ms": round(sort_ms, 1),
            "filter_ms": round(filter_ms, 1),
        }
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--matrices", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3, help="browser runs (fresh profile each)")
    parser.add_argument("--json", default="benchmarks/results-html.json", help="write figures")
    parser.add_argument("--keep", help="build the report here and keep it (default: temp)")
    args = parser.parse_args()
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not os.access(tool, os.X_OK):
            sys.exit(f"{tool} not found: `make test` installs Debian's chromium and chromedriver")
    load_start = os.getloadavg()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-html-"))
    try:
        t0 = time.perf_counter()
        build_report(folder / "report", args.matrices)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        page = write_html_report(folder / "report", folder / "report.html")
        render_s = time.perf_counter() - t0
        size = page.stat().st_size
        spectra_bytes = (folder / "report" / "spectra.parquet").stat().st_size
        print(
            f"{args.matrices} matrices; report built in {build_s:.1f} s "
            f"(spectra.parquet {spectra_bytes / 1e6:.0f} MB)"
        )
        print(f"HTML: {size / 1e6:.2f} MB, rendered by Python in {render_s:.1f} s")
        runs = []
        for k in range(args.runs):
            run = browser_run(page.as_uri())
            runs.append(run)
            print(f"run {k + 1}: " + ", ".join(f"{key} {value}" for key, value in run.items()))
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print("median: " + ", ".join(f"{key} {value}" for key, value in median.items()))
    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True)
    result = {
        "matrices": args.matrices,
        "spectra_parquet_bytes": spectra_bytes,
        "html_bytes": size,
        "html_mb": round(size / 1e6, 2),
        "python_render_s": round(render_s, 2),
        "browser": chromium.stdout.strip(),
        "runs": runs,
        "median": median,
        "cpus": os.cpu_count(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    print(f"load average: start {load_start[0]:.1f}, end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
