"""The Ray cluster an audit runs on: joined, or started locally; every node checked.

Why a check per node: workers read their own bytes from the checkpoint path, so a node
that sees another file there (a stale copy, a half-synced shard) would silently audit
another model. Each alive node reads the headers itself and must see the same files
with the same header hashes before any task is submitted.

Why a closed local Ray: by default Ray's GCS, raylet, agents and workers listen on every
interface, and its temp folder (/tmp/ray: sockets, logs, spilled objects) is open to
every user. An audit started on a shared machine would then accept tasks from the
network. The local cluster we start binds to 127.0.0.1 only and lives in a folder of
mode 0700, removed by `shutdown_local`.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

from ..errors import AuditError
from ..source.checkpoint import Checkpoint
from ..source.header import read_header

OBJECT_STORE_BYTES = 256 * 2**20
CONNECT_TIMEOUT_S = 10.0  # a cluster's head answers a TCP connect in well under a second
LOOPBACK = "127.0.0.1"
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray uses the loopback address
_LOCAL_FOLDERS: list[Path] = []  # private temp folders of the local Rays we started


def connect(address: str | None) -> bool:
    """Join the given (or $RAY_ADDRESS) cluster, or start a local one; True if started.

    Where Ray is already initialized (a caller auditing many checkpoints in one session,
    as `llm-audit grok` does), it is used as it is, and left running.
    """
    import ray

    if ray.is_initialized():
        return False
    given = address or os.environ.get("RAY_ADDRESS")
    if given:
        source = "--address" if address else "$RAY_ADDRESS"
        _reachable(given, source)
        try:
            ray.init(address=given, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise AuditError(
                f"cannot join the Ray cluster at {given!r} ({source}): {first}"
            ) from None
        return False
    # "local": a new cluster of our own. Without it ray.init() attaches to whatever local
    # cluster was started last (another audit, a grok run), and our sizing is refused.
    # Closed: every Ray process binds to the loopback interface only (Ray's own switch for
    # single-machine clusters, read by the processes it spawns), and its sockets, logs and
    # spilled objects live in a folder only this user can enter.
    from ray._private import ray_constants

    previous = os.environ.get(_SINGLE_MACHINE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE] = "0"  # read by the processes Ray spawns
    ray_constants.ENABLE_RAY_CLUSTER = False  # read by this one (set when ray was imported)
    folder = Path(tempfile.mkdtemp(prefix="llm-audit-ray-"))  # mode 0700
    try:
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=OBJECT_STORE_BYTES,
            # our own private cluster: Ray's start-up lines (token authentication, "Started
            # a local Ray instance") are not the user's business; its errors still show
            logging_level=logging.ERROR,
            _node_ip_address=LOOPBACK,
            _temp_dir=str(folder / "ray"),  # Ray opens its own folders to all: ours is closed
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous[1]
        if previous[0] is None:
            del os.environ[_SINGLE_MACHINE]
        else:
            os.environ[_SINGLE_MACHINE] = previous[0]
    _LOCAL_FOLDERS.append(folder)
    return True


def _reachable(address: str, source: str) -> None:
    """Refuse, within seconds, a cluster address nothing answers at: Ray itself retries
    a dead GCS address for minutes, printing only warnings."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdecimal() or not host or "/" in host:
        if address in ("auto", "local"):
            return  # Ray finds (or refuses) those itself
        raise AuditError(
            f"Ray cluster address {address!r} ({source}) is not HOST:PORT or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise AuditError(
            f"cannot reach the Ray cluster at {address!r} ({source}): {reason}"
        ) from None


def shutdown_local() -> None:
    """Stop the local Ray that `connect` started, and remove its private folder."""
    import ray

    ray.shutdown()
    while _LOCAL_FOLDERS:
        shutil.rmtree(_LOCAL_FOLDERS.pop(), ignore_errors=True)


def check_files(files: list[tuple[str, int, str]]) -> tuple[str, list[str]]:
    """Body of the per-node check: which checkpoint files this node lacks or sees differently."""
    import ray

    problems = []
    for path, size, digest in files:
        try:
            header = read_header(path)
        except AuditError as err:
            problems.append(str(err))
            continue
        if header.file_size != size or header.header_sha256 != digest:
            problems.append(f"{path}: differs from the driver's copy")
    return ray.get_runtime_context().get_node_id(), problems


def check_nodes(checkpoint: Checkpoint) -> None:
    """Every alive node must read the same checkpoint files at the same paths."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    files = [(str(p), h.file_size, h.header_sha256) for p, h in checkpoint.headers.items()]
    remote = ray.remote(num_cpus=0)(check_files)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        remote.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(files)
        for n in nodes
    ]
    for node, (node_id, problems) in zip(nodes, ray.get(refs, timeout=300), strict=True):
        if problems:
            name = node.get("NodeManagerAddress", node_id)
            raise AuditError(
                f"node {name} ({node_id[:12]}) cannot read the checkpoint at the "
                f"same path: {problems[0]}"
            )
