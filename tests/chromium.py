"""Debian's headless Chromium driven by selenium: one launcher for the browser tests and
`benchmarks/bench_html.py`.

Why these flags: as root in a sandboxless container, with no network; without the
background-networking flags Chromium keeps trying (and failing) to reach Google's hosts.
Selenium talks to /usr/bin/chromedriver directly, so selenium-manager downloads nothing.
"""

from __future__ import annotations

from typing import Any

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
)


def start_chromium(profile: str, capabilities: dict[str, Any] | None = None) -> Any:
    """A selenium driver of a fresh headless Chromium whose profile lives in `profile`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    for name, value in (capabilities or {}).items():
        options.set_capability(name, value)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
