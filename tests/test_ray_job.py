"""`ray job submit -- llm-audit audit ...` on a real two-node Ray cluster (one machine).

One test, about 40 s: `ray start --head` (with the job server), a second node with a
custom resource, a job submission with `--working-dir .`, the report checked for units
that ran on both nodes, and the cluster stopped. Caution: `ray stop --force` stops every
Ray process on the machine, so do not run this test beside a running audit or grok run
(`ray start --block` + SIGTERM, tried instead, left processes behind). Token auth is
disabled for this private test cluster (Ray 2.60 enables it by default for `ray start`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
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


@pytest.fixture
def cluster():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    port, dashboard = _free_port(), _free_port()
    head = _ray(
        "start",
        "--head",
        f"--port={port}",
        f"--dashboard-port={dashboard}",
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
            env=env,
        )
        assert worker.returncode == 0, worker.stderr[-2000:]
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        _ray("stop", "--force", env=env, timeout=120)


def test_ray_job_submit_audits_on_both_nodes(cluster, tmp_path):
    env, address = cluster
    model = write_bundled_model(tmp_path / "model")
    out = tmp_path / "report"
    submit = ["job", "submit", f"--address={address}", "--working-dir", ".", "--"]
    for _ in range(30):  # the head's job agent comes up a little after `ray start` returns
        job = _ray(
            *submit, "llm-audit", "audit", str(model), "--out", str(out), env=env, timeout=600
        )
        if "No available agent" not in job.stdout + job.stderr:
            break
        time.sleep(2)
    assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["cluster"]["address"] == "joined"
    assert manifest["cluster"]["resources"].get("node2") == 1
    rows = pq.read_table(out / "layers.parquet").to_pylist()
    assert len(rows) == 44 and all(r["status"] == "ok" for r in rows)
    assert len({r["node"].split("/")[1] for r in rows}) == 2  # units ran on both nodes
    assert {r["matrix"]: r["rand_num_spikes"] for r in rows if r["rand_num_spikes"]} == PLANTED
