"""`ray job submit -- llm-audit audit ...` on a real two-node Ray cluster (one machine).

One test, about 40 s: `ray start --head` (with the job server), a second node with a
custom resource, a job submission with `--working-dir .`, the report checked for units
that ran on both nodes, and the cluster stopped. The cluster runs in a temp folder of its
own, and only the processes whose command line names that folder are stopped: `ray stop`
stops every Ray process on the machine, and once killed a grok run going beside the suite.
Token auth is disabled for this private test cluster (Ray 2.60 enables it by default for
`ray start`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llm_audit.source.synth import PLANTED, write_bundled_model

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    ray = shutil.which("ray", path=str(BIN)) or "ray"
    return subprocess.run(
        [ray, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _stop_processes_of(folder: str, gcs_port: int) -> None:
    """SIGTERM, then SIGKILL, every process of the test cluster: whose command line names
    its temp `folder` or its GCS address (Ray's client server names only that), and their
    descendants (Ray's dashboard agent renames itself `ray::DashboardAgent`)."""
    gcs = re.compile(rf"^--address=[\d.]+:{gcs_port}$")
    import psutil

    def ours() -> list[psutil.Process]:
        found = set()
        for proc in psutil.process_iter(["cmdline"]):
            args = proc.info["cmdline"] or []
            if any(folder in arg or gcs.match(arg) for arg in args):
                found.add(proc)
                with contextlib.suppress(psutil.NoSuchProcess):
                    found.update(proc.children(recursive=True))
        return list(found)

    procs = ours()
    for proc in procs:
        proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=20)
    for proc in alive + ours():
        proc.kill()


@pytest.fixture
def cluster():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ['PATH']}")
    env["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="empty-hf-cache-")  # jobs must bring theirs
    env.pop("RAY_ADDRESS", None)
    # every port free: another Ray on this machine (a user's) holds the default ones
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    # short: Ray's unix socket paths under it must stay below 108 bytes
    temp = tempfile.mkdtemp(prefix="llmaudit-ray-", dir="/tmp")
    head = _ray(
        "start",
        "--head",
        f"--temp-dir={temp}",
        f"--port={port}",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={_free_port()}",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=1",
        env=env,
    )
    assert head.returncode == 0, head.stderr[-2000:]
    try:
        worker = _ray(
            "start",
            f"--address=127.0.0.1:{port}",
            "--num-cpus=1",
            '--resources={"node2": 1}',
            f"--dashboard-agent-listen-port={_free_port()}",
            env=env,
        )
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        _stop_processes_of(temp, port)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(env["HF_HUB_CACHE"], ignore_errors=True)


def test_ray_job_submit_audits_on_both_nodes(cluster, tmp_path):
    """The README's cluster command: a hub id found in the cache that the job's
    runtime_env names (the cluster itself was started pointing at an empty cache)."""
    env, address = cluster
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / "models--acme--tiny-gpt-oss"
    write_bundled_model(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    runtime_env = json.dumps({"env_vars": {"HF_HUB_CACHE": str(tmp_path / "hf-cache")}})
    out = tmp_path / "report"
    submit = ["job", "submit", f"--address={address}", "--working-dir", "."]
    submit += ["--runtime-env-json", runtime_env, "--"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # the head's job agent comes up after `ray start`
        job = _ray(
            *submit,
            "llm-audit",
            "audit",
            "acme/tiny-gpt-oss",
            "--out",
            str(out),
            env=env,
            timeout=600,
        )
        if "No available agent" not in job.stdout + job.stderr:
            break
        time.sleep(2)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["cluster"]["address"] == "joined"
    assert manifest["model"]["repo_id"] == "acme/tiny-gpt-oss"
    assert manifest["model"]["revision"] == commit
    assert manifest["cluster"]["resources"].get("node2") == 1
    rows = pq.read_table(out / "layers.parquet").to_pylist()
    assert len(rows) == 44 and all(r["status"] == "ok" for r in rows)
    assert len({r["node"].split("/")[1] for r in rows}) == 2  # units ran on both nodes
    assert {r["matrix"]: r["rand_num_spikes"] for r in rows if r["rand_num_spikes"]} == PLANTED
