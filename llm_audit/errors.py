"""The project's error types: what the CLI reports in one line, without a traceback.

Why a hierarchy of two: everything a user can cause (a bad path, a hostile or broken
checkpoint, a bad option) is an `AuditError`, so the CLI catches exactly that and lets
real bugs surface with their traceback. `CheckpointError` names the file and, where
known, the tensor, because on a 15-shard checkpoint "bad dtype" alone is useless.
"""

from __future__ import annotations

from pathlib import Path


class AuditError(Exception):
    """An error in the user's input or request; its message is one line."""


class CheckpointError(AuditError):
    """A checkpoint file is missing, unsafe, malformed or inconsistent."""

    def __init__(self, path: str | Path, message: str, tensor: str | None = None) -> None:
        self.path = str(path)
        self.tensor = tensor
        self.message = message
        shown = repr(tensor) if tensor is None or len(tensor) <= 120 else repr(tensor[:117] + "...")
        where = f"{self.path}: tensor {shown}" if tensor is not None else self.path
        super().__init__(f"{where}: {message}")
