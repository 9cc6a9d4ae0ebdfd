"""Finding checkpoints: local folders and files, hub repos at a revision, folders of many.

A configured source is one of:

- a checkpoint: an HF folder (safetensors or ``pytorch_model.bin``, single or
  sharded), a DeepSpeed ZeRO training folder, or a ``.ckpt``/``.bin``/
  ``.safetensors`` file;
- a folder of checkpoints (``step900/``, ``step1000/``, ``checkpoint-500/`` ...),
  expanded into its children sorted numerically (``step900`` before
  ``step1000``);
- a hub repo at a revision, ``org/name@rev`` (or ``hf://org/name@rev``),
  resolved through ``huggingface_hub`` and its cache (offline when cached).

An existing local path always wins over a hub reading of the same string. A
:class:`Selector` then narrows the resolved list (explicit names, a step
range, every n-th, the last n), always in training order.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .checkpoints import CheckpointError, is_checkpoint

__all__ = ["Selector", "step_of", "step_key", "resolve_sources"]


def step_key(p: Path) -> tuple:
    """Sort key that orders ``step900`` before ``step1000`` (numbers compared as numbers)."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", p.name) if t)


def step_of(p: Path) -> int | None:
    """The training step in a checkpoint's name (the last number in it), if any."""
    nums = re.findall(r"\d+", p.stem if p.is_file() else p.name)
    return int(nums[-1]) if nums else None


@dataclass
class Selector:
    """Which of the resolved checkpoints to keep, applied in this order.

    ``names``: keep only these folder/file names. ``steps``: ``[lo, hi]``
    inclusive range of steps (from the names). ``every``: keep every n-th
    counting back from the newest, so the newest is always kept. ``last``:
    keep the newest n.
    """

    names: Sequence[str] | None = None
    steps: Sequence[int] | None = None
    every: int | None = None
    last: int | None = None

    def apply(self, paths: list[Path]) -> list[Path]:
        if self.names:
            by_name = {p.name: p for p in paths}
            missing = [n for n in self.names if n not in by_name]
            if missing:
                raise CheckpointError(f"checkpoints.names: {missing} not found among "
                                      f"{[p.name for p in paths][:10]}")
            paths = [p for p in paths if p.name in set(self.names)]
        if self.steps:
            if len(self.steps) != 2:
                raise CheckpointError(f"checkpoints.steps must be [lo, hi], got {list(self.steps)}")
            lo, hi = self.steps
            unnumbered = [p.name for p in paths if step_of(p) is None]
            if unnumbered:
                raise CheckpointError(f"checkpoints.steps: {unnumbered[:3]} have no step number in their name")
            paths = [p for p in paths if lo <= step_of(p) <= hi]
        if self.every:
            paths = paths[::-1][:: self.every][::-1]
        if self.last:
            paths = paths[-self.last:]
        return paths


def _expand_local(p: Path) -> list[Path]:
    if is_checkpoint(p):
        return [p]
    if p.is_dir():
        kids = sorted((c for c in p.iterdir() if not c.name.startswith(".") and is_checkpoint(c)), key=step_key)
        if kids:
            return kids
        raise CheckpointError(f"checkpoints.sources: {p} is neither a checkpoint nor a folder of checkpoints "
                              f"(found: {sorted(c.name for c in p.iterdir())[:8]})")
    raise CheckpointError(f"checkpoints.sources: {p} is not a checkpoint file "
                          f"(expected one of .safetensors, .bin, .ckpt, .pt)")


def resolve_sources(sources: Iterable[str | Path], selector: Selector | None = None,
                    hub_cache: str | None = None) -> list[Path]:
    """Resolve configured sources into checkpoint paths (local), in training order."""
    from .hub import parse_hub_source, resolve_hub_source

    out: list[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if p.exists():
            out.extend(_expand_local(p))
            continue
        hub = parse_hub_source(str(s))
        if hub is None:
            raise CheckpointError(f"checkpoints.sources: {s} does not exist (and is not a hub repo "
                                  "spec like org/name@revision)")
        out.extend(_expand_local(resolve_hub_source(*hub, cache_dir=hub_cache)))
    if selector is not None:
        out = selector.apply(out)
    if not out:
        raise CheckpointError("checkpoints.sources: no checkpoints left after selection")
    return out
