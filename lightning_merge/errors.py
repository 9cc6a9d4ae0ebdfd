"""The error every checkpoint reader raises (re-exported by ``checkpoints.py``)."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or incompatible; the message names it."""
