"""An ordered series of checkpoints (oldest first), checked to agree before any heavy work.

:class:`CheckpointSeries` opens its sources (``sources.py`` resolves hub repos,
folders of checkpoints and selectors; ``checkpoints.py`` opens each one) and
refuses a series whose tensors disagree -- names, shapes, non-float dtypes --
from the manifests alone, naming the checkpoints (and their framework layouts).
It also reads every source's tensors once for the resident search loop
(:meth:`CheckpointSeries.load_resident`).

Layering: ``checkpoints`` <- ``sources`` <- ``series``, no circle. Pure:
nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import formats
from .checkpoints import Checkpoint, has_tokenizer
from .errors import CheckpointError
from .sources import Selector, resolve_sources

log = logging.getLogger(__name__)

__all__ = ["CheckpointSeries"]


def _layout_words(ck: Checkpoint) -> str:
    return f" ({ck.opened.fmt.name}, layout {ck.opened.layout})" if ck.opened is not None else ""



@dataclass
class CheckpointSeries:
    """Checkpoints in training order (oldest first), checked compatible before heavy work.

    ``config_dir`` is the folder whose ``config.json`` (and tokenizer) describe
    the model: the newest checkpoint that has one, unless given. Tied weights
    follow that config: with ``tie_word_embeddings`` the ``lm_head.weight``
    alias is not merged separately (the loaded model re-ties it).
    """

    checkpoints: list[Checkpoint]
    config_dir: Path | None = None
    tokenizer_dir: Path | None = None  # when the tokenizer is not beside config.json
    tie: bool | None = None  # tied embeddings as the resolved config says (None: read config.json)

    @classmethod
    def from_sources(cls, sources: Sequence[str | Path], last: int | None = None, *,
                     selector=None, strip_prefix: str | None = None, config_dir: str | Path | None = None,
                     hub_cache: str | None = None, name_map: str | None = None) -> "CheckpointSeries":
        """Resolve, open and check sources (see ``sources.py`` for what a source may be).

        Raises :class:`CheckpointError` naming the checkpoint and tensor at fault.
        """
        if selector is None:
            selector = Selector(last=last)
        paths = resolve_sources(sources, selector, hub_cache=hub_cache)
        return cls.from_paths(paths, strip_prefix=strip_prefix, config_dir=config_dir, name_map=name_map)

    @classmethod
    def from_paths(cls, paths: Sequence[Path], *, strip_prefix: str | None = None,
                   config_dir: str | Path | None = None, name_map: str | None = None) -> "CheckpointSeries":
        """Open and check checkpoints already resolved (``sources.resolve_sources``), in this order."""
        series = cls([Checkpoint.open(p, strip_prefix=strip_prefix, config_dir=config_dir, name_map=name_map)
                      for p in paths])
        own = next((c.config_dir for c in reversed(series.checkpoints) if c.config_dir), None)
        series.config_dir = own
        if config_dir is not None:
            given = Path(config_dir).expanduser()
            if (given / "config.json").exists():
                series.config_dir = given
            elif own is not None and has_tokenizer(given):
                series.tokenizer_dir = given  # a tokenizer-only folder; the checkpoints carry config.json
            else:
                raise CheckpointError(f"checkpoints.config_dir: {given} has no config.json"
                                      + ("" if own is not None else " (and the checkpoints carry none)"))
        series.check()
        return series

    @property
    def model_config(self) -> dict:
        """The parsed ``config.json`` ({} when no checkpoint carries one)."""
        if self.config_dir is None:
            return {}
        return json.loads((self.config_dir / "config.json").read_text())

    def __len__(self) -> int:
        return len(self.checkpoints)

    @property
    def newest(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def paths(self) -> list[Path]:
        return [c.path for c in self.checkpoints]

    @property
    def tied(self) -> bool:
        """Whether the output layer is the input embeddings: ``tie`` when set (the config as transformers
        resolves it, defaults included: set by ``model.check_covers``), else ``config.json`` as written."""
        if self.tie is not None:
            return self.tie
        cfg = self.model_config
        return bool(cfg.get("tie_word_embeddings", cfg.get("text_config", {}).get("tie_word_embeddings", False)))

    @property
    def names(self) -> list[str]:
        """Tensor names to merge, in the newest manifest's order (a tied ``lm_head`` alias left out)."""
        names = list(self.newest.tensors)
        if self.tied and "lm_head.weight" in names and len(names) > 1:
            names.remove("lm_head.weight")
        return names

    def check(self) -> None:
        """Refuse series whose tensor names or shapes disagree (from manifests, before any data).

        Float dtypes may differ (a fp32 ZeRO consolidation next to bf16 HF
        folders): merging accumulates in fp32 and writes the newest's dtype.
        """
        ref = self.checkpoints[0]
        for ck in self.checkpoints[1:]:
            missing = sorted(set(ref.tensors) - set(ck.tensors))
            extra = sorted(set(ck.tensors) - set(ref.tensors))
            if missing or extra:
                raise CheckpointError(
                    f"{ck.path}{_layout_words(ck)}: tensor names differ from {ref.path}{_layout_words(ref)}: "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"extra {extra[:5]}{'...' if len(extra) > 5 else ''}")
            for name, a in ref.tensors.items():
                b = ck.tensors[name]
                if a.shape != b.shape:
                    raise CheckpointError(f"{ck.path}: tensor {name!r} has shape {list(b.shape)} "
                                          f"but {ref.path} has {list(a.shape)}")
                if a.dtype != b.dtype and not (a.dtype.is_floating_point and b.dtype.is_floating_point):
                    raise CheckpointError(f"{ck.path}: non-float tensor {name!r} has dtype {b.dtype} "
                                          f"but {ref.path} has {a.dtype}")

    @property
    def source_format(self) -> "formats.Format | None":
        """The framework format every checkpoint is in (for ``merge.format=source``), or None when they are
        HF-family checkpoints; refuses a series that mixes formats."""
        fmts = {ck.opened.fmt.name if ck.opened else None for ck in self.checkpoints}
        if len(fmts) > 1:
            raise CheckpointError("merge.format=source: the sources are in different formats "
                                  f"({sorted(str(f) for f in fmts)}), so there is no one format to write the merge "
                                  "in; use merge.format=hf")
        return self.newest.opened.fmt if self.newest.opened else None

    def load_resident(self, names: Sequence[str] | None = None,
                      device: torch.device | str = "cpu") -> list[list[torch.Tensor]]:
        """Read every source's tensors once, for re-merging each trial without disk reads.

        Returns ``sources[k][i]``: checkpoint ``k``'s tensor ``names[i]``.
        """
        names = list(names) if names is not None else self.names
        return [[ck.read(n).to(device) for n in names] for ck in self.checkpoints]
