"""The README documents every report column, and the test command CI runs."""

from __future__ import annotations

from pathlib import Path

from llm_audit.report.schema import REPORT_COLUMNS
from llm_audit.spectral.columns import COLUMNS

ROOT = Path(__file__).resolve().parent.parent


def test_readme_explains_every_column():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in COLUMNS if f"| `{name}` |" not in readme]
    missing += [name for name in REPORT_COLUMNS if f"`{name}`" not in readme]
    assert missing == []


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
