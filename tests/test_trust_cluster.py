"""The local Ray an audit starts is closed: loopback only, a private folder (issue 13)."""

from __future__ import annotations

import stat

import pytest

from llm_audit.run.cluster import _LOCAL_FOLDERS, connect, shutdown_local

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_local_ray_listens_on_loopback_only_in_a_private_folder():
    import ray

    psutil = pytest.importorskip("psutil")  # installed with Ray's default extras
    assert connect(None) is True
    try:
        folder = _LOCAL_FOLDERS[-1]
        me = psutil.Process()
        listening = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                sockets = proc.net_connections(kind="inet")
            except psutil.Error:
                continue
            listening += [(proc.name(), c.laddr) for c in sockets if c.status == "LISTEN"]
        names = {name for name, _ in listening}
        assert {"gcs_server", "raylet"} <= names, names
        exposed = [(name, addr) for name, addr in listening if addr.ip not in LOOPBACK]
        assert exposed == []
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        temp = ray._private.worker._global_node.get_temp_dir_path()
        assert temp.startswith(str(folder))
        assert ray.get(ray.remote(lambda: 1).remote()) == 1  # and it works
    finally:
        shutdown_local()
    assert not folder.exists()
