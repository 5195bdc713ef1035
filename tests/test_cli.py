"""The console script: version, help, demo, analyze, and one-line user errors."""

from __future__ import annotations

import argparse
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm_audit import __version__
from llm_audit.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_audit.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_version_and_help():
    out = _run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"llm-audit {__version__}"
    out = _run("--help")
    assert out.returncode == 0 and "analyze" in out.stdout and "demo" in out.stdout


def test_demo_audits_the_bundled_model_and_finds_exactly_the_planted_traps(tmp_path, capsys):
    from llm_audit.source.synth import PLANTED

    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    for unit_id, planted in PLANTED.items():
        assert f"{unit_id}: {planted} -> {planted}" in out
    assert "traps in the other 41 matrices: 0" in out
    assert (tmp_path / "report" / "layers.parquet").is_file()
    assert (tmp_path / "gpt-oss-mini" / "model.safetensors.index.json").is_file()
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["demo", "--out", str(other), "--quiet"]) == 2
    assert (other / "keep.txt").exists()


def test_analyze_npy_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 100)).astype(np.float32)
    np.save(tmp_path / "a.npy", a)
    assert main(["analyze", str(tmp_path / "a.npy"), "--format", "json", "--seed", "4"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["matrix_id"] == "a.npy" and row["seed"] == 4 and row["status"] == "ok"


def test_user_errors_are_one_line_with_exit_2(tmp_path):
    missing = _run("analyze", str(tmp_path / "missing.npy"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"llm-audit: error: {tmp_path / 'missing.npy'}: no such file"
    evil = tmp_path / "evil.npy"
    np.save(evil, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    refused = _run("analyze", str(evil))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and "evil.npy" in refused.stderr
    (tmp_path / "p.npy").write_bytes(pickle.dumps([1, 2]))
    assert _run("analyze", str(tmp_path / "p.npy")).returncode == 2
    vec = tmp_path / "v.npy"
    np.save(vec, np.ones(5, np.float32))
    out = _run("analyze", str(vec))
    assert out.returncode == 2 and "need a 2-D float array" in out.stderr
    assert _run("demo", "--backend", "tpu").returncode == 2  # argparse usage error


def test_a_matrix_with_nan_exits_1_but_prints_its_row(tmp_path):
    bad = np.ones((50, 20), np.float32)
    bad[0, 0] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    out = _run("analyze", str(tmp_path / "bad.npy"))
    assert out.returncode == 1 and "error" in out.stdout


def test_synth_then_plan(tmp_path, capsys):
    out = tmp_path / "mini"
    assert (
        main(
            [
                "synth",
                "gpt-oss",
                str(out),
                "--layers",
                "1",
                "--experts",
                "8",
                "--trap",
                "model.layers.0.mlp.experts.down_proj[1]=2",
            ]
        )
        == 0
    )
    assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    capsys.readouterr()
    assert main(["plan", str(out), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["matrices"] == 4 + 1 + 16 + 2 and plan["by_kind"]["expert_down"] == 8
    assert plan["largest"] == "model.embed_tokens.weight"
    assert plan["bytes_to_read"] == sum(u["bytes"] for u in plan["units"])
    assert main(["plan", str(out)]) == 0
    table = capsys.readouterr().out
    assert "matrices to audit: 23" in table and "MXFP4 scales (read with their blocks)" in table


def test_plan_and_synth_user_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    missing = _run("plan", "openai/gpt-oss-20b")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "hf download openai/gpt-oss-20b" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    refused = _run("plan", str(tmp_path / "pytorch_model.bin"))
    assert refused.returncode == 2 and "pickle-based checkpoints are refused" in refused.stderr
    bad = _run("synth", "gpt-oss", str(tmp_path / "x"), "--trap", "no.such.weight=1")
    assert bad.returncode == 2 and "no such matrix to plant traps in" in bad.stderr
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    out = _run("plan", str(truncated))
    assert out.returncode == 2 and "header length 16 larger than the file" in out.stderr


def _commands() -> list[list[str]]:
    """Every leaf command of the parser, e.g. ["report", "show"]."""
    from llm_audit.cli import build_parser

    def leaves(parser, path):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return [(path, parser)]
        return [leaf for name, p in subs[0].choices.items() for leaf in leaves(p, [*path, name])]

    return leaves(build_parser(), [])


def test_every_command_has_examples_and_json_output(capsys):
    commands = _commands()
    assert len(commands) >= 10
    for path, parser in commands:
        with pytest.raises(SystemExit) as done:
            main([*path, "--help"])
        assert done.value.code == 0
        assert "examples:\n  llm-audit" in capsys.readouterr().out, path
        formats = [a for a in parser._actions if "--format" in a.option_strings]
        assert formats and "json" in formats[0].choices, f"{path}: no --format json"


def _synopses() -> dict[str, str]:
    """The README's synopsis of each command: `llm-audit CMD ...` lines of its text
    blocks with their indented continuations, joined per command."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found: dict[str, str] = {}
    for block in re.findall(r"```text\n(.*?)```", readme, re.S):
        command = None
        for line in block.splitlines():
            if line.startswith("llm-audit "):
                words = line.split()[1:3]
                command = " ".join(w for w in words if re.fullmatch(r"[a-z]+", w))
                found[command] = found.get(command, "") + " " + line
            elif line.startswith("  ") and command:
                found[command] += " " + line
            else:
                command = None
    return found


def test_every_option_is_in_the_readme_synopsis():
    """The README's synopses list every option `--help` shows (they fell behind)."""
    synopses = _synopses()
    for path, parser in _commands():
        name = " ".join(path)
        key = next((k for k in (name, path[0]) if k in synopses), None)
        assert key is not None, f"no synopsis of {name} in README.md"
        options = [a.option_strings for a in parser._actions if a.option_strings]
        missing = [
            o[-1]
            for o in options
            if o[-1] != "--help" and not any(re.search(rf"{s}\b", synopses[key]) for s in o)
        ]
        assert not missing, f"{name}: README synopsis lacks {missing}"


def test_synth_bundled_is_the_demo_model(tmp_path, capsys):
    from llm_audit.source.synth import write_bundled_model

    reference = write_bundled_model(tmp_path / "reference")
    assert main(["synth", "gpt-oss", str(tmp_path / "cli"), "--bundled", "--format", "json"]) == 0
    written = json.loads(capsys.readouterr().out)
    names = sorted(Path(f).name for f in written["files"])
    assert names == sorted(p.name for p in reference.iterdir())
    for name in names:
        assert (tmp_path / "cli" / name).read_bytes() == (reference / name).read_bytes(), name
    refused = _run("synth", "gpt-oss", str(tmp_path / "x"), "--bundled", "--layers", "1")
    assert refused.returncode == 2 and "give no other options" in refused.stderr
