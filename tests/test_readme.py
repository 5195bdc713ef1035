"""The README is run: its shell, console and Python blocks, in order, in one folder.

Why: a newcomer copies these blocks first, so a block that no longer runs, or output that
no longer matches what the README shows, is a bug like any other. The conventions in the
README's source:
- a ```sh block runs as one bash script (`set -e`);
- a ```console block: each `$ ` line is a command (bash), the lines after it, up to the
  next `$ `, are its expected stdout; a line `...` stands for any lines; numbers match to
  relative 1e-3, so another CPU's last bit does not matter; `# exit N` at the end of a
  command line is its expected exit status (else 0);
- a ```python block runs as a script;
- a block right after `<!-- not run: REASON -->` is not run (downloads, a cluster, make).
Also: every report column is explained, and CI runs the README's test command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llm_audit.report.schema import REPORT_COLUMNS
from llm_audit.spectral.columns import COLUMNS

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->")
EXIT = re.compile(r"\s+# exit (\d+)\b.*$")


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    text: str
    not_run: str | None  # the reason, for a block that is not run


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of `text`, with the not-run reason of the line before each."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = lines[i - 1] if i else ""
        reason = NOT_RUN.search(before)
        blocks.append(
            Block(fence[1], i + 1, "\n".join(lines[i + 1 : end]), reason[1] if reason else None)
        )
        i = end + 1
    return blocks


def console_commands(text: str) -> list[tuple[str, int, list[str]]]:
    """(command, expected exit status, expected stdout lines) of a console block."""
    commands: list[tuple[str, int, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            command = line[2:]
            status = EXIT.search(command)
            commands.append((EXIT.sub("", command), int(status[1]) if status else 0, []))
        elif commands:
            commands[-1][2].append(line)
        elif line.strip():
            raise AssertionError(f"console block starts with output, not `$ `: {line!r}")
    return commands


def _same_token(a: str, b: str) -> bool:
    """Equal, or numbers within 0.1% (the last digits of a float differ between BLAS
    builds and thread counts); a CSV field list is compared field by field."""
    if a == b:
        return True
    if "," in a.rstrip(",") and a.count(",") == b.count(","):
        return all(map(_same_token, a.split(","), b.split(",")))
    try:
        x, y = float(a.rstrip(",;)")), float(b.rstrip(",;)"))
    except ValueError:
        return False
    return abs(x - y) <= 1e-3 * max(abs(x), abs(y)) + 1e-12


def _same_line(expected: str, actual: str) -> bool:
    want, got = expected.split(), actual.split()
    return len(want) == len(got) and all(map(_same_token, want, got))


def output_matches(expected: list[str], actual: list[str]) -> bool:
    """`actual` lines against `expected`, where a `...` line matches any run of lines."""
    expected = [e for e in expected if e.strip()]
    actual = [a for a in actual if a.strip()]
    if not expected:
        return not actual
    head, *rest = expected
    if head.strip() == "...":
        return any(output_matches(rest, actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and _same_line(head, actual[0]) and output_matches(rest, actual[1:])


def test_console_parsing_and_matching_can_fail():
    (cmd, status, out), (cmd2, status2, _) = console_commands(
        "$ llm-audit check r   # exit 1: planted traps\nFAILED: 3 checks\n$ ls"
    )
    assert (cmd, status, out) == ("llm-audit check r", 1, ["FAILED: 3 checks"])
    assert (cmd2, status2) == ("ls", 0)
    assert output_matches(["alpha 2.000", "...", "end"], ["alpha 2.0004", "x", "y", "end"])
    assert not output_matches(["alpha 2.000"], ["alpha 2.01"])
    assert not output_matches(["a b"], ["a  b  c"])
    assert output_matches(["m[3],29.297505694641114,x"], ["m[3],29.29750569464138,x"])
    assert not output_matches(["m[3],29.3,x"], ["m[3],29.4,x"])
    assert not output_matches(["m,1.0,x"], ["n,1.0,x"])
    assert not output_matches(["...", "end"], ["end", "more"])
    blocks = readme_blocks(
        "<!-- not run: needs the hub -->\n```sh\nhf download x\n```\n```sh\nls\n```"
    )
    assert [(b.lang, b.line, b.not_run) for b in blocks] == [
        ("sh", 2, "needs the hub"),
        ("sh", 5, None),
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    (folder / "configs").symlink_to(ROOT / "configs")
    return folder


def _env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["HF_HUB_CACHE"] = str(folder / "hf-cache")  # never the user's cache
    env["PYTHONPATH"] = str(ROOT)
    env["COLUMNS"] = "200"
    env.pop("RAY_ADDRESS", None)
    return env


def test_readme_blocks_run(workdir: Path):
    blocks = readme_blocks(README.read_text())
    ran = 0
    for block in blocks:
        if block.lang not in ("sh", "console", "python") or block.not_run:
            continue
        where = f"README.md line {block.line}"
        env = _env(workdir)
        if block.lang == "sh":
            proc = subprocess.run(
                ["bash", "-ec", block.text], cwd=workdir, env=env, capture_output=True, text=True
            )
            assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        elif block.lang == "python":
            proc = subprocess.run(
                [sys.executable, "-c", block.text],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
            )
            assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        else:
            for command, status, expected in console_commands(block.text):
                proc = subprocess.run(
                    ["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True
                )
                assert proc.returncode == status, (
                    f"{where}: `{command}` exit {proc.returncode}, README says {status}\n"
                    f"{proc.stderr[-3000:]}"
                )
                assert output_matches(expected, proc.stdout.splitlines()), (
                    f"{where}: `{command}` printed\n{proc.stdout}\nREADME shows\n"
                    + "\n".join(expected)
                )
        ran += 1
    assert ran >= 5, f"only {ran} README blocks ran"


def test_every_skipped_block_says_why():
    for block in readme_blocks(README.read_text()):
        if block.not_run is not None:
            assert len(block.not_run) > 10, f"README.md line {block.line}: give the reason"


def test_readme_explains_every_column():
    readme = README.read_text()
    missing = [name for name in COLUMNS if f"| `{name}` |" not in readme]
    missing += [name for name in REPORT_COLUMNS if f"`{name}`" not in readme]
    assert missing == []


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
    assert "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_documents_every_config_key_with_its_default():
    import dataclasses

    import yaml

    from llm_audit.run.config import AuditConfig

    readme = README.read_text()
    for field in dataclasses.fields(AuditConfig):
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        if isinstance(default, float) and default.is_integer():
            default = int(default)
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("\n...")
        shown = shown.removesuffix("...").strip()
        assert f"| `{field.name}` | `{shown}` |" in readme, field.name
