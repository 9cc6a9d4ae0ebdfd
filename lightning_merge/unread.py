"""Checkpoint formats recognised but not read (yet), and what to do about each.

A folder the tool cannot read gets a message that names its format (PyTorch
Distributed Checkpoint, LitGPT, Megatron-LM, a PEFT adapter, GGUF) and the
command that converts it, instead of "neither a checkpoint nor a folder of
checkpoints". Reading these formats is the formats issue's work; until then
the converter commands are real and tested (``tests/test_checkpoint_refusals.py``).

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

__all__ = ["unread_format"]

_DCP = "PyTorch Distributed Checkpoint (DCP)"
_DCP_TO_TORCH = "python -m torch.distributed.checkpoint.format_utils dcp_to_torch"
_CONFIG_DIR = "checkpoints.config_dir=<an HF folder with the model's config.json and tokenizer>"


def _numeric(p: Path) -> tuple:
    """``step-900`` before ``step-1000``."""
    return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"(\d+)", p.name) if x)


def _is_dcp(d: Path) -> bool:
    return (d / ".metadata").is_file() and any(d.glob("*.distcp"))


def _dcp_todo(folders: list[Path]) -> str:
    d = folders[0]
    cmd = f"{_DCP_TO_TORCH} {shlex.quote(str(d))} {shlex.quote(str(d.with_name(d.name + '.pt')))}"
    each = "" if len(folders) == 1 else " (and the same for each of the others)"
    return (f"Until it does, convert {'each' if len(folders) > 1 else 'it'} to a torch state dict with "
            f"PyTorch's converter: `{cmd}`{each}; then give "
            f"the .pt file{'s (or their folder)' if len(folders) > 1 else ''} in checkpoints.sources, with "
            f"{_CONFIG_DIR}. The tensor names must be the HF model's: a framework's own names (torchtitan, "
            "Megatron) need that framework's HF export, and a file holding the whole training state is refused "
            "naming the state dict inside it to extract")


def _litgpt_todo(d: Path) -> str:
    out = d.with_name(d.name + "-hf")
    return (f"a LitGPT checkpoint (lit_model.pth: LitGPT's own tensor names), which lightning_merge does not read "
            f"yet. Convert it with `litgpt convert_from_litgpt {shlex.quote(str(d))} {shlex.quote(str(out))}` and "
            f"give {out / 'model.pth'} in checkpoints.sources, with {_CONFIG_DIR}")


def unread_format(p: Path, own_only: bool = False) -> str | None:
    """What ``p`` is when it is a checkpoint format recognised but not read (yet), and what to do
    about it; None when it is not recognised. A folder is also recognised by its children (a folder
    of DCP steps) unless ``own_only``. Reading these is the formats issue's work."""
    if p.is_file():
        if p.suffix == ".distcp":
            return (f"{p}: a shard of a {_DCP}; its folder {p.parent} (with .metadata) is the checkpoint, and "
                    "lightning_merge does not read DCP yet. " + _dcp_todo([p.parent]))
        if p.name == "lit_model.pth":
            return f"{p}: " + _litgpt_todo(p.parent)
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
    if _is_dcp(p):
        return (f"{p}: a {_DCP} folder (as torchtitan, Megatron-Core's torch_dist and OLMo-core write), which "
                "lightning_merge does not read yet. " + _dcp_todo([p]))
    if (p / "lit_model.pth").is_file():
        return f"{p}: " + _litgpt_todo(p)
    latest = p / "latest_checkpointed_iteration.txt"
    if latest.is_file():
        return (f"{p}: a Megatron-LM checkpoint folder (latest iteration {latest.read_text().strip()[:20]}), which "
                "lightning_merge does not read yet: export it to an HF folder with Megatron's checkpoint "
                "converter and give that folder")
    if (p / "adapter_config.json").is_file():
        try:
            cfg = json.loads((p / "adapter_config.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            cfg = {}
        return (f"{p}: a PEFT adapter ({cfg.get('peft_type', '?')}, base {cfg.get('base_model_name_or_path', '?')}), "
                "not a whole model: merge it into its base model first (peft: model.merge_and_unload(), then "
                "save_pretrained) and give that folder")
    return None if own_only else _unread_children(p)


def _unread_children(p: Path) -> str | None:
    """A folder whose children are checkpoints in a format recognised but not read."""
    kids = sorted((c for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")), key=_numeric)
    dcp = [c for c in kids if _is_dcp(c)]
    if dcp:
        return (f"{p}: a folder of {len(dcp)} {_DCP} folders ({', '.join(c.name for c in dcp[:6])}"
                f"{' ...' if len(dcp) > 6 else ''}), which lightning_merge does not read yet. " + _dcp_todo(dcp))
    lit = [c for c in kids if (c / "lit_model.pth").is_file()]
    if lit:
        return (f"{p}: a folder of {len(lit)} LitGPT checkpoints ({', '.join(c.name for c in lit[:6])}"
                f"{' ...' if len(lit) > 6 else ''}): each is " + _litgpt_todo(lit[0]))
    return None
