"""Checkpoint formats recognised but not read, and what to do about each.

A path the tool cannot read gets a message that names its format (a DCP shard
file, a legacy Megatron-LM checkpoint, a PEFT adapter, GGUF) and what to give
instead, rather than "neither a checkpoint nor a folder of checkpoints". The
frameworks' formats that are read (DCP, Megatron torch_dist, OLMo-core, LitGPT,
nanoGPT) live in ``formats/``.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["unread_format"]


def unread_format(p: Path) -> str | None:
    """What ``p`` is when it is a checkpoint format recognised but not read, and what to do about it;
    None when it is not recognised."""
    if p.is_file():
        if p.suffix == ".distcp":
            return (f"{p}: one shard file of a PyTorch Distributed Checkpoint: give its folder {p.parent} "
                    "(the one with .metadata) instead")
        try:
            with open(p, "rb") as fh:
                magic = fh.read(4)
        except OSError:
            magic = b""
        if p.suffix == ".gguf" or magic == b"GGUF":
            return (f"{p}: a GGUF file (llama.cpp), a quantised export for inference, not a training checkpoint: "
                    "give the original weights (an HF folder or safetensors)")
        return None
    if not p.is_dir():
        return None
    latest = p / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        return (f"{p}: a Megatron-LM checkpoint folder (latest iteration {latest.read_text().strip()[:20]}) not in "
                "the torch_dist format lightning_merge reads (a legacy per-rank mp_rank_* save?): convert it with "
                "Megatron's own `tools/checkpoint/convert.py --saver torch_dist` (or export it to an HF folder) and "
                "give that folder")
    if (p / "adapter_config.json").is_file():
        try:
            cfg = json.loads((p / "adapter_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            cfg = {}
        return (f"{p}: a PEFT adapter ({cfg.get('peft_type', '?')}, base {cfg.get('base_model_name_or_path', '?')}), "
                "not a whole model: merge it into its base model first (peft: model.merge_and_unload(), then "
                "save_pretrained) and give that folder")
    return None
