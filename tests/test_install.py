"""What `pip install llm-audit` gives: a CPU audit without torch, and a grok that says what
it lacks in one line.

Why a real install into a fresh venv: the development venv holds every extra, so only a
venv with exactly what pyproject.toml declares shows a run-time import that is not
declared, or a heavy dependency the audit does not need. The install (plain `pip install`,
build isolation, from the package registry) takes about a minute; the audit in it starts
its own local Ray. The static test checks every import of the package against
pyproject.toml, and the in-process test that the CPU commands never import torch.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llm_audit.grok.cli import NO_EXTRAS
from llm_audit.grok.mnist import NO_MNIST
from llm_audit.source.synth import PLANTED

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llm_audit"
# Not installed by a plain `pip install` (the extras' and the tests' packages), and what the
# CPU commands never import (pandas aside: pyarrow imports it on its own where installed).
HEAVY = ("torch", "matplotlib", "pandas", "sklearn", "transformers")
NEVER_IMPORTED = tuple(m for m in HEAVY if m != "pandas")


def _run(*cmd: str | Path, timeout: int = 300, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    env |= kwargs.pop("env", {})
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, **kwargs
    )


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv with `pip install .` of this tree (copied: an in-tree build would write
    build/ and *.egg-info into the working tree)."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    shutil.copytree(PACKAGE, src / "llm_audit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = base / "venv"
    made = _run(sys.executable, "-m", "venv", venv)
    assert made.returncode == 0, made.stderr
    pip = _run(venv / "bin" / "python", "-m", "pip", "install", "-q", src, timeout=900)
    assert pip.returncode == 0, f"pip install . failed:\n{pip.stderr[-3000:]}"
    return venv


def test_a_plain_install_audits_on_the_cpu_without_torch(fresh_venv, tmp_path):
    python, cli = fresh_venv / "bin" / "python", fresh_venv / "bin" / "llm-audit"
    found = _run(
        python,
        "-c",
        "import importlib.util as u, sys; "
        f"print(*[m for m in {HEAVY!r} if u.find_spec(m)], sep=',')",
    )
    assert found.returncode == 0 and found.stdout.strip() == "", found.stdout + found.stderr
    version = _run(cli, "--version")
    assert version.returncode == 0
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert version.stdout == f"llm-audit {project['version']}\n"
    helped = _run(python, "-m", "llm_audit", "--help")
    assert helped.returncode == 0 and "audit" in helped.stdout and "grok" in helped.stdout

    demo = _run(cli, "demo", "--out", tmp_path / "demo", "--quiet", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-3000:]
    for unit_id, planted in PLANTED.items():
        assert f"  {unit_id}: {planted} -> {planted}\n" in demo.stdout
    assert "traps in the other 41 matrices: 0" in demo.stdout
    shown = _run(cli, "report", "show", tmp_path / "demo" / "report")
    assert shown.returncode == 0, shown.stderr
    assert "model.layers.1.self_attn.o_proj.weight" in shown.stdout


def test_grok_without_its_extras_stops_in_one_line(fresh_venv, tmp_path):
    out = tmp_path / "run"
    got = _run(fresh_venv / "bin" / "llm-audit", "grok", "mlp-mnist", "--out", out)
    assert got.returncode == 2
    expected = NO_EXTRAS.format(missing="torch and matplotlib")
    assert got.stderr == f"llm-audit: error: {expected}\n"
    assert "pip install 'llm-audit[grok]'" in expected
    assert "--index-url https://download.pytorch.org/whl/cpu" in expected
    assert got.stdout == "" and not out.exists()


# --- in the development venv --------------------------------------------------------------


def _main_without(
    hidden: tuple[str, ...], argv: list[str], env: dict
) -> subprocess.CompletedProcess:
    """`llm-audit ARGV` in a fresh interpreter where the modules `hidden` cannot be imported."""
    code = (
        "import sys\n"
        f"for name in {hidden!r}:\n"
        "    sys.modules[name] = None  # import and find_spec: as if not installed\n"
        "from llm_audit.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    return _run(sys.executable, "-c", code, env=env)


def test_grok_without_mnist_says_how_to_get_it(tmp_path):
    out = tmp_path / "run"
    env = {"LLM_AUDIT_CACHE": str(tmp_path / "cache")}  # no MNIST cached from an earlier run
    got = _main_without(("mnist",), ["grok", "mlp-mnist", "--out", str(out)], env)
    assert got.returncode == 2
    assert got.stderr == f"llm-audit: error: {NO_MNIST}\n"
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_grok_without_torch_names_the_extra(tmp_path):
    got = _main_without(("torch",), ["grok", "modadd", "--out", str(tmp_path / "run")], {})
    assert got.returncode == 2
    assert got.stderr == f"llm-audit: error: {NO_EXTRAS.format(missing='torch')}\n"


def test_the_torch_backend_without_torch_is_one_line(tmp_path):
    np.save(tmp_path / "w.npy", np.random.default_rng(0).standard_normal((64, 32)))
    got = _main_without(("torch",), ["analyze", str(tmp_path / "w.npy"), "--backend", "torch"], {})
    assert got.returncode == 2 and len(got.stderr.splitlines()) == 1
    assert "backend 'torch' needs torch: pip install 'llm-audit[gpu]'" in got.stderr


def _python_without(hidden: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    hide = "".join(f"sys.modules[{name!r}] = None\n" for name in hidden)
    return _run(sys.executable, "-c", "import sys\n" + hide + code)


def test_the_weightwatcher_drop_in_without_torch_or_pandas():
    weights = (
        "import numpy as np\n"
        "from llm_audit import WeightWatcher\n"
        "w = {'fc.weight': np.random.default_rng(0).standard_normal((64, 32))}\n"
    )
    got = _python_without(("torch",), weights + "print(len(WeightWatcher(model=w).analyze()))")
    assert got.returncode == 0 and got.stdout.strip() == "1", got.stderr
    got = _python_without(("pandas",), weights + "WeightWatcher(model=w).analyze()")
    assert got.returncode == 1
    assert got.stderr.strip().endswith("pip install 'llm-audit[pandas]'")


def test_grok_with_too_few_images_per_class_is_one_line():
    from llm_audit.errors import UsageError
    from llm_audit.grok.tasks import _stratified

    labels = np.repeat(np.arange(10), [100] * 9 + [99])
    assert len(_stratified(labels, 990, seed=0)) == 990
    with pytest.raises(UsageError, match="n_train=1000 needs 100 training images of each class"):
        _stratified(labels, 1000, seed=0)


def test_the_cpu_commands_never_import_torch(bundled_report, tmp_path):
    """Every module of the audit path imported, then synth, plan and report show run, in
    one interpreter: torch, matplotlib and the tests' packages are never imported."""
    audit_path = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in PACKAGE.rglob("*.py")
        if p.parent.name != "grok" and p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        "from llm_audit.cli import main\n"
        f"for name in {audit_path!r}:\n"
        "    importlib.import_module(name)\n"
        f"assert main(['synth', 'gpt-oss', {str(tmp_path / 'm')!r}, '--layers', '1']) == 0\n"
        f"assert main(['plan', {str(tmp_path / 'm')!r}]) == 0\n"
        f"assert main(['report', 'show', {str(bundled_report)!r}]) == 0\n"
        f"print('heavy:', [m for m in {NEVER_IMPORTED!r} if m in sys.modules], file=sys.stderr)\n"
    )
    got = _run(sys.executable, "-c", code)
    assert got.returncode == 0, got.stderr[-3000:]
    assert got.stderr.endswith("heavy: []\n"), got.stderr[-500:]


# --- static: every import declared -----------------------------------------------------------


def _requirement_names() -> set[str]:
    """The distributions a user can install for running llm-audit: the dependencies and
    the run-time extras (not `test` and `dev`: what the package imports must not be
    declared only for its tests)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        specs += extra if name not in ("test", "dev") else []
    return {_normalized(re.match(r"[A-Za-z0-9._-]+", s).group()) for s in specs}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _outside_functions(node: ast.AST) -> Iterator[ast.AST]:
    """The nodes under `node` that run on import: not in a function body, nor under
    `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        yield child
        yield from _outside_functions(child)


def _imports(path: Path, module_level_only: bool = False) -> set[str]:
    """Top-level names of the absolute imports in `path` (only its module-level
    statements, `if TYPE_CHECKING:` aside, when `module_level_only`)."""
    tree = ast.parse(path.read_text())
    nodes = _outside_functions(tree) if module_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"llm_audit"}


# GPU-only modules whose distributions this machine may not have installed.
_NOT_INSTALLED_HERE = {"cupy": "cupy-cuda12x", "cupyx": "cupy-cuda12x"}


def test_every_imported_package_is_declared():
    declared = _requirement_names()
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module in _imports(path):
            names = distributions.get(module) or [_NOT_INSTALLED_HERE.get(module, module)]
            if not {_normalized(n) for n in names} & declared:
                undeclared[module] = path.relative_to(ROOT)
    assert undeclared == {}


def test_the_audit_path_imports_no_heavy_package_at_module_level():
    stages = ("source", "spectral", "report", "run")
    files = [p for s in stages for p in (PACKAGE / s).rglob("*.py")]
    files += [*PACKAGE.glob("*.py"), PACKAGE / "grok" / "cli.py", PACKAGE / "grok" / "settings.py"]
    heavy = {
        str(p.relative_to(ROOT)): sorted(_imports(p, module_level_only=True) & set(HEAVY))
        for p in files
    }
    assert {k: v for k, v in heavy.items() if v} == {}
