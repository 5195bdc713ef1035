"""Streamed-shuffle spill folders: removed on failure, and those of killed processes
removed at the next start — only folders the shuffle names, only its bucket files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from llm_audit.spectral.analyze import analyze_streamed
from llm_audit.spectral.shuffle import BucketShuffle, remove_stale_spills, shuffle_generator

KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from llm_audit.spectral.shuffle import BucketShuffle, shuffle_generator
    s = BucketShuffle((64, 8), shuffle_generator(0, "m"), bucket_rows=16, spill_dir=sys.argv[1])
    s.add(np.ones((32, 8), np.float32))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_killed_run_leaves_a_spill_folder_that_the_next_start_removes(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], check=False)
    assert proc.returncode == -9
    (left,) = list(tmp_path.iterdir())
    assert left.name.startswith("llm-audit-shuffle-") and any(left.iterdir())
    mine = tmp_path / "llm-audit-shuffle-notes"  # named like ours, not ours: stays
    mine.mkdir()
    alive = tmp_path / f"{left.name.rsplit('-', 2)[0]}-{os.getpid()}-abcdefgh"  # running
    alive.mkdir()
    with BucketShuffle((16, 4), shuffle_generator(0, "x"), bucket_rows=8, spill_dir=tmp_path):
        pass
    assert not left.exists() and mine.is_dir() and alive.is_dir()


def test_a_stale_folder_holding_anything_else_is_kept_with_its_files(tmp_path):
    subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], check=False)
    (left,) = list(tmp_path.iterdir())
    (left / "thesis.tex").write_text("keep")
    assert remove_stale_spills(tmp_path) == []
    assert [p.name for p in left.iterdir()] == ["thesis.tex"]


def test_a_failed_streamed_analysis_removes_its_spill(tmp_path):
    matrix = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)

    def chunks():
        yield matrix[:32]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        analyze_streamed(chunks, matrix.shape, rows_per_bucket=16, spill_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
