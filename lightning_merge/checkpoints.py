"""Checkpoint sources, the header-only manifest, and lazy tensor reads.

A :class:`CheckpointSeries` is an ordered list of checkpoints (oldest first)
whose tensors have been checked to agree -- same names, shapes and dtypes --
from the safetensors headers alone, before any tensor data is read. Tensors
are then read one at a time (:meth:`Checkpoint.read`) or all at once for the
resident search loop (:meth:`CheckpointSeries.load_resident`).

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["CheckpointError", "TensorInfo", "Checkpoint", "CheckpointSeries", "expand_sources"]

# safetensors dtype tags -> torch dtypes (the subset models are saved in).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or incompatible; the message names it."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a safetensors header."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_safetensors_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header (no tensor data) and check the file is not truncated."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors header "
                                      f"(header claims {n} bytes, file has {size})")
            header = json.loads(fh.read(n))
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from e
    out: dict[str, TensorInfo] = {}
    data_len = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        start, end = meta["data_offsets"]
        if end > data_len:
            raise CheckpointError(f"{file}: truncated: tensor {name!r} ends at byte {end} "
                                  f"but the data section has {data_len} bytes")
        out[name] = TensorInfo(name, tuple(meta["shape"]), dtype, file)
    return out


@dataclass
class Checkpoint:
    """One HF-format checkpoint folder and its header-only manifest."""

    path: Path
    tensors: dict[str, TensorInfo]
    _handles: dict[Path, object] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        """Open a local HF folder with ``model.safetensors`` or a sharded index."""
        path = Path(path).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint folder (does not exist or is a file)")
        index = path / _INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from e
            tensors: dict[str, TensorInfo] = {}
            for shard in sorted(set(weight_map.values())):
                f = path / shard
                if not f.exists():
                    raise CheckpointError(f"{index}: names shard {shard!r}, which is missing from {path}")
                tensors.update(read_safetensors_header(f))
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise CheckpointError(f"{index}: tensors {missing[:5]} are in the index but in no shard")
        elif (path / _SINGLE).exists():
            tensors = read_safetensors_header(path / _SINGLE)
        else:
            raise CheckpointError(f"{path}: no {_SINGLE} or {_INDEX} found "
                                  f"(found: {sorted(p.name for p in path.iterdir())[:8]})")
        if not tensors:
            raise CheckpointError(f"{path}: holds no tensors")
        return cls(path=path, tensors=tensors)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (lazily opening its shard once) and check it is finite."""
        from safetensors import safe_open

        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = safe_open(str(info.file), framework="pt")
            self._handles[info.file] = handle
        t = handle.get_tensor(name)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{info.file}: tensor {name!r} holds non-finite values (NaN or inf)")
        return t

    def close(self) -> None:
        self._handles.clear()


def _step_key(p: Path) -> tuple:
    """Sort key that orders ``step900`` before ``step1000`` (numbers compared as numbers)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name))


def _is_checkpoint_dir(p: Path) -> bool:
    return p.is_dir() and ((p / _SINGLE).exists() or (p / _INDEX).exists())


def expand_sources(sources: Iterable[str | Path], last: int | None = None) -> list[Path]:
    """Resolve the configured sources into checkpoint folders, in training order.

    A source that is itself a checkpoint folder is taken as is; a folder of
    checkpoint folders expands into its children sorted numerically by step.
    ``last`` then keeps only the newest N.
    """
    out: list[Path] = []
    for s in sources:
        p = Path(s).expanduser()
        if _is_checkpoint_dir(p):
            out.append(p)
        elif p.is_dir():
            kids = sorted((c for c in p.iterdir() if _is_checkpoint_dir(c)), key=_step_key)
            if not kids:
                raise CheckpointError(f"checkpoints.sources: {p} holds no checkpoint folders "
                                      f"(folders with {_SINGLE} or {_INDEX})")
            out.extend(kids)
        else:
            raise CheckpointError(f"checkpoints.sources: {p} does not exist")
    if last is not None:
        out = out[-last:]
    return out


@dataclass
class CheckpointSeries:
    """Checkpoints in training order (oldest first), checked compatible from headers."""

    checkpoints: list[Checkpoint]

    @classmethod
    def from_sources(cls, sources: Sequence[str | Path], last: int | None = None) -> "CheckpointSeries":
        """Open and check sources. Raises :class:`CheckpointError` naming the culprit."""
        paths = expand_sources(sources, last=last)
        if not paths:
            raise CheckpointError("checkpoints.sources: no checkpoints given")
        series = cls([Checkpoint.open(p) for p in paths])
        series.check()
        return series

    def __len__(self) -> int:
        return len(self.checkpoints)

    @property
    def newest(self) -> Checkpoint:
        return self.checkpoints[-1]

    @property
    def paths(self) -> list[Path]:
        return [c.path for c in self.checkpoints]

    @property
    def names(self) -> list[str]:
        """Tensor names in a stable order (that of the newest checkpoint's manifest)."""
        return list(self.newest.tensors)

    def check(self) -> None:
        """Refuse series whose tensor names, shapes or dtypes disagree (headers only)."""
        ref = self.checkpoints[0]
        for ck in self.checkpoints[1:]:
            missing = sorted(set(ref.tensors) - set(ck.tensors))
            extra = sorted(set(ck.tensors) - set(ref.tensors))
            if missing or extra:
                raise CheckpointError(
                    f"{ck.path}: tensor names differ from {ref.path}: "
                    f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                    f"extra {extra[:5]}{'...' if len(extra) > 5 else ''}")
            for name, a in ref.tensors.items():
                b = ck.tensors[name]
                if a.shape != b.shape:
                    raise CheckpointError(f"{ck.path}: tensor {name!r} has shape {list(b.shape)} "
                                          f"but {ref.path} has {list(a.shape)}")
                if a.dtype != b.dtype:
                    raise CheckpointError(f"{ck.path}: tensor {name!r} has dtype {b.dtype} "
                                          f"but {ref.path} has {a.dtype}")

    def load_resident(self, names: Sequence[str] | None = None,
                      device: torch.device | str = "cpu") -> list[list[torch.Tensor]]:
        """Read every source's tensors once, for re-merging each trial without disk reads.

        Returns ``sources[k][i]``: checkpoint ``k``'s tensor ``names[i]``.
        """
        names = list(names) if names is not None else self.names
        return [[ck.read(n).to(device) for n in names] for ck in self.checkpoints]
