"""nanoGPT checkpoints: ``ckpt.pt`` as karpathy/nanoGPT's ``train.py`` saves it.

``train.py`` (commit 3adf61e) saves ``torch.save({"model": raw_model.state_dict(),
"optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num",
"best_val_loss", "config": config}, out_dir/"ckpt.pt")``, where ``model_args =
dict(n_layer, n_head, n_embd, block_size, bias, vocab_size, dropout)``. A model
that went through ``torch.compile`` may have ``_orig_mod.``-prefixed names
(``train.py`` strips them on resume, and so do we). ``model.py``'s ``GPT`` ties
``lm_head.weight`` to ``transformer.wte.weight`` (one storage in the file: an
alias here), and registers a causal-mask buffer ``attn.bias`` when flash
attention is missing (copied, never merged).

Map to ``GPT2LMHeadModel``: the names are HF GPT-2's, but ``attn.c_attn``,
``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj`` weights are nn.Linear
``[out, in]`` where GPT-2's Conv1D is ``[in, out]`` (``GPT.from_pretrained``
transposes them): transposed pieces. GPT-2 always has biases: a model trained
with ``bias=False`` (train.py's default) gets zero biases, which
:class:`NanoGPTCheckpoint` lists as tensors of its own (read as zeros, never
written back), so the HF model computes exactly what nanoGPT's does.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import logging
import re
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..errors import CheckpointError
from .base import Format, LayoutMap, NativeCheckpoint, NativeTensor, Piece
from .torchfile import TorchFileCheckpoint, load_dict, write_like

__all__ = ["FORMAT", "NanoGPTFormat", "NanoGPTCheckpoint", "hf_config_from_model_args"]

log = logging.getLogger(__name__)

FILE = "ckpt.pt"
PREFIX = "_orig_mod."
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")


def hf_config_from_model_args(args: dict, file: Path) -> dict:
    """GPT2Config from nanoGPT's ``model_args``."""
    from transformers import GPT2Config

    need = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
    missing = [k for k in need if not isinstance(args.get(k), int)]
    if missing:
        raise CheckpointError(f"{file}: model_args lacks {missing}: not a nanoGPT ckpt.pt this reader knows")
    drop = float(args.get("dropout") or 0.0)
    eos = 50256 if args["vocab_size"] > 50256 else None  # GPT-2's end of text, when the vocabulary holds it
    cfg = GPT2Config(bos_token_id=eos, eos_token_id=eos, vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"],
                     n_layer=args["n_layer"], n_head=args["n_head"], n_inner=4 * args["n_embd"],
                     activation_function="gelu", resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop,
                     layer_norm_epsilon=1e-5, tie_word_embeddings=True).to_dict()
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg.pop("transformers_version", None)
    return cfg


class NanoGPTCheckpoint(TorchFileCheckpoint):
    """A ``ckpt.pt``; with ``bias=False`` also the zero biases GPT-2 needs (``zeros``: name -> shape)."""

    format = "nanogpt"

    def __init__(self, path: Path, file: Path, obj: dict, hf_config: dict) -> None:
        keys = list(obj["model"])
        strip = PREFIX if keys and all(k.startswith(PREFIX) for k in keys) else ""
        super().__init__(path, file, obj, "model", strip=strip, skip=lambda n: n.endswith(".attn.bias"),
                         hf_config=hf_config)
        self.zeros: dict[str, NativeTensor] = {}
        wte = self.tensors.get("transformer.wte.weight")
        dtype = wte.dtype if wte is not None else torch.float32
        for name, t in list(self.tensors.items()):
            if name.endswith(".weight") and len(t.shape) <= 2:
                b = name[: -len("weight")] + "bias"
                if b not in self.tensors and b not in self._data and name != "transformer.wte.weight" \
                        and name != "transformer.wpe.weight" and name != "lm_head.weight":
                    self.zeros[b] = NativeTensor(b, (t.shape[0],), dtype)
        self.tensors.update(self.zeros)

    def read(self, name: str) -> torch.Tensor:
        z = self.zeros.get(name)
        return torch.zeros(z.shape, dtype=z.dtype) if z is not None else super().read(name)

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        z = self.zeros.get(name)
        if z is not None:
            return torch.zeros(max(0, min(end, z.numel) - start), dtype=z.dtype)
        return super().read_flat(name, start, end)


def build_gpt2(native: Mapping[str, NativeTensor], cfg: dict) -> dict[str, Piece]:
    """Same names as HF GPT-2, the four Linear weights transposed, ``lm_head`` left tied."""
    p: dict[str, Piece] = {}
    for name, t in native.items():
        if name == "lm_head.weight" or name.endswith(".attn.bias"):
            continue
        if name.endswith(TRANSPOSED):
            p[name] = Piece(name, (t.shape[1], t.shape[0]), transpose=True)
        else:
            p[name] = Piece(name, t.shape)
    return p


MAPS = (LayoutMap("nanogpt", "GPT2LMHeadModel",
                  lambda n: "transformer.wte.weight" in n and "transformer.wpe.weight" in n
                  and any(k.endswith(".attn.c_attn.weight") for k in n), build_gpt2),)


def _is_nanogpt(f: Path) -> bool:
    """True when the zip's ``data.pkl`` (the pickle only: tensor data lives in other records) holds the
    keys train.py saves; a plain state dict named ``ckpt.pt`` is left to the HF-family reader."""
    try:
        with zipfile.ZipFile(f) as z:
            pkl = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                return False
            data = z.read(pkl)
    except (OSError, zipfile.BadZipFile):
        return False
    # the keys as whole pickled strings (protocol 2, torch.save's default: X + 4-byte length; protocol 4:
    # \x8c + 1 byte), so a tensor name that merely contains "model_args" does not count
    return all(re.search(rb"(?:X" + re.escape(struct.pack("<I", len(k))) + rb"|\x8c" + re.escape(bytes([len(k)])) + rb")"
                         + k, data) for k in (b"model_args", b"model"))


def _file(path: Path) -> Path:
    return path / FILE if path.is_dir() else path


class NanoGPTFormat(Format):
    name = "nanogpt"

    def detect(self, path: Path) -> bool:
        """A folder holding ``ckpt.pt``, or a ``.pt`` file, whose pickle (not its tensors) names ``model_args``."""
        path = Path(path)
        f = path / FILE if path.is_dir() else path
        return f.is_file() and f.suffix == ".pt" and _is_nanogpt(f)

    def complete(self, path: Path) -> bool:
        f = _file(Path(path))
        return f.is_file() and zipfile.is_zipfile(f)

    def series_children(self, folder: Path) -> list[Path] | None:
        """train.py overwrites one ``out_dir/ckpt.pt``; forks that keep ``ckpt_<iter>.pt`` files make a series."""
        folder = Path(folder)
        if not folder.is_dir() or (folder / FILE).is_file():
            return None
        kids = [c for c in folder.iterdir() if c.suffix == ".pt" and not c.name.startswith(".") and self.detect(c)]
        return kids if len(kids) > 1 else None

    def open(self, path: Path) -> NativeCheckpoint:
        path = Path(path)
        file = _file(path)
        obj = load_dict(file)
        if not isinstance(obj.get("model"), dict) or not isinstance(obj.get("model_args"), dict):
            raise CheckpointError(f"{file}: not a nanoGPT ckpt.pt (no 'model' state dict and 'model_args'; "
                                  f"top-level keys: {list(obj)[:10]})")
        return NanoGPTCheckpoint(path, file, obj, hf_config_from_model_args(obj["model_args"], file))

    def maps(self):
        return MAPS

    def write(self, out: Path, template: NativeCheckpoint, produce: Callable[[str], torch.Tensor],
              names: Iterable[str]) -> None:
        if not isinstance(template, NanoGPTCheckpoint):
            raise CheckpointError(f"{template.path}: not a nanoGPT checkpoint opened by this format")
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_like(out / FILE, template, produce, [n for n in names if n not in template.zeros])


FORMAT = NanoGPTFormat()
