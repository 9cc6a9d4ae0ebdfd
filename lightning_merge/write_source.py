"""Writing a merge back in the run's own format (``merge.format=source``), so training resumes or anneals from it.

The sources are a training framework's checkpoints (``formats/``). The merge is
made in the framework's own names, tensor by tensor: ``produce(name)`` reads
that tensor from every source, accumulates ``sum_k w_k * theta_k`` in fp32 and
rounds once to the newest's dtype, and the format's writer asks for each tensor
only when it writes it, so at most one merged tensor (plus its K sources) is
held. The writer copies everything that is not a tensor (metadata, Megatron's
``_extra_state`` bytes, config files) from the newest source.

The optimizer state (``merge.optimizer``):

- ``none`` (default): the model alone (torchtitan's ``--checkpoint.initial_load_path``
  and ``litgpt pretrain --initial_checkpoint_dir`` load exactly that; Megatron
  resumes from it with ``--no-load-optim --no-load-rng``).
- ``newest``: the newest source's optimizer and training state, unchanged: a
  checkpoint that resumes where the newest left off, with the merged weights.
- ``average``: optimizer tensors averaged with the merge weights, counters
  (integer, 0-d and ``*.step`` entries: AdamW's steps) from the newest: what OLMo-core's ``merge_core_checkpoints.py`` does.
  Adam's moments are running averages of gradients and their squares at the
  weights the optimizer visited, so their weighted average is a reasonable
  warm start when the sources are close (adjacent checkpoints of one run, as
  here); it is not the state an optimizer would have reached at the merged
  weights, and it means nothing across runs.

The folder is built under a temporary name and renamed when complete, with
``merge.yaml`` beside the checkpoint. Pure: no ranks, Lightning or Hydra.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .series import CheckpointSeries
from .errors import CheckpointError
from .io import atomic_write_text, publishing_dir
from .merge import MergeError, check_weights, merge_into

__all__ = ["OPTIMIZER_POLICIES", "write_source"]

OPTIMIZER_POLICIES = ("none", "newest", "average")

log = logging.getLogger(__name__)


def _is_counter(name: str, info) -> bool:
    """An optimizer entry that counts rather than averages: integer tensors, 0-d tensors and ``*.step``
    (AdamW keeps ``state.<param>.step`` as a float32 0-d tensor: averaging steps 1, 2, 3 would give 2.3)."""
    return not info.dtype.is_floating_point or len(info.shape) == 0 or name.rsplit(".", 1)[-1] == "step"


def _check_natives(series: CheckpointSeries, names: Sequence[str]) -> None:
    """Every source holds each native tensor written, with one shape (from metadata, before any read)."""
    natives = [ck.opened.native for ck in series.checkpoints]
    ref = natives[-1]
    for nat in natives[:-1]:
        for n in names:
            a = ref.tensors.get(n) or ref.others.get(n)
            b = nat.tensors.get(n) or nat.others.get(n)
            if b is None:
                raise CheckpointError(f"{nat.path}: holds no {n!r}, which the newest source {ref.path} holds; "
                                      "merge.format=source needs the same tensors in every source")
            if tuple(a.shape) != tuple(b.shape):
                raise CheckpointError(f"{nat.path}: {n!r} has shape {list(b.shape)} but {ref.path} has "
                                      f"{list(a.shape)}")


def write_source(series: CheckpointSeries, weights: Sequence[float], out_dir: str | Path, *,
                 optimizer: str = "none", normalize: bool | None = False, nonfloat: str = "equal",
                 metadata: Mapping | None = None) -> Path:
    """Stream the merge of ``series`` with ``weights`` into ``out_dir`` in the sources' own format."""
    from .writer import _recipe_yaml

    if optimizer not in OPTIMIZER_POLICIES:
        raise MergeError(f"merge.optimizer={optimizer!r}: use one of {OPTIMIZER_POLICIES}")
    fmt = series.source_format
    if fmt is None:
        raise CheckpointError("merge.format=source: the sources are Hugging Face-family checkpoints (HF folders, "
                              "torch state dicts, ZeRO folders), whose own format is what merge.format=hf writes")
    w = check_weights(weights, len(series), normalize)
    natives = [ck.opened.native for ck in series.checkpoints]
    template = natives[-1]
    names = list(template.tensors) + (list(template.others) if optimizer != "none" else [])
    if optimizer != "none" and not template.others:
        log.warning("merge.optimizer=%s: %s holds no optimizer tensors (Megatron's distributed optimizer, for "
                    "one, saves its state as byte records, which are not merged or copied), so the merge is "
                    "written model-only: resume from it without loading an optimizer state", optimizer,
                    template.path)
    averaged = set(template.tensors) | (set(template.others) if optimizer == "average" else set())
    _check_natives(series, [n for n in names if n in averaged])

    def produce(name: str) -> torch.Tensor:
        info = template.tensors.get(name) or template.others[name]
        if name not in averaged or (name in template.others and _is_counter(name, info)):
            return template.read(name)  # copied from the newest: training state, step counters
        srcs = [nat.read(name) for nat in natives]
        out = torch.empty(tuple(info.shape), dtype=info.dtype)
        merge_into({name: out}, [{name: t} for t in srcs], w, nonfloat=nonfloat)
        return out

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    need = sum(math.prod((template.tensors.get(n) or template.others[n]).shape)
               * torch.empty((), dtype=(template.tensors.get(n) or template.others[n]).dtype).element_size()
               for n in names)
    free = shutil.disk_usage(out_dir.parent).free
    if free < need * 1.02 + (1 << 20):
        raise OSError(f"not enough free disk space in {out_dir.parent} to write the merged {fmt.name} checkpoint: "
                      f"need {need} bytes, {free} bytes free")
    meta = {**dict(metadata or {}), "format": fmt.name, "layout": series.newest.opened.layout,
            "optimizer": optimizer}
    with publishing_dir(out_dir) as tmp:
        fmt.write(tmp, template, produce, names)
        atomic_write_text(tmp / "merge.yaml", _recipe_yaml(series, w, bool(normalize), nonfloat, None, meta))
    return out_dir
