"""The streaming merged-model writer: ``write_merged`` and its size-capped safetensors shards.

Tensors are read, merged (``merge.merge_into``, fp32 accumulation) and appended to
their shard file one at a time, and the folder is published atomically. Pure:
nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .errors import DiskFullError, disk_full
from .io import atomic_write_text, publishing_dir
from .merge import MergeError, check_weights, merge_into, read_source
from .series import CheckpointSeries

__all__ = ["write_merged"]

_COPY_FROM_NEWEST = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                     "added_tokens.json", "chat_template.jinja")


def _shard_plan(series: CheckpointSeries, names: list[str], dtype: torch.dtype | None,
                max_shard_bytes: int) -> list[list[str]]:
    """Group tensors into shards of at most ``max_shard_bytes`` (one tensor may exceed it alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    esize = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    for n in names:
        info = series.newest.tensors[n]
        nb = info.nbytes if esize is None or not info.dtype.is_floating_point \
            else math.prod(info.shape) * esize
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
    return shards


_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


def _out_dtype(series: CheckpointSeries, name: str, dtype: torch.dtype | None) -> torch.dtype:
    info = series.newest.tensors[name]
    return dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype


class _ShardWriter:
    """Writes one safetensors file tensor by tensor, so a shard is never held whole in memory.

    The header (names, dtypes, shapes, offsets) is known from the manifest before
    any data is merged, so it is written first and each merged tensor is
    appended as soon as it exists; the file is the same as ``save_file`` would
    write for these tensors (a little-endian host is assumed, as safetensors does).
    """

    def __init__(self, path: Path, layout: list[tuple[str, tuple, torch.dtype]]) -> None:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        self.expected = []
        for name, shape, dt in layout:
            nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
        self.path, self.fh, self.i = path, open(path, "wb"), 0
        self.fh.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, t: torch.Tensor) -> None:
        name, nbytes = self.expected[self.i]
        data = t.contiguous().view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if data.numel() != nbytes:  # pragma: no cover - the layout comes from the same manifest
            raise MergeError(f"{self.path}: tensor {name!r} has {data.numel()} bytes, header says {nbytes}")
        self.fh.write(memoryview(data.numpy()))
        self.i += 1

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None and self.i != len(self.expected):  # pragma: no cover
            self.fh.close()
            raise MergeError(f"{self.path}: wrote {self.i} of {len(self.expected)} tensors")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def write_merged(series: CheckpointSeries, weights: Sequence[float], out_dir: str | Path, *,
                 dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3,
                 normalize: bool | None = False, nonfloat: str = "equal", metadata: Mapping | None = None,
                 extra_files: Mapping[str, str] | None = None) -> Path:
    """Stream the merge of ``series`` with ``weights`` into an HF checkpoint at ``out_dir``.

    Tensors are read, merged and appended to their shard file one at a time, so
    peak memory is one tensor per source plus its merge, never a whole shard,
    let alone K whole checkpoints. Shards
    are size-capped safetensors files (``model.safetensors`` when one suffices,
    else ``model-0000i-of-0000N.safetensors`` plus the HF index). ``config.json``
    and the tokenizer files are copied from the newest source; ``merge.yaml``
    records the sources, weights and ``metadata`` so the merge can be re-run;
    ``extra_files`` (name -> text, e.g. a ``README.md`` model card) are added.
    The folder is built under a temporary name and renamed when complete.
    """
    w = check_weights(weights, len(series), normalize)
    out_dir = Path(out_dir)
    names = series.names
    shards = _shard_plan(series, names, dtype, max_shard_bytes)
    need = sum(math.prod(series.newest.tensors[n].shape) * torch.empty((), dtype=dtype or
               series.newest.tensors[n].dtype).element_size() for n in names)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir.parent).free
    if free < need * 1.02 + (1 << 20):  # refused before a byte is written
        raise disk_full(out_dir, need, "the merged model (and a 2% + 1 MiB margin)")
    try:
        return _write_merged(series, w, out_dir, shards, need, dtype, bool(normalize), nonfloat, metadata,
                             extra_files)
    except OSError as e:
        if e.errno == errno.ENOSPC and not isinstance(e, DiskFullError):  # the disk filled up meanwhile
            raise disk_full(out_dir, need, "the merged model (and a 2% + 1 MiB margin)") from e
        raise


def _write_merged(series, w, out_dir, shards, need, dtype, normalize, nonfloat, metadata, extra_files) -> Path:
    total = len(shards)
    weight_map: dict[str, str] = {}
    with publishing_dir(out_dir) as tmp:
        for si, shard in enumerate(shards):
            fname = "model.safetensors" if total == 1 else f"model-{si + 1:05d}-of-{total:05d}.safetensors"
            layout = [(n, tuple(series.newest.tensors[n].shape), _out_dtype(series, n, dtype)) for n in shard]
            with _ShardWriter(tmp / fname, layout) as writer:
                for n, shape, out_dtype in layout:
                    srcs = [read_source(ck, n) for ck in series.checkpoints]
                    out = torch.empty(shape, dtype=out_dtype)
                    merge_into({n: out}, [{n: t} for t in srcs], w, nonfloat=nonfloat)
                    del srcs
                    writer.write(out)
                    weight_map[n] = fname
        if total > 1:
            index = {"metadata": {"total_size": need}, "weight_map": weight_map}
            atomic_write_text(tmp / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        for fn in _COPY_FROM_NEWEST:
            model_file = fn in ("config.json", "generation_config.json")
            # The tokenizer comes from checkpoints.tokenizer_dir when one was given.
            folder = series.config_dir if model_file or series.tokenizer_dir is None else series.tokenizer_dir
            src = folder / fn if folder is not None else None
            if src is not None and src.exists():
                shutil.copy2(src, tmp / fn)
        if dtype is not None and (tmp / "config.json").exists():
            cfg = json.loads((tmp / "config.json").read_text())
            cfg["torch_dtype"] = str(dtype).replace("torch.", "")
            cfg["dtype"] = cfg["torch_dtype"]
            atomic_write_text(tmp / "config.json", json.dumps(cfg, indent=2) + "\n")
        atomic_write_text(tmp / "merge.yaml", _recipe_yaml(series, w, bool(normalize), nonfloat, dtype, metadata))
        for fn, text in (extra_files or {}).items():
            atomic_write_text(tmp / fn, text)
    return out_dir


def _recipe_yaml(series: CheckpointSeries, weights: list[float], normalize: bool, nonfloat: str,
                 dtype: torch.dtype | None, metadata: Mapping | None) -> str:
    """A re-runnable recipe: ``python -m lightning_merge mode=merge merge.recipe=.../merge.yaml``."""
    from omegaconf import OmegaConf

    recipe = {
        "sources": [str(p.resolve()) for p in series.paths],
        "weights": [float(x) for x in weights],
        "config_dir": str(series.config_dir.resolve()) if series.config_dir else None,
        "tokenizer_dir": str(series.tokenizer_dir.resolve()) if series.tokenizer_dir else None,
        "normalize": normalize,
        "nonfloat": nonfloat,
        "dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "metadata": dict(metadata or {}),
        "reproduce": "python -m lightning_merge mode=merge merge.recipe=PATH/TO/merge.yaml output_dir=OUT",
    }
    return OmegaConf.to_yaml(OmegaConf.create(recipe))
