"""When a Hugging Face-family checkpoint has been written completely.

A run in flight saves while we read: ``save_pretrained`` writes ``config.json``
and then the weights in place, and HF Trainer then writes the tokenizer, the
optimizer, the scheduler, the RNG state and ``trainer_state.json``, last. A
folder read half-way would give a merge of a truncated model, or a clear error
at best; so a checkpoint is taken only once this rule says it is whole
(training frameworks' own formats have their own rules in ``formats/``):

- a ``.safetensors`` file: its header parses and its data section is as long as
  the header says (a file still being written is shorter);
- a torch file (``.bin``, ``.pt``, ``.pth``, ``.ckpt``): a whole zip archive (the
  central directory is written last); legacy (non-zip) pickles cannot be
  checked and count as whole;
- a folder: its weights are whole (the single file, or the index and every
  shard it names); a DeepSpeed folder has its ``latest`` tag (written after the
  save); an HF Trainer checkpoint (one holding ``optimizer.pt``,
  ``scheduler.pt``, ``rng_state*.pth`` or ``training_args.bin``) has its
  ``trainer_state.json``.

Pure: knows nothing of ranks, Lightning or Hydra.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from .errors import CheckpointError

__all__ = ["incomplete", "TRAINER_FILES"]

# Files HF Trainer writes beside the weights of each checkpoint-N/, before trainer_state.json.
TRAINER_FILES = ("training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _file_incomplete(f: Path) -> str | None:
    if not f.is_file():
        return f"{f.name} is missing"
    if f.suffix == ".safetensors":
        from .checkpoints import read_safetensors_header

        try:
            infos = read_safetensors_header(f)
        except CheckpointError as e:
            return str(e)
        end = max((i.offset + i.length for i in infos.values()), default=0)
        size = f.stat().st_size
        if infos and size < end:
            return f"{f.name} is {size} bytes, its header says {end}"
        return None
    if f.suffix in _TORCH_SUFFIXES:
        with open(f, "rb") as fh:
            magic = fh.read(4)
        if magic[:2] == b"PK" and not zipfile.is_zipfile(f):
            return f"{f.name} is not a whole zip archive yet (torch writes its directory last)"
    return None


def _shards(index: Path) -> list[str] | None:
    try:
        wm = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return None
    return sorted(set(wm.values())) if isinstance(wm, dict) else None


def incomplete(p: Path) -> str | None:
    """Why the HF-family checkpoint at ``p`` is not whole yet, or None when it is (see the module docstring)."""
    p = Path(p)
    try:
        if p.is_file():
            return _file_incomplete(p)
        if not p.is_dir():
            return f"{p} is missing"
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if (p / index).is_file():
                shards = _shards(p / index)
                if shards is None:
                    return f"{index} is not readable JSON with a weight_map yet"
                for s in shards:
                    if (why := _file_incomplete(p / s)) is not None:
                        return why
                break
        else:
            for single in ("model.safetensors", "pytorch_model.bin"):
                if (p / single).exists():
                    if (why := _file_incomplete(p / single)) is not None:
                        return why
                    break
            else:
                if any(p.glob("global_step*")) and not (p / "latest").is_file():
                    return "no `latest` tag yet (DeepSpeed writes it after the save)"
        trainer = [f for f in TRAINER_FILES if (p / f).exists()] + [f.name for f in p.glob("rng_state*.pth")]
        if trainer and not (p / "trainer_state.json").is_file():
            return f"an HF Trainer checkpoint ({trainer[0]}) without trainer_state.json, which Trainer writes last"
    except OSError as e:  # deleted while we looked (a training job's keep-last-k cleanup)
        return f"{p}: {e}"
    return None
