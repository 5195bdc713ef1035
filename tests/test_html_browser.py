"""The HTML report in a real headless Chromium: offline, interactive, and inert to hostile names.

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them) and selenium
(the dev extras). Selenium talks to /usr/bin/chromedriver directly, so it downloads
nothing. Without the browser these tests fail: the page's behaviour is the point.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from llm_audit.report.html import write_html_report
from llm_audit.spectral.columns import COLUMNS

from .chromium import CHROMEDRIVER, CHROMIUM, start_chromium
from .conftest import HOSTILE_RENAMES

INTERNAL = ("chrome://", "chrome-untrusted://", "devtools://")
WAIT_S = 30  # generous: the machine may be busy; nothing here asserts on time


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: run `make test`, which installs Chromium")
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is not installed: run `make test` (it installs the dev extras)")
    profile = tempfile.mkdtemp(prefix="llm-audit-chromium-")
    driver = start_chromium(
        profile,
        {
            "goog:loggingPrefs": {"browser": "ALL", "performance": "ALL"},
            "unhandledPromptBehavior": "ignore",  # an alert stays to be seen
        },
    )
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def pages(bundled_report, hostile_report, rewrite_report, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pages")

    def add_traps(row):
        if row["matrix"] == "model.layers.0.self_attn.q_proj.weight":
            row["rand_num_spikes"] = 5

    def fail(row):
        if row["matrix"] == "model.layers.1.mlp.router.weight":  # as a crashed analysis writes
            row.update({col: None for col in COLUMNS if col not in ("matrix_id", "seed")})
            row.update(status="error", error="MemoryError: simulated", evals=None, rand_evals=None)

    changed = rewrite_report(bundled_report, folder / "changed", add_traps)
    failed = rewrite_report(bundled_report, folder / "failed", fail)
    return {
        "bundled": write_html_report(bundled_report, folder / "bundled.html"),
        "hostile": write_html_report(hostile_report, folder / "hostile.html"),
        "compare": write_html_report(changed, folder / "compare.html", compare=bundled_report),
        "failed": write_html_report(failed, folder / "failed.html"),
    }


def _js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def _open(driver, path: Path) -> str:
    """Load `path` from file:// and wait until its table is in the DOM."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drain what earlier pages logged
    driver.get_log("performance")
    url = path.as_uri()
    driver.get(url)
    WebDriverWait(driver, WAIT_S).until(
        lambda d: _js(d, "return document.documentElement.dataset.tableBuiltMs")
    )
    return url


def _errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _requests(driver) -> set[str]:
    """URLs requested since the last call, less the browser's own UI pages (chrome://...,
    which a fresh Chromium may still be loading for its start page): no network there."""
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    return {u for u in urls if not u.startswith(INTERNAL)}


def _rows(driver) -> list[str]:
    return _js(
        driver,
        "return [...document.querySelectorAll('#table-body tr.row')]"
        ".map(tr => tr.firstChild.textContent)",
    )


def _filter(driver, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "filter")
    box.clear()
    box.send_keys(text)


def _assert_no_alert(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 (the access is the check)


def test_page_loads_offline_without_errors_or_requests(browser, pages):
    url = _open(browser, pages["bundled"])
    assert _errors(browser) == []
    assert _requests(browser) == {url}
    cards = browser.find_element("id", "cards").text
    assert "44" in cards and "9" in cards
    assert _js(browser, "return document.querySelectorAll('#alpha-depth svg path.series').length")
    assert _js(browser, "return document.querySelectorAll('#heatmap svg rect.cell').length") == 16


def test_filter_narrows_the_table_and_headers_sort_it(browser, pages):
    from selenium.webdriver.common.by import By

    _open(browser, pages["bundled"])
    before = _rows(browser)
    assert browser.find_element(By.ID, "row-count").text == "44 of 44 matrices"
    assert len(before) > 2
    _filter(browser, "o_proj")
    after = _rows(browser)
    assert after == [
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
    ]
    assert browser.find_element(By.ID, "row-count").text == "2 of 44 matrices"
    _filter(browser, "")
    browser.find_element(By.CSS_SELECTOR, "th[data-key=traps]").click()
    assert _rows(browser)[:3] == [
        "model.layers.1.mlp.experts.down_proj[5]",  # 4 traps, then 3, then 2
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.experts.gate_up_proj[2]",
    ]
    assert _errors(browser) == []


def test_a_row_opens_its_spectra(browser, pages, tmp_path):
    from selenium.webdriver.common.by import By

    _open(browser, pages["bundled"])
    _filter(browser, "layers.1.mlp.experts.down_proj[5]")
    browser.find_element(By.CSS_SELECTOR, "#table-body tr.row").click()
    detail = browser.find_element(By.ID, "detail")
    assert detail.is_displayed()
    name = detail.find_element(By.CSS_SELECTOR, "h2").text
    assert name == "model.layers.1.mlp.experts.down_proj[5]"
    plots = detail.find_elements(By.CSS_SELECTOR, "svg.plot")
    assert len(plots) == 3
    for plot in plots:  # each plot has drawn bars and a fitted curve
        drawn = _js(
            browser,
            "return [...arguments[0].querySelectorAll('path.bars, path.pl-fit, path.mp-fit')]"
            ".filter(p => (p.getAttribute('d') || '').length > 10).length",
            plot,
        )
        assert drawn >= 2
    assert len(detail.find_elements(By.CSS_SELECTOR, "circle.trap")) == 4
    assert len(detail.find_elements(By.CSS_SELECTOR, "circle.spike")) == 4
    entries = detail.find_elements(By.CSS_SELECTOR, "table.trap-entries tr")
    assert len(entries) == 1 + 4
    shot = tmp_path / "drilldown.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _errors(browser) == []


def test_hostile_names_stay_text(browser, pages):
    from selenium.webdriver.common.by import By

    url = _open(browser, pages["hostile"])
    _filter(browser, "alert")
    names = sorted(name for name, _ in HOSTILE_RENAMES.values())
    assert sorted(_rows(browser)) == names
    for name in names:
        _filter(browser, name)
        browser.find_element(By.CSS_SELECTOR, "#table-body tr.row").click()
        shown = _js(browser, "return document.querySelector('#detail h2').textContent")
        assert shown == name
        browser.find_element(By.CSS_SELECTOR, "#detail button.close").click()
    assert "<script>alert(1)</script>" in _js(browser, "return document.body.textContent")
    assert "<img src=x onerror=alert(2)>" in [
        o.text for o in browser.find_elements(By.CSS_SELECTOR, "#kind-filter option")
    ]
    assert browser.title == "llm-audit report: <script>alert(3)</script>"
    assert _js(browser, "return document.querySelectorAll('img, img[src=x]').length") == 0
    assert _js(browser, "return document.scripts.length") == 3
    _assert_no_alert(browser)
    assert _errors(browser) == []
    assert _requests(browser) == {url}


def test_compare_page_puts_new_traps_first(browser, pages):
    from selenium.webdriver.common.by import By

    _open(browser, pages["compare"])
    assert browser.find_element(By.ID, "compare").is_displayed()
    assert _rows(browser)[0] == "model.layers.0.self_attn.q_proj.weight"
    gained = browser.find_element(By.CSS_SELECTOR, "#table-body tr.row td.gained")
    assert gained.text == "5"
    assert _errors(browser) == []


def test_a_failed_matrix_shows_its_error_and_no_plots(browser, pages):
    from selenium.webdriver.common.by import By

    _open(browser, pages["failed"])
    _filter(browser, "layers.1.mlp.router")
    row = browser.find_element(By.CSS_SELECTOR, "#table-body tr.row")
    assert row.text.split()[-1] == "error"
    row.click()
    detail = browser.find_element(By.ID, "detail")
    assert "MemoryError: simulated" in detail.text
    assert detail.find_elements(By.CSS_SELECTOR, "svg.plot") == []
    assert _errors(browser) == []
