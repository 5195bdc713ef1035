"""`llm-audit audit` on a local Ray cluster: report contents, determinism, faults, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llm_audit.cli import main
from llm_audit.errors import AuditError
from llm_audit.report.schema import LAYERS_SCHEMA, RUN_DEPENDENT, SCHEMA_VERSION
from llm_audit.run.audit import run_audit
from llm_audit.run.config import AuditConfig, load_config
from llm_audit.source.synth import PLANTED, write_bundled_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_bundled_model(tmp_path_factory.mktemp("model") / "gpt-oss-mini")


def _comparable(folder: Path) -> list[dict]:
    table = pq.read_table(folder / "layers.parquet")
    return table.drop_columns(list(RUN_DEPENDENT)).to_pylist()


@pytest.fixture(scope="module")
def report(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "r"
    result = run_audit(str(model), out, AuditConfig(seed=3), quiet=True)
    assert result.failed == 0 and result.matrices == 44
    return out


def test_report_files_and_schema(report, model):
    layers = pq.read_table(report / "layers.parquet")
    assert layers.schema.equals(LAYERS_SCHEMA, check_metadata=False)
    assert layers.schema.metadata[b"llm_audit_schema"] == SCHEMA_VERSION.encode()
    rows = layers.to_pylist()
    assert len(rows) == 44 and len({r["matrix"] for r in rows}) == 44
    traps = {r["matrix"]: r["rand_num_spikes"] for r in rows if r["rand_num_spikes"]}
    assert traps == PLANTED
    expert = next(r for r in rows if r["matrix"] == "model.layers.1.mlp.experts.down_proj[5]")
    assert (expert["kind"], expert["layer"], expert["expert"], expert["source_dtype"]) == (
        "expert_down",
        1,
        5,
        "MXFP4",
    )
    assert expert["seed"] == 3 and expert["seconds"] > 0 and expert["node"]
    assert [abs(e["value"]) for e in expert["trap_entries"]] == [1.0] * 4
    spectra = pq.read_table(report / "spectra.parquet").to_pylist()
    assert [s["matrix"] for s in spectra] == [r["matrix"] for r in rows]
    assert len(spectra[0]["evals"]) == rows[0]["M"] and spectra[0]["rand_evals"]
    assert not (report / "parts").exists()


def test_manifest_and_summary(report, model):
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 3
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["tool_version"]
    assert [f["name"] for f in manifest["model"]["files"]] == sorted(
        p.name for p in model.glob("*.safetensors")
    )
    assert all(len(f["header_sha256"]) == 64 for f in manifest["model"]["files"])
    assert manifest["config"]["seed"] == 3 and manifest["cluster"]["resources"]["CPU"] >= 1
    assert set(manifest["timings"]) == {"plan_s", "connect_s", "compute_s", "finalize_s"}
    assert manifest["backends"] == ["numpy"]
    from llm_audit.source.checkpoint import open_checkpoint
    from llm_audit.source.reference import resolve_model

    planned = open_checkpoint(resolve_model(str(model))).plan(8).bytes_to_read()
    assert manifest["io"]["bytes_read"] == planned  # each matrix's bytes, read once
    assert manifest["io"]["bytes_on_disk"] == sum(f["bytes"] for f in manifest["model"]["files"])
    summary = json.loads((report / "summary.json").read_text())
    assert summary["audited"] == 44 and summary["failed"] == 0
    assert summary["matrices_with_traps"] == 3 and summary["total_traps"] == 9
    assert set(summary["mean_alpha_by_kind"]) >= {"expert_down", "q_proj", "embedding"}


def test_one_worker_and_two_workers_give_the_same_report(report, model, tmp_path):
    """Bit for bit, with the same BLAS threads per task (cpus_per_task): one task at a time
    against two at once. (Other thread counts change float sums in the last bits.)"""
    one = tmp_path / "one"
    run_audit(str(model), one, AuditConfig(seed=3, max_in_flight=1), quiet=True)
    assert _comparable(one) == _comparable(report)


def test_a_failing_matrix_is_an_error_row_and_the_run_goes_on(model, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in model.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    from llm_audit.source.checkpoint import open_checkpoint
    from llm_audit.source.reference import resolve_model

    checkpoint = open_checkpoint(resolve_model(str(broken)))
    scales = checkpoint.tensors["model.layers.0.mlp.experts.down_proj_scales"]
    shard = checkpoint.where["model.layers.0.mlp.experts.down_proj_scales"]
    with open(shard, "r+b") as handle:  # expert 1's first scale byte -> 255 (NaN in E8M0)
        handle.seek(scales.start + scales.nbytes // 8)
        handle.write(b"\xff")
    code = main(["audit", str(broken), "--out", str(tmp_path / "r"), "--quiet", "--format", "json"])
    assert code == 1
    rows = {r["matrix"]: r for r in pq.read_table(tmp_path / "r" / "layers.parquet").to_pylist()}
    bad = rows["model.layers.0.mlp.experts.down_proj[1]"]
    assert bad["status"] == "error" and "scale byte 255" in bad["error"]
    assert bad["error_kind"] == "data"
    assert sum(r["status"] == "ok" for r in rows.values()) == 43
    summary = json.loads(capsys.readouterr().out)  # stdout is JSON and nothing else
    assert summary["failed"] == 1 and summary["failed_by_kind"] == {"data": 1}
    assert summary["report"] == str(tmp_path / "r") and summary["bugs"] == 0


def _own_ray_with_state_api() -> str:
    """A local Ray of the test's own, with the dashboard that Ray's state API talks to."""
    import ray

    context = ray.init(
        address="local", num_cpus=2, include_dashboard=True, dashboard_port=0, log_to_driver=False
    )
    return "http://" + context.address_info["webui_url"]


def test_a_killed_worker_is_retried_and_the_report_is_complete(model, tmp_path):
    """A worker killed from outside (SIGKILL to the PID Ray's state API gives for a running
    task), the way a real fault happens: Ray re-runs the task and the report is whole."""
    import threading

    import ray
    from ray.util.state import list_tasks

    api = _own_ray_with_state_api()
    try:
        done: dict = {}
        audit = threading.Thread(
            target=lambda: done.update(
                result=run_audit(str(model), tmp_path / "r", AuditConfig(seed=3), quiet=True)
            )
        )
        audit.start()
        killed = None
        while killed is None and audit.is_alive():
            running = list_tasks(
                address=api, filters=[("name", "=", "run_task"), ("state", "=", "RUNNING")]
            )
            for task in running:
                if task.worker_pid:
                    os.kill(task.worker_pid, signal.SIGKILL)
                    killed = task.task_id
                    break
        audit.join()
        assert killed is not None, "no task was seen running"
        attempts = list_tasks(address=api, filters=[("task_id", "=", killed)], detail=True)
    finally:
        ray.shutdown()
    assert max(a.attempt_number for a in attempts) >= 1  # the killed task ran again
    result = done["result"]
    assert result.failed == 0 and result.matrices == 44
    rows = pq.read_table(tmp_path / "r" / "layers.parquet").to_pylist()
    assert all(r["status"] == "ok" for r in rows)
    assert {r["matrix"]: r["rand_num_spikes"] for r in rows if r["rand_num_spikes"]} == PLANTED


def test_a_bug_on_a_worker_keeps_its_traceback_and_fails_the_run(model, tmp_path):
    """An unexpected exception in the analysis is not a bad matrix: its rows say error
    (kind 'bug'), errors.log keeps the whole traceback, summary.json counts it, exit 1."""
    out = tmp_path / "r"
    # The bug is planted in every process of the run, Ray's workers included, by a
    # sitecustomize module (Python imports it at start-up from PYTHONPATH).
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('LLM_AUDIT_TEST_BUG'):\n"
        "    import llm_audit.spectral.analyze as analyze\n"
        "    def broken(*args, **kwargs):\n"
        "        raise ZeroDivisionError('planted bug')\n"
        "    analyze.fit_powerlaw = broken\n"
    )
    env = dict(os.environ, LLM_AUDIT_TEST_BUG="1")
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "llm_audit", "audit", str(model), "--out", str(out), "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = pq.read_table(out / "layers.parquet").to_pylist()
    assert rows and all(r["status"] == "error" and r["error_kind"] == "bug" for r in rows)
    assert "ZeroDivisionError: planted bug" in rows[0]["error"]
    log = (out / "errors.log").read_text()
    assert "\x1b" not in log  # Ray colours its task name; the log is plain text
    assert "in run_task" in log and "in broken" in log and "planted bug" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bugs"] == len(rows) == summary["failed"]
    assert "bugs: 44" in proc.stdout


def _audit_command(model: Path | str, out: Path, *options: str) -> list[str]:
    """`llm-audit audit MODEL --out OUT ...` as a separate process (its own Ray driver)."""
    return [sys.executable, "-m", "llm_audit.cli", "audit", str(model), "--out", str(out), *options]


def test_killed_driver_then_resume_computes_only_the_rest(model, tmp_path, report):
    out = tmp_path / "r"
    proc = subprocess.Popen(
        _audit_command(model, out, "--seed", "3", "--quiet"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "parts").glob("layers-*"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
    proc.wait()
    done_before = len(list((out / "parts").glob("layers-*")))
    assert 1 <= done_before < 44, "the run should have been killed mid-way"
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    result = run_audit(str(model), out, AuditConfig(seed=3), resume=True, quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from"] == done_before
    assert manifest["computed_this_run"] == 44 - done_before
    assert result.matrices == 44 and manifest["status"] == "complete"
    assert _comparable(out) == _comparable(report)


def test_existing_report_needs_resume(report, model):
    with pytest.raises(AuditError, match="already holds a report"):
        run_audit(str(model), report, AuditConfig(), quiet=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _partial_copy(report: Path, dest: Path) -> Path:
    """`report` as a killed run leaves it: manifest 'running', rows only in a part."""
    import shutil

    shutil.copytree(report, dest)
    (dest / "parts").mkdir()
    (dest / "layers.parquet").rename(dest / "parts" / f"layers-{'a' * 32}.parquet")
    (dest / "spectra.parquet").rename(dest / "parts" / f"spectra-{'a' * 32}.parquet")
    (dest / "summary.json").unlink()
    manifest = json.loads((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(json.dumps(manifest | {"status": "running"}))
    return dest


def test_resume_with_another_model_of_the_same_names_is_refused(report, tmp_path):
    from dataclasses import replace

    from llm_audit.source.synth import BUNDLED, synth_gpt_oss

    other = synth_gpt_oss(tmp_path / "other", replace(BUNDLED, seed=7))  # same names, shapes
    out = _partial_copy(report, tmp_path / "r")
    before = _snapshot(out)
    with pytest.raises(AuditError, match=r"another model: .*safetensors.* differs"):
        run_audit(str(other), out, AuditConfig(seed=3), resume=True, quiet=True)
    assert _snapshot(out) == before  # nothing touched, the manifest still names model A


def test_resume_with_another_seed_or_selection_is_refused(report, model, tmp_path):
    out = _partial_copy(report, tmp_path / "r")
    before = _snapshot(out)
    with pytest.raises(AuditError, match="computed with seed=3, this run has seed=7"):
        run_audit(str(model), out, AuditConfig(seed=7), resume=True, quiet=True)
    with pytest.raises(AuditError, match=r"with exclude=\[\], this run has exclude=\['x'\]"):
        run_audit(str(model), out, AuditConfig(seed=3, exclude=["x"]), resume=True, quiet=True)
    assert _snapshot(out) == before
    proc = subprocess.run(
        _audit_command(model, out, "--resume", "--seed", "7"), capture_output=True, text=True
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_out_refuses_a_users_folder_and_deletes_nothing(model, tmp_path):
    out = tmp_path / "thesis"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "thesis.tex").write_text("\\chapter{One}")
    (out / "summary.json").write_text('{"mine": true}')
    before = _snapshot(out)
    for options in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(AuditError, match="not an llm-audit report; refusing"):
            run_audit(str(model), out, AuditConfig(), quiet=True, **options)
    (tmp_path / "file").write_text("x")
    with pytest.raises(AuditError, match="not a folder"):
        run_audit(str(model), tmp_path / "file", AuditConfig(), quiet=True)
    assert _snapshot(out) == before


def test_a_symlinked_parts_folder_is_refused_and_its_target_kept(report, model, tmp_path):
    out = _partial_copy(report, tmp_path / "r")
    elsewhere = tmp_path / "elsewhere"
    (out / "parts").rename(elsewhere)
    (elsewhere / "notes.txt").write_text("keep me")
    (out / "parts").symlink_to(elsewhere)
    before = _snapshot(elsewhere)
    for options in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(AuditError, match="parts: a symlink inside a report folder"):
            run_audit(str(model), out, AuditConfig(seed=3), quiet=True, **options)
    assert _snapshot(elsewhere) == before


def test_overwrite_removes_only_what_the_report_owns(report, tmp_path):
    import shutil

    from llm_audit.report.writer import remove_report

    out = _partial_copy(report, tmp_path / "r")
    shutil.copy(out / "manifest.json", out / "parts" / "mine.json")
    (out / "README.md").write_text("my notes")
    (out / ".manifest.json.0123456789abcdef0123456789abcdef.tmp").write_text("killed write")
    remove_report(out)
    assert sorted(_snapshot(out)) == ["README.md", "parts/mine.json"]


def test_an_empty_or_foreign_part_is_redone_not_fatal(report, tmp_path):
    from llm_audit.report.writer import ReportWriter

    out = _partial_copy(report, tmp_path / "r")
    (out / "parts" / f"layers-{'b' * 32}.parquet").write_bytes(b"")
    (out / "parts" / f"spectra-{'b' * 32}.parquet").write_bytes(b"")
    (out / "parts" / f"layers-{'c' * 32}.parquet").write_bytes(b"PAR1 not really")
    writer = ReportWriter(out)
    assert len(writer.done()) == 44
    table = writer.finalize(
        [r["matrix"] for r in pq.read_table(report / "layers.parquet").to_pylist()]
    )
    assert table.num_rows == 44 and not (out / "parts").exists()


def test_resume_retry_failed_recomputes_error_rows(report, model, tmp_path):
    import pyarrow as pa

    out = _partial_copy(report, tmp_path / "r")
    part = out / "parts" / f"layers-{'a' * 32}.parquet"
    table = pq.read_table(part)
    status = table["status"].to_pylist()
    status[0] = status[5] = "error"
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    pq.write_table(table, part)
    result = run_audit(
        str(model), out, AuditConfig(seed=3), resume=True, retry_failed=True, quiet=True
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from"] == 42 and manifest["computed_this_run"] == 2
    assert result.failed == 0 and manifest["status"] == "complete"
    assert _comparable(out) == _comparable(report)


def test_include_exclude(model, tmp_path):
    config = AuditConfig(include=[r"layers\.1\."], exclude=[r"experts"])
    result = run_audit(str(model), tmp_path / "r", config, quiet=True)
    matrices = [r["matrix"] for r in pq.read_table(tmp_path / "r" / "layers.parquet").to_pylist()]
    assert result.matrices == 5 and all(".layers.1." in m and "experts" not in m for m in matrices)


def test_config_files_validate(tmp_path):
    root = Path(__file__).resolve().parent.parent / "configs"
    for name in ("default.yaml", "gpt-oss-20b.yaml", "gpt-oss-120b.yaml"):
        assert isinstance(load_config(root / name), AuditConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("exlude: [x]\n")
    with pytest.raises(AuditError, match=r"bad.yaml: unknown key\(s\) 'exlude'"):
        load_config(bad)
    bad.write_text("seed: -1\n")
    with pytest.raises(AuditError, match="seed must be a non-negative integer"):
        load_config(bad)
    bad.write_text("include: ['(']\n")
    with pytest.raises(AuditError, match="bad regex"):
        load_config(bad)
    bad.write_text("rand_route: fast\n")
    with pytest.raises(AuditError, match="rand_route must be one of"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(AuditError, match="mapping"):
        load_config(bad)
    out = subprocess.run(
        _audit_command("x", tmp_path / "o", "--config", str(bad)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


def test_node_check_names_missing_or_different_files(model, tmp_path, monkeypatch):
    import ray

    from llm_audit.run.cluster import check_files
    from llm_audit.source.header import read_header

    monkeypatch.setattr(
        ray, "get_runtime_context", lambda: type("C", (), {"get_node_id": lambda self: "node-a"})()
    )
    shard = sorted(model.glob("*.safetensors"))[0]
    header = read_header(shard)
    ok = [(str(shard), header.file_size, header.header_sha256)]
    assert check_files(ok) == ("node-a", [])
    missing = (str(tmp_path / "gone.safetensors"), 1, "x")
    _, problems = check_files([missing, (str(shard), header.file_size, "0" * 64)])
    assert "gone.safetensors: cannot open" in problems[0]
    assert problems[1].endswith("differs from the driver's copy")


def test_finalize_ignores_and_removes_a_killed_write(tmp_path):
    from llm_audit.report.writer import ReportWriter

    writer = ReportWriter(tmp_path)
    writer.add([{"matrix": "a", "status": "ok", "evals": [1.0, 2.0], "rand_evals": None}])
    (writer.parts / f".layers-{'d' * 32}.parquet.{'e' * 32}.tmp").write_bytes(b"half a file")
    assert writer.done() == {"a"}
    table = writer.finalize(["a"])
    assert table["matrix"].to_pylist() == ["a"] and not writer.parts.exists()


def test_an_audit_beside_another_local_ray_starts_its_own(model, tmp_path):
    """A second local audit must not attach to the first one's cluster (and be refused)."""
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import ray, time; ray.init(address='local', num_cpus=1); print('up', flush=True);"
            " time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        assert first.stdout.readline().strip() == "up"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run(
            _audit_command(model, tmp_path / "r", "--quiet"),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
        assert manifest["cluster"]["address"] == "local" and manifest["status"] == "complete"
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_resume_after_a_model_file_was_modified_is_refused(report, model, tmp_path):
    """Five changed bytes keep a shard's size, header and (likely) its sampled blocks: the
    modification time still tells, and the rows computed before are not trusted."""
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(model, copy)  # copytree keeps modification times
    out = _partial_copy(report, tmp_path / "r")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["files"] = [
        f | {"modified_ns": (copy / f["name"]).stat().st_mtime_ns}
        for f in manifest["model"]["files"]
    ]
    (out / "manifest.json").write_text(json.dumps(manifest))
    shard = sorted(copy.glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    before = _snapshot(out)
    with pytest.raises(AuditError, match=rf"{shard.name} was modified after this report"):
        run_audit(str(copy), out, AuditConfig(seed=3), resume=True, quiet=True)
    assert _snapshot(out) == before


def test_refusals_before_ray_starts(model, tmp_path, monkeypatch, capsys):
    """A folder another run is writing, a relative --out inside a Ray job's temporary
    working dir, a selection of nothing, an --out the file system refuses: one line."""
    from llm_audit.report.writer import lock_report

    busy = tmp_path / "busy"
    with lock_report(busy), pytest.raises(AuditError, match="another llm-audit run is writing"):
        run_audit(str(model), busy, AuditConfig(), quiet=True)
    with pytest.raises(AuditError, match="none of the 44 planned matrices"):
        run_audit(str(model), tmp_path / "none", AuditConfig(include=["^nothing$"]), quiet=True)
    job = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    with pytest.raises(AuditError, match="give an absolute --out"):
        run_audit(str(model), "rel-report", AuditConfig(), quiet=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert main(["audit", str(model), "--out", "afile/sub"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-audit: error: afile") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: 100000000000000000000000000000000000000000000000000", "seed must be"),
        ("max_retries: 100000000000000000000", "max_retries must be"),
        ("cpus_per_task: .inf", "cpus_per_task must be"),
        ("exclude: ['(.*.*)*Q']", "nests a repetition"),
        ("kinds: [{pattern: '(a+)+$', kind: x}]", "nests a repetition"),
        # alternatives that can start alike, in a repetition: 1.6x slower per character
        ("include: ['([\\w.]|[\\w.][\\w.])*Z']", "alternatives that can start alike"),
        ("exclude: ['(a|ab)*c']", "alternatives that can start alike"),
    ],
)
def test_config_values_that_would_crash_or_hang_later_are_refused(tmp_path, text, message):
    path = tmp_path / "audit.yaml"
    path.write_text(text + "\n")
    with pytest.raises(AuditError, match=message):
        load_config(path)


@pytest.mark.parametrize(
    "pattern",
    [
        r"(q|k|v)_proj",
        r"mlp\.(gate|up)_proj",
        r"(?:layers\.(?:0|1)\.)+",
        r"(ab|cd)*",
        r"(foo|fob)+",
    ],
)
def test_alternatives_that_start_apart_are_not_slow(pattern):
    from llm_audit.inputs import slow_regex

    assert not slow_regex(pattern)


def test_an_unreachable_cluster_or_an_impossible_task_is_one_line(model, tmp_path, monkeypatch):
    """Ray retries a dead address for minutes: refused in seconds, and the report folder
    is finalized as failed (not left 'running', which would need --resume)."""
    out = tmp_path / "r"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    start = time.monotonic()
    with pytest.raises(AuditError, match=r"cannot reach the Ray cluster at '127.0.0.1:1' \(\$RAY"):
        run_audit(str(model), out, AuditConfig(), quiet=True)
    assert time.monotonic() - start < 60
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    monkeypatch.setenv("RAY_ADDRESS", "http://x:y:z")
    with pytest.raises(AuditError, match="is not HOST:PORT"):
        run_audit(str(model), tmp_path / "r2", AuditConfig(), quiet=True)
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(AuditError, match="cpus_per_task 1e\\+06 is more than any node"):
        run_audit(str(model), tmp_path / "r3", AuditConfig(cpus_per_task=1e6), quiet=True)


def test_sigterm_finalizes_a_partial_report_like_ctrl_c(model, tmp_path):
    """What `timeout`, a cancelled CI job and `ray job stop` send: the run stops, the
    report holds every finished matrix and says how many this run computed."""
    out = tmp_path / "r"
    proc = subprocess.Popen(
        _audit_command(model, out, "--seed", "3", "--quiet"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((out / "parts").glob("layers-*"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    manifest = json.loads((out / "manifest.json").read_text())
    rows = pq.read_table(out / "layers.parquet").num_rows
    assert manifest["status"] == "interrupted" and manifest["computed_this_run"] == rows
    assert 1 <= rows < 44 and "complete it with --resume" in err


def test_rows_are_counted_with_the_part_that_holds_them(tmp_path, monkeypatch):
    """An interrupt arriving just after a part is renamed into place (SIGTERM during
    `add`) must not leave rows in the report that `computed_this_run` leaves out; one
    arriving before it must not count rows that are not there."""
    from llm_audit.report import writer as writer_module
    from llm_audit.report.writer import ReportWriter

    real = writer_module.write_atomic
    rows = [{"matrix": f"m{i}", "status": "ok"} for i in range(2)]
    for after in (True, False):

        def interrupted(path, write, after=after):
            if after or "layers-" not in path.name:
                real(path, write)
            if "layers-" in path.name:
                raise KeyboardInterrupt

        monkeypatch.setattr(writer_module, "write_atomic", interrupted)
        writer = ReportWriter(tmp_path / str(after))
        with pytest.raises(KeyboardInterrupt):
            writer.add(rows)
        parts = list((tmp_path / str(after) / "parts").glob("layers-*"))
        assert writer.rows_added == (2 if after else 0) == 2 * len(parts)
