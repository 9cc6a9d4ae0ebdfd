"""Errors a run reports to its user by name (the CLI prints them without a traceback).

Each message names the file, key or rank at fault and what to do next; the exit
codes the CLI gives them are listed in docs/reliability.md.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = ["CheckpointError", "SourceReadError", "DiskFullError", "RankLostError", "disk_full"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or incompatible; the message names it."""


class SourceReadError(CheckpointError):
    """A source's tensor data failed to read after its metadata was accepted (a file damaged mid-run).

    Not a failed trial but the end of the search: every later trial would read the same bytes, and a
    merge of garbage must never be scored.
    """


class DiskFullError(OSError):
    """A write ran out of space (``ENOSPC``); the message names the path, the bytes needed and free."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.args[1])


class RankLostError(RuntimeError):
    """A rank died or stopped answering mid-run; the message says which, and how to resume."""


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def disk_full(path: str | os.PathLike, needed: int | None, what: str) -> DiskFullError:
    """The :class:`DiskFullError` for writing ``what`` (``needed`` bytes, if known) at ``path``."""
    path = Path(path)
    free = _free_bytes(path.parent)
    need = f"{needed:,} bytes" if needed is not None else "more space"
    has = f", {free:,} bytes free" if free is not None else ""
    return DiskFullError(
        f"no space left on the device of {path} while writing {what}: it needs {need}{has}. Nothing partial "
        f"was left in its place (the earlier version, if any, is intact). Free space there, or give another "
        f"output_dir=..., then run the same command again: the search resumes from its ledger")
