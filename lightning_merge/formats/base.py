"""The one small interface every training framework's checkpoint format sits behind.

A format module (``torchtitan.py``, ``megatron.py``, ``litgpt.py``, ...) gives a
:class:`Format`: which paths are its checkpoints (:meth:`Format.detect`), when a
folder is a finished one (:meth:`Format.complete`), how to open one into a
:class:`NativeCheckpoint` (the tensors as the framework saved them, with shape
and dtype from metadata only, read whole or as a flat slice), the name maps from
its layouts to a Hugging Face architecture (:meth:`Format.maps`), and a writer
of a merge back in the framework's own format (:meth:`Format.write`).

A map is a dict ``hf_name -> Piece``: the HF tensor is a list of row runs of one
native tensor seen as ``[-1, row]`` (rename: all rows; unstacking a layer axis,
splitting a fused QKV or gate/up: one run; undoing a RoPE permutation: many runs of
one row), optionally transposed (nanoGPT's Linear vs GPT-2's Conv1D). Every map is
a re-indexing, hence linear, so merging in the source's names and then mapping
equals mapping each source and then merging (``tests/test_formats_maps.py``):
the search merges mapped tensors for evaluation, the own-format writer merges the
native ones.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ..errors import CheckpointError

__all__ = ["NativeTensor", "NativeCheckpoint", "Piece", "LayoutMap", "Format", "rows_of_permutation",
           "assemble", "assemble_slice", "check_map"]


@dataclass(frozen=True)
class NativeTensor:
    """One tensor as the framework saved it (from metadata alone)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class NativeCheckpoint:
    """A checkpoint in its framework's own names. Subclasses implement :meth:`read` (and :meth:`read_flat`
    when the format can read less than a whole tensor).

    ``tensors``: the model's tensors (merged, mapped to HF for evaluation).
    ``others``: everything else the writer must carry over: optimizer state and
    training state tensors (averaged with ``merge.optimizer=average``, else
    copied from the newest source), keyed by their saved names.
    ``bytes_read`` counts the bytes of tensor data this process read, for the
    per-rank I/O test and ``benchmarks/sharded_reads.py``.
    """

    format: str = "?"

    def __init__(self, path: Path, tensors: dict[str, NativeTensor],
                 others: dict[str, NativeTensor] | None = None, hf_config: dict | None = None) -> None:
        self.path = Path(path)
        self.tensors = tensors
        self.others = others or {}
        self.hf_config = hf_config  # an HF config.json derived from what the run carries, when it can be
        self.bytes_read = 0
        #: model tensors merged and written back but not part of the HF model (Megatron's fp32 master
        #: weights): the only ones a map may leave unmapped
        self.merged_only: frozenset[str] = frozenset()

    def read(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        """One whole tensor (model or other), in its saved dtype, on the CPU."""
        raise NotImplementedError

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened tensor. This default reads the whole tensor; a format
        that can seek (safetensors, mmap'd torch files, DCP chunks) overrides it."""
        t = self.read(name).reshape(-1)
        return t[start:end].clone()

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Piece:
    """An HF tensor of ``shape`` made of native tensor ``native`` seen as ``[-1, row]``: its rows
    ``runs`` (``(start, stop)`` pairs, in order; None: all of them), then transposed if ``transpose``
    (2-D only, the whole tensor: nanoGPT's Linear weights vs GPT-2's Conv1D)."""

    native: str
    shape: tuple[int, ...]
    row: int = 0  # elements per native row; 0: the HF shape's row (prod(shape[1:]), or numel for 1-D)
    runs: tuple[tuple[int, int], ...] | None = None
    transpose: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_len(self) -> int:
        if self.row:
            return self.row
        if self.transpose:
            return self.shape[0]
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else max(self.numel, 1)

    def native_ranges(self, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """The flat native ranges that hold HF elements ``[start, end)``, in order (not transposed)."""
        end = self.numel if end is None else end
        r = self.row_len
        runs = self.runs if self.runs is not None else ((0, self.numel // r),)
        out, pos = [], 0  # pos: HF element where the current run starts
        for a, b in runs:
            n = (b - a) * r
            lo, hi = max(start, pos), min(end, pos + n)
            if lo < hi:
                s = a * r + (lo - pos)
                e = s + (hi - lo)
                if out and out[-1][1] == s:
                    out[-1] = (out[-1][0], e)
                else:
                    out.append((s, e))
            pos += n
            if pos >= end:
                break
        return out


# One layout a format may hold: (name, test on the native names, builder of the map from the
# native manifest and the parsed HF config.json).
@dataclass(frozen=True)
class LayoutMap:
    name: str
    hf_architecture: str
    matches: Callable[[Mapping[str, NativeTensor]], bool]
    build: Callable[[Mapping[str, NativeTensor], dict], dict[str, Piece]]


def rows_of_permutation(n_rows: int, permute: Callable[[torch.Tensor], torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """The row runs that ``permute`` (a function of a ``[n_rows, 1]`` tensor that reorders its rows)
    takes from the native tensor: e.g. HF's ``permute`` for RoPE in ``convert_llama_weights_to_hf``."""
    order = permute(torch.arange(n_rows, dtype=torch.int64).view(n_rows, 1)).reshape(-1).tolist()
    runs: list[list[int]] = []
    for i in order:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return tuple((a, b) for a, b in runs)


def assemble(ck: NativeCheckpoint, piece: Piece) -> torch.Tensor:
    """The HF tensor ``piece`` describes, read from ``ck``."""
    if piece.transpose:
        t = ck.read(piece.native)
        return t.reshape(-1, piece.row_len).t().contiguous().reshape(piece.shape)
    parts = [ck.read_flat(piece.native, s, e) for s, e in piece.native_ranges()]
    t = parts[0] if len(parts) == 1 else torch.cat(parts)
    return t.reshape(piece.shape)


def assemble_slice(ck: NativeCheckpoint, piece: Piece, start: int, end: int) -> torch.Tensor:
    """Elements ``[start, end)`` of the flattened HF tensor, reading only the native ranges that hold
    them (a transposed piece is read whole: its rows are the native's columns)."""
    if piece.transpose:
        return assemble(ck, piece).reshape(-1)[start:end].clone()
    parts = [ck.read_flat(piece.native, s, e) for s, e in piece.native_ranges(start, end)]
    if not parts:
        return torch.empty(0, dtype=ck.tensors[piece.native].dtype)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def check_map(path: Path, native: Mapping[str, NativeTensor], pieces: Mapping[str, Piece], layout: str,
              merged_only: frozenset[str] = frozenset()) -> None:
    """Refuse a map that reads past a native tensor, names one the checkpoint lacks, or leaves one of the
    model's tensors unread (its values would silently drop out of the evaluated model: e.g. a separate
    output layer read with a config that ties it to the embeddings)."""
    unread = sorted(set(native) - merged_only - {p.native for p in pieces.values()})
    if unread:
        raise CheckpointError(f"{path}: layout {layout!r} leaves {len(unread)} of the checkpoint's model tensors "
                              f"unmapped ({unread[:5]}), so the HF model would not hold them: is "
                              "checkpoints.config_dir the config of this model (tie_word_embeddings, num_hidden_layers)? "
                              "Else give a map of your own with checkpoints.name_map")
    for hf, p in pieces.items():
        t = native.get(p.native)
        if t is None:
            raise CheckpointError(f"{path}: layout {layout!r} maps {hf!r} from {p.native!r}, which the checkpoint "
                                  f"does not hold (it holds e.g. {sorted(native)[:5]})")
        ranges = p.native_ranges() if not p.transpose else [(0, p.numel)]
        got = sum(e - s for s, e in ranges)
        if got != p.numel or (ranges and ranges[-1][1] > t.numel) or (p.transpose and t.numel != p.numel):
            raise CheckpointError(f"{path}: layout {layout!r} maps {hf!r} (shape {list(p.shape)}) from {p.native!r} "
                                  f"(shape {list(t.shape)}), which does not hold those elements: is "
                                  "checkpoints.config_dir the config of this model?")


class Format:
    """What one framework's checkpoints are. Subclasses set ``name`` and implement the methods."""

    name: str = "?"
    #: Where the HF config.json comes from when checkpoints.config_dir is not given ("" when the
    #: format carries one itself: then :attr:`NativeCheckpoint.hf_config` is set on open).
    needs_config_dir: str = ""
    #: A "pip install ..." hint when reading needs the framework installed, else "".
    requires: str = ""

    def detect(self, path: Path) -> bool:  # pragma: no cover - interface
        """True when ``path`` is one checkpoint of this format (finished or not)."""
        raise NotImplementedError

    def complete(self, path: Path) -> bool:
        """True when the checkpoint at ``path`` has been written completely (the framework's own rule)."""
        return True

    def series_children(self, folder: Path) -> list[Path] | None:
        """A folder of this format's checkpoints (a run's checkpoint folder) -> its checkpoints, in any
        order; None when ``folder`` is not one. Default: the children that :meth:`detect` accepts."""
        kids = [c for c in folder.iterdir() if not c.name.startswith(".") and self.detect(c)]
        return kids or None

    def open(self, path: Path) -> NativeCheckpoint:  # pragma: no cover - interface
        raise NotImplementedError

    def maps(self) -> Sequence[LayoutMap]:  # pragma: no cover - interface
        """The built-in layouts, most specific first."""
        raise NotImplementedError

    def write(self, out: Path, template: NativeCheckpoint, produce: Callable[[str], torch.Tensor],
              names: Iterable[str]) -> None:  # pragma: no cover - interface
        """Write a checkpoint of this format into the (empty, temporary) folder ``out``.

        ``names`` are the tensors to write (model tensors, and ``template.others``
        too when the optimizer is merged or copied): ``produce(name)`` returns each,
        merged (fp32 accumulation, the newest's dtype), one at a time, so at most one
        merged tensor need be held. Everything that is not a tensor (metadata,
        ``_extra_state`` bytes, config files) is copied from ``template``, the newest
        source. The caller publishes ``out`` atomically and adds ``merge.yaml``.
        """
        raise NotImplementedError


@dataclass
class Opened:
    """A native checkpoint with the map that turns it into HF tensors."""

    native: NativeCheckpoint
    fmt: Format
    layout: str
    pieces: dict[str, Piece] = field(default_factory=dict)
