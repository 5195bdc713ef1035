"""The project's error types: what the CLI reports in one line, without a traceback.

Why one hierarchy: everything a user can cause (a bad path, a hostile or broken
checkpoint, a bad option, a backend this machine lacks) is an `AuditError`, so the CLI
catches exactly that and lets real bugs surface with their traceback. The subclasses say
which input was wrong; `CheckpointError` names the file and, where known, the tensor,
because on a 15-shard checkpoint "bad dtype" alone is useless.
"""

from __future__ import annotations

from pathlib import Path


class AuditError(Exception):
    """An error in the user's input or request; its message is one line."""


class UsageError(AuditError):
    """A command-line request that cannot be carried out as given (exit code 2)."""


class BackendError(AuditError):
    """A requested array backend is not available on this machine."""


class DecodeError(AuditError, ValueError):
    """Stored bytes that do not decode to the numbers their format promises."""


class CheckpointError(AuditError):
    """A checkpoint file is missing, unsafe, malformed or inconsistent."""

    def __init__(self, path: str | Path, message: str, tensor: str | None = None) -> None:
        self.path = str(path)
        self.tensor = tensor
        self.message = message
        shown = repr(tensor) if tensor is None or len(tensor) <= 120 else repr(tensor[:117] + "...")
        where = f"{self.path}: tensor {shown}" if tensor is not None else self.path
        super().__init__(f"{where}: {message}")


class ReportError(AuditError):
    """A report folder that is not a report, or not one this version can read."""
