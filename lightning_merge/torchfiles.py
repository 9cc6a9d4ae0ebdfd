"""Torch pickles (``.bin``, ``.pt``, ``.pth``, ``.ckpt``): loaded safely, and the state dict found inside.

Only ``torch.load(weights_only=True)`` is ever used, so nothing user-supplied
is unpickled beyond tensors and plain containers. Then the file must hold a
state dict: a training-state file (nanoGPT's ``ckpt.pt`` with ``model``,
``optimizer``, ``iter_num``, ...) read as one would make a checkpoint of its
stray top-level tensors, so it is refused, naming the state dicts inside it and
how to extract one (:func:`state_dict_of`).

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from .errors import CheckpointError

__all__ = ["torch_load", "state_dict_of"]

log = logging.getLogger(__name__)


def torch_load(file: Path) -> dict:
    """Load a torch pickle with ``weights_only=True`` (memory-mapped when the format allows)."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{file}: refused to load: it holds more than tensors ({first}). lightning_merge only loads "
            "torch files with weights_only=True and never unpickles arbitrary objects; convert it to "
            "safetensors with code you trust") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{file}: corrupt or truncated torch file ({str(e).splitlines()[0]})") from None


def _looks_like_state_dict(d) -> int:
    """How many tensors ``d`` holds when it looks like a state dict (string keys, tensors the
    majority of its values), else 0. An optimizer's ``state`` (integer keys) never does."""
    if not isinstance(d, dict) or not d or not all(isinstance(k, str) for k in d):
        return 0
    n = sum(isinstance(v, torch.Tensor) for v in d.values())
    return n if 2 * n >= len(d) else 0


def _nested_state_dicts(obj: dict, path: tuple = (), depth: int = 2) -> list[tuple[tuple, int]]:
    """``(key path, tensor count)`` of the dicts inside ``obj`` (two levels down) that look like state dicts."""
    found = []
    for k, v in obj.items():
        if not isinstance(v, dict) or not all(isinstance(x, str) for x in v):
            continue
        n = _looks_like_state_dict(v)
        if n:
            found.append(((*path, k), n))
        elif depth > 1:
            found.extend(_nested_state_dicts(v, (*path, k), depth - 1))
    return found


def _training_state_hint(file: Path, keys: list) -> str:
    """Name the training framework a training-state file comes from, when its keys say so."""
    if {"model_args", "iter_num"} <= set(keys):
        return (" It looks like a nanoGPT ckpt.pt (model_args, iter_num), which lightning_merge reads as such "
                "when the file ends in .pt (formats/nanogpt.py): give it as a .pt file, or its out_dir folder.")
    if "module" in keys and "global_steps" in keys:
        return " It looks like a DeepSpeed model-states file: give its training folder (with `latest`) instead."
    return ""


def state_dict_of(file: Path, obj) -> dict:
    """The state dict inside a loaded torch file; refuse a file that holds training state instead.

    A Lightning ``.ckpt`` keeps the model under ``state_dict``. Any other file
    must *be* a state dict: tensors are the majority of its top-level values and
    none of its values is itself a dict of tensors. Otherwise (a nanoGPT
    ``ckpt.pt``: ``model``, ``optimizer``, ``iter_num``, ``best_val_loss``, ...)
    keeping the top-level tensors would make a checkpoint of stray scalars, so
    the refusal names the keys found and the state dicts nested inside.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a state dict (a dict from tensor "
                              "names to tensors)")
    if isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]  # a Lightning .ckpt
    tensors = [k for k, v in obj.items() if isinstance(v, torch.Tensor)]
    nested = _nested_state_dicts(obj)
    if nested or 2 * len(tensors) < len(obj):
        keys = list(obj)
        shown = ", ".join(" > ".join(repr(k) for k in p) + f" ({n} tensor{'s' * (n != 1)})" for p, n in nested[:6])
        were = "is a tensor" if len(tensors) == 1 else "are tensors"
        msg = (f"{file}: not a state dict: it holds training state (top-level keys: {keys[:12]}"
               f"{' ...' if len(keys) > 12 else ''}; {len(tensors)} of its {len(obj)} values {were}), and reading "
               f"its top-level tensors as the model would make a checkpoint of stray values.")
        msg += _training_state_hint(file, keys)
        if nested:
            index = "".join(f"[{k!r}]" for k in nested[0][0])
            msg += (f" State dicts inside it: {shown}. Extract the model's weights (in the HF model's names) into "
                    "a file of their own and give that file in checkpoints.sources (with checkpoints.config_dir=<an "
                    "HF folder with the model's config.json and tokenizer>): "
                    f"python -c \"import torch; torch.save(torch.load({str(file)!r}, weights_only=True){index}, "
                    f"'model.pt')\"")
        else:
            msg += " No dict of tensors was found inside it either: save the model's state_dict() instead."
        raise CheckpointError(msg)
    skipped = [k for k in obj if k not in set(tensors)]
    if skipped:
        log.warning("%s: %d non-tensor entr%s not read: %s", file, len(skipped),
                    "y" if len(skipped) == 1 else "ies", skipped[:5])
    return obj
