"""A training framework's torch pickle (LitGPT's ``lit_model.pth``, nanoGPT's ``ckpt.pt``) as a NativeCheckpoint.

The file is loaded once with :func:`lightning_merge.torchfiles.torch_load`, i.e.
``torch.load(weights_only=True, mmap=True)``: only tensors and plain containers
are unpickled (a pickle that holds objects is refused, naming the file), and the
tensors are memory-mapped, so opening reads no tensor data, :meth:`read_flat`
copies just its slice and ``bytes_read`` counts only the bytes copied.

The file is a dict; the model's state dict is either the whole of it (a
converted ``lit_model.pth``) or one entry (``"model"``: LitGPT's pretrain dict,
nanoGPT's ``ckpt.pt``). Every tensor elsewhere (optimizer state, data loader
state) is an "other", named by its key path joined with dots
(``optimizer.state.0.exp_avg``). A model entry that shares its storage with an
earlier one (a tied ``lm_head.weight``) is an alias: not listed, written back
as the same tensor. :func:`write_like` rebuilds the template's dict with each
tensor replaced, and saves it with ``torch.save``. ``torch.save`` pickles the
whole dict at once, so the merged tensors cannot stream out one by one as in
the safetensors and DCP writers; each is parked, as it is made, in a
file-backed shared mapping beside the output (pages the kernel can write out
and drop), so the writer does not need anonymous memory the size of the model.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..errors import CheckpointError
from ..torchfiles import torch_load
from .base import NativeCheckpoint, NativeTensor

__all__ = ["TorchFileCheckpoint", "load_dict", "write_like"]

log = logging.getLogger(__name__)

KeyPath = tuple[Any, ...]
_SPILL_BYTES = 1 << 20  # merged tensors from this size on wait for torch.save in file-backed pages


def load_dict(file: Path) -> dict:
    """The loaded dict of ``file`` (weights only, mmap'd); refuse anything else, naming the file."""
    if not Path(file).is_file():
        raise CheckpointError(f"{file}: no such file")
    obj = torch_load(Path(file))
    if not isinstance(obj, dict):
        raise CheckpointError(f"{file}: holds a {type(obj).__name__}, not a dict of tensors or a training-state dict")
    return obj


def _walk(obj: Any, path: KeyPath = ()) -> Iterable[tuple[KeyPath, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, (*path, i))


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() == b.storage_offset()
            and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)


class TorchFileCheckpoint(NativeCheckpoint):
    """The tensors of one torch pickle. ``model_key``: the entry holding the state dict (None: the file is
    the state dict); ``strip``: a prefix removed from the model's names (``_orig_mod.``); ``skip(name)``:
    model entries that are neither merged nor mapped (causal-mask buffers), copied from the file as they are."""

    format = "torchfile"

    def __init__(self, path: Path, file: Path, obj: dict, model_key: str | None, strip: str = "",
                 skip: Callable[[str], bool] | None = None, hf_config: dict | None = None) -> None:
        self.file = Path(file)
        self.obj = obj
        self.model_key = model_key
        sd = obj if model_key is None else obj[model_key]
        if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
            raise CheckpointError(f"{file}: its {model_key!r} entry is not a state dict (a dict from names to tensors)")
        self._data: dict[str, torch.Tensor] = {}
        self.paths: dict[KeyPath, str] = {}   # key path in obj -> our name, for every tensor
        self.aliases: dict[str, str] = {}     # model name -> the model name it shares storage with
        self.constants: set[str] = set()      # model entries copied as they are
        tensors: dict[str, NativeTensor] = {}
        prefix: KeyPath = () if model_key is None else (model_key,)
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                continue  # e.g. _extra_state bytes: copied with the dict
            name = k[len(strip):] if strip and k.startswith(strip) else k
            self.paths[(*prefix, k)] = name
            self._data[name] = v
            if skip is not None and skip(name):
                self.constants.add(name)
                continue
            twin = next((n for n in tensors if _same_storage(self._data[n], v)), None)
            if twin is not None:
                self.aliases[name] = twin
                continue
            tensors[name] = NativeTensor(name, tuple(v.shape), v.dtype)
        others: dict[str, NativeTensor] = {}
        if model_key is not None:
            for key, v in obj.items():
                if key == model_key:
                    continue
                for p, t in _walk(v, (key,)):
                    name = ".".join(str(x) for x in p)
                    self.paths[p] = name
                    self._data[name] = t
                    others[name] = NativeTensor(name, tuple(t.shape), t.dtype)
        super().__init__(path, tensors, others, hf_config)

    def _get(self, name: str) -> torch.Tensor:
        t = self._data.get(name)
        if t is None:
            raise CheckpointError(f"{self.file}: holds no tensor {name!r}")
        return t

    def read(self, name: str) -> torch.Tensor:
        t = self._get(name)
        self.bytes_read += t.numel() * t.element_size()
        return t.clone()

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        t = self._get(name)
        if not t.is_contiguous():
            return super().read_flat(name, start, end)
        out = t.reshape(-1)[start:end].clone()
        self.bytes_read += out.numel() * out.element_size()
        return out

    def close(self) -> None:
        self._data.clear()


def _rebuild(obj: Any, path: KeyPath, value_of: Callable[[KeyPath, torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return value_of(path, obj)
    if isinstance(obj, dict):
        return {k: _rebuild(v, (*path, k), value_of) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(v, (*path, i), value_of) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_rebuild(v, (*path, i), value_of) for i, v in enumerate(obj))
    return obj


def write_like(out_file: Path, template: TorchFileCheckpoint, produce: Callable[[str], torch.Tensor],
               names: Iterable[str]) -> None:
    """Save ``template``'s dict to ``out_file`` with each tensor named in ``names`` replaced by
    ``produce(name)`` (the rest copied from the template; aliases stay tied), via a temp file."""
    wanted = set(names)
    known = set(template.tensors) | set(template.others)
    unknown = sorted(wanted - known)
    if unknown:
        raise CheckpointError(f"{template.file}: asked to write tensors it does not hold: {unknown[:5]}")
    made: dict[str, torch.Tensor] = {}
    out_file = Path(out_file)
    tmp = out_file.with_name(f".{out_file.name}.tmp")
    scratch = out_file.with_name(f".{out_file.name}.scratch")

    def value_of(path: KeyPath, t: torch.Tensor) -> torch.Tensor:
        name = template.paths.get(path)
        if name is None:
            return t
        name = template.aliases.get(name, name)
        if name in made:
            return made[name]
        if name not in wanted:
            made[name] = t
            return t
        v = produce(name)
        if v.numel() * v.element_size() >= _SPILL_BYTES:
            # torch.save needs every tensor at once: park each merged one in a file-backed mapping, whose
            # pages the kernel can write out and drop, instead of anonymous memory the size of the model
            scratch.mkdir(exist_ok=True)
            m = torch.from_file(str(scratch / f"{len(made)}.bin"), shared=True, size=v.numel(), dtype=v.dtype)
            v = m.view(v.shape).copy_(v)
        made[name] = v
        return v

    try:
        new = _rebuild(template.obj, (), value_of)
        torch.save(new, tmp)
        os.replace(tmp, out_file)
    finally:
        if tmp.exists():
            tmp.unlink()
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("wrote %s (%d tensors merged)", out_file, len(wanted))
