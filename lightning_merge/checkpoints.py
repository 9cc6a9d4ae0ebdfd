"""Opening checkpoints in every real format, the manifest, and lazy tensor reads.

One :class:`Checkpoint` in any format it reads (its ordered, checked series is
``series.py``'s :class:`~lightning_merge.series.CheckpointSeries`). For safetensors (single or sharded) the manifest comes
from the headers alone. ``pytorch_model.bin`` files (single or sharded) and
Lightning ``.ckpt`` files are memory-mapped with ``torch.load(weights_only=True)``,
which refuses pickles holding arbitrary objects: nothing user-supplied is ever
unpickled. A torch file must be a state dict (or a Lightning ``.ckpt`` holding
one): a training-state file such as nanoGPT's ``ckpt.pt`` is refused, naming
the state dicts inside it (``torchfiles.state_dict_of``). DeepSpeed ZeRO training
folders are consolidated with DeepSpeed's own ``zero_to_fp32`` (lazily).
Training frameworks' own formats (PyTorch DCP from torchtitan, Megatron-core and
OLMo-core; LitGPT; nanoGPT) are read through ``formats/``: the checkpoint's
tensors are then its framework's tensors mapped to the HF model's names, read
through the map (:attr:`Checkpoint.opened`). Formats recognised but not read
(PEFT adapters, GGUF, legacy Megatron) are refused by name
(``unread.unread_format``). Tensors are read one at a time
(:meth:`Checkpoint.read`), as the flat slice a rank keeps
(:meth:`Checkpoint.read_slice`, reading only those bytes where the format
allows).

Finding sources (hub repos, folders of checkpoints, selectors) lives in
``sources.py``, which builds on this module (and ``series.py`` on both). Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import formats
from .errors import CheckpointError
from .torchfiles import state_dict_of, torch_load
from .unread import unread_format

log = logging.getLogger(__name__)

__all__ = ["CheckpointError", "TensorInfo", "Checkpoint", "is_checkpoint", "has_tokenizer"]

# safetensors dtype tags -> torch dtypes (the subset models are saved in).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_BIN = "pytorch_model.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"
_FILE_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
# Wrapper prefixes that training frameworks put in front of the model's own names.
_WRAPPERS = ("module", "_forward_module", "model", "_orig_mod")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a safetensors header."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = -1  # absolute byte offset of the data in ``file`` (safetensors only)
    length: int = 0

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
        out[name] = TensorInfo(name, tuple(meta["shape"]), dtype, file, offset=8 + n + start,
                               length=end - start)
    return out


def _all_finite(t: torch.Tensor) -> bool:
    """True when every element is finite. A sum is non-finite iff some element is (or the sum
    overflows, then checked element by element): ~20x faster than ``torch.isfinite`` on CPU.
    fp16 sums overflow at 65504, so fp16 uses min/max instead."""
    if t.numel() == 0:
        return True
    if t.dtype == torch.float16:
        lo, hi = torch.aminmax(t)
        return math.isfinite(float(lo)) and math.isfinite(float(hi))
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _is_zero_dir(p: Path) -> bool:
    """A DeepSpeed ZeRO training folder: a ``latest`` tag file, or ``global_step*`` with model states."""
    if (p / "latest").is_file():
        return True
    return any(p.glob("global_step*/*model_states.pt"))


def is_checkpoint(p: Path) -> bool:
    """True for anything :meth:`Checkpoint.open` can read (a framework's checkpoint still being written too:
    ``sources.py`` applies the format's completion rule)."""
    if formats.find(p) is not None:
        return True
    if p.is_file():
        return p.suffix in _FILE_SUFFIXES
    return p.is_dir() and (any((p / f).exists() for f in (_SINGLE, _INDEX, _BIN, _BIN_INDEX)) or _is_zero_dir(p))


# Files any of which makes a folder hold a tokenizer that AutoTokenizer can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model", "vocab.txt", "tokenizer.tiktoken")


def has_tokenizer(folder: Path | None) -> bool:
    """True when ``folder`` holds tokenizer files (see ``TOKENIZER_FILES``)."""
    return folder is not None and any((Path(folder) / f).exists() for f in TOKENIZER_FILES)


def _not_read(path: Path) -> str | None:
    """The refusal for a format recognised but not read (DCP, Megatron, ...), from ``sources.py``."""
    return unread_format(path) or (None if path.is_dir() else
                                   f"{path}: not a checkpoint file (expected one of {', '.join(_FILE_SUFFIXES)})")


def strip_wrapper_prefix(state: dict, prefix: str | None = None) -> dict:
    """Remove a training wrapper's prefix (``module.``, ``_forward_module.``, a LightningModule's
    attribute such as ``model.``) shared by every key. ``prefix`` forces one; ``""`` strips none."""
    if prefix is None:
        while state:
            heads = {k.split(".", 1)[0] for k in state}
            if len(heads) != 1 or heads.pop() not in _WRAPPERS or any("." not in k for k in state):
                break
            state = {k.split(".", 1)[1]: v for k, v in state.items()}
        return state
    if prefix:
        bad = [k for k in state if not k.startswith(prefix)]
        if bad:
            raise CheckpointError(f"checkpoints.strip_prefix={prefix!r}: key {bad[0]!r} does not start with it")
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


@dataclass
class Checkpoint:
    """One checkpoint (HF folder, torch file, or ZeRO folder) and its manifest."""

    path: Path
    tensors: dict[str, TensorInfo]
    config_dir: Path | None = None
    _reader: Callable[[str], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _handles: dict[Path, object] = field(default_factory=dict, repr=False, compare=False)  # open files
    opened: "formats.Opened | None" = field(default=None, repr=False, compare=False)  # a framework's format
    _bytes_read: int = field(default=0, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path, strip_prefix: str | None = None, *, config_dir: str | Path | None = None,
             name_map: str | None = None) -> "Checkpoint":
        """Open any supported format; raise :class:`CheckpointError` naming the file at fault.

        ``config_dir`` and ``name_map`` matter for training frameworks' formats only: the HF config
        the map needs (else the one the run carries), and a map of the user's own
        (``checkpoints.name_map``)."""
        path = Path(path).expanduser()
        if not path.exists():
            raise CheckpointError(f"{path}: does not exist")
        fmt = formats.find(path)
        if fmt is not None:
            return cls._from_format(path, fmt, Path(config_dir).expanduser() if config_dir else None, name_map)
        cfg = path if (path.is_dir() and (path / "config.json").exists()) else None
        if path.is_file():
            if path.suffix == ".safetensors":
                return cls._from_safetensors(path, [path], None)
            if path.suffix not in _FILE_SUFFIXES:
                raise CheckpointError(_not_read(path))
            state = state_dict_of(path, torch_load(path))
            return cls._from_state(path, state, None, strip_prefix)
        if (path / _INDEX).exists():
            return cls._from_safetensors(path, cls._index_files(path, _INDEX), cfg)
        if (path / _SINGLE).exists():
            return cls._from_safetensors(path, [path / _SINGLE], cfg)
        if (path / _BIN_INDEX).exists() or (path / _BIN).exists():
            files = cls._index_files(path, _BIN_INDEX) if (path / _BIN_INDEX).exists() else [path / _BIN]
            state: dict = {}
            for f in files:
                state.update(state_dict_of(f, torch_load(f)))
            return cls._from_state(path, state, cfg, strip_prefix="")
        if _is_zero_dir(path):
            return cls._from_zero(path, cfg, strip_prefix)
        raise CheckpointError(_not_read(path) or f"{path}: no {_SINGLE}, {_INDEX}, {_BIN} or DeepSpeed ZeRO "
                              f"checkpoint found (found: {sorted(p.name for p in path.iterdir())[:8]})")

    @staticmethod
    def _index_files(path: Path, index_name: str) -> list[Path]:
        index = path / index_name
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, OSError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from e
        files = []
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).exists():
                raise CheckpointError(f"{index}: names shard {shard!r}, which is missing from {path}")
            files.append(path / shard)
        return files

    @classmethod
    def _from_safetensors(cls, path: Path, files: list[Path], cfg: Path | None) -> "Checkpoint":
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            tensors.update(read_safetensors_header(f))
        if not tensors:
            raise CheckpointError(f"{path}: holds no tensors")
        return cls(path=path, tensors=tensors, config_dir=cfg)

    @classmethod
    def _from_state(cls, path: Path, state: dict, cfg: Path | None, strip_prefix: str | None) -> "Checkpoint":
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if not state:
            raise CheckpointError(f"{path}: holds no tensors")
        state = strip_wrapper_prefix(state, strip_prefix)
        tensors = {k: TensorInfo(k, tuple(v.shape), v.dtype, path) for k, v in state.items()}
        return cls(path=path, tensors=tensors, config_dir=cfg, _reader=state.__getitem__)

    @classmethod
    def _from_zero(cls, path: Path, cfg: Path | None, strip_prefix: str | None) -> "Checkpoint":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        try:  # DeepSpeed's own consolidation; lazy: each tensor is gathered when read
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(path), lazy_mode=True)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{path}: unreadable DeepSpeed ZeRO checkpoint ({e})") from e
        lazy = strip_wrapper_prefix(dict(lazy), strip_prefix)
        tensors = {k: TensorInfo(k, tuple(v.shape), v.dtype, path) for k, v in lazy.items()}
        return cls(path=path, tensors=tensors, config_dir=cfg,
                   _reader=lambda name: lazy[name].contiguous())

    @classmethod
    def _from_format(cls, path: Path, fmt, config_dir: Path | None, name_map: str | None) -> "Checkpoint":
        opened = formats.open_mapped(path, fmt, config_dir, name_map)
        native, pieces = opened.native, opened.pieces
        tensors = {hf: TensorInfo(hf, tuple(p.shape), native.tensors[p.native].dtype, path)
                   for hf, p in pieces.items()}
        if not tensors:
            raise CheckpointError(f"{path}: its {fmt.name} layout {opened.layout!r} maps no tensors")
        cfg = config_dir if config_dir is not None and (config_dir / "config.json").is_file() else None
        if cfg is None and native.hf_config is not None:
            cfg = _derived_config_dir(native.hf_config, path)
        return cls(path=path, tensors=tensors, config_dir=cfg,
                   _reader=lambda n: formats.base.assemble(native, pieces[n]), opened=opened)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def bytes_read(self) -> int:
        """Bytes of tensor data read from disk so far (for safetensors and the frameworks' formats)."""
        return self._bytes_read + (self.opened.native.bytes_read if self.opened is not None else 0)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (lazily; shards are opened once) and check it is finite."""
        info = self.tensors[name]
        if self._reader is not None:
            t = self._reader(name)
        else:
            # A plain read into fresh memory rather than an mmap: mapped pages of every shard touched
            # would stay in the process (peak RSS ~ K whole checkpoints while streaming a merge);
            # this buffer is freed as soon as the caller drops the tensor.
            t = self._read_range(info, 0, math.prod(info.shape)).reshape(info.shape)
        if t.is_floating_point() and not _all_finite(t):
            raise CheckpointError(f"{info.file}: tensor {name!r} holds non-finite values (NaN or inf)")
        return t

    def _read_range(self, info: TensorInfo, start: int, end: int, buf: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, end)`` of a safetensors tensor, read from the file and nothing else: into fresh
        memory, or into the first bytes of ``buf`` (a caller's uint8 buffer, reused across reads)."""
        fh = self._handles.get(info.file)
        if fh is None:
            fh = open(info.file, "rb", buffering=0)
            self._handles[info.file] = fh
        esize = torch.empty((), dtype=info.dtype).element_size()
        n = (end - start) * esize
        if n == 0:
            return torch.empty(0, dtype=info.dtype)
        if buf is not None and buf.numel() < n:
            raise ValueError(f"read buffer of {buf.numel()} bytes for a {n}-byte slice of {info.name!r}")
        raw = torch.empty(n, dtype=torch.uint8) if buf is None else buf[:n]  # not zero-filled: read over at once
        view, got, pos = memoryview(raw.numpy()), 0, info.offset + start * esize
        while got < n:  # positional reads (no shared file offset); a regular file returns short only at its end
            k = os.preadv(fh.fileno(), [view[got:]], pos + got)
            if k <= 0:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {info.name!r}")
            got += k
        self._bytes_read += n
        return raw.view(info.dtype)

    @property
    def reads_ranges(self) -> bool:
        """True when :meth:`read_slice` reads only the slice's bytes (safetensors), so a large tensor can be
        streamed slice by slice; for other formats it costs up to a whole tensor's read per slice."""
        return self._reader is None and self.opened is None

    def read_slice_into(self, name: str, start: int, end: int, buf: torch.Tensor) -> torch.Tensor:
        """:meth:`read_slice` into ``buf``, a caller's uint8 buffer reused from slice to slice (no allocation
        per read); returns a 1-D view of its first bytes. Needs :attr:`reads_ranges` (safetensors) and a
        buffer of at least the slice's bytes. Checked finite, as :meth:`read_slice` is."""
        info = self.tensors[name]
        if not self.reads_ranges:
            raise CheckpointError(f"{self.path}: read_slice_into needs a safetensors checkpoint; use read_slice")
        if not 0 <= start <= end <= math.prod(info.shape):
            raise CheckpointError(f"{self.path}: slice [{start}, {end}) is outside tensor {name!r} "
                                  f"({math.prod(info.shape)} elements)")
        t = self._read_range(info, start, end, buf)
        if t.is_floating_point() and not _all_finite(t):
            raise CheckpointError(f"{info.file}: tensor {name!r} holds non-finite values (NaN or inf)")
        return t

    def read_slice(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened tensor ``name`` (a fresh 1-D tensor), read alone where
        the format allows: safetensors by byte range, frameworks' formats through their map and reader
        (DCP by the saved chunks that overlap it, torch files through mmap). Other formats (``.bin``,
        ``.ckpt``, ZeRO) read the whole tensor and slice it. Checked finite, as :meth:`read` is."""
        info = self.tensors[name]
        if not 0 <= start <= end <= math.prod(info.shape):
            raise CheckpointError(f"{self.path}: slice [{start}, {end}) is outside tensor {name!r} "
                                  f"({math.prod(info.shape)} elements)")
        if self.opened is not None:
            t = formats.base.assemble_slice(self.opened.native, self.opened.pieces[name], start, end)
        elif self._reader is None:
            t = self._read_range(info, start, end)
        else:
            return self.read(name).reshape(-1)[start:end].clone()
        if t.is_floating_point() and not _all_finite(t):
            raise CheckpointError(f"{info.file}: tensor {name!r} holds non-finite values (NaN or inf)")
        return t

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()
        if self.opened is not None:
            self.opened.native.close()


def _config_cache() -> Path:
    root = os.environ.get("LIGHTNING_MERGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lightning_merge")
    return Path(root) / "configs"


def _derived_config_dir(hf_config: dict, path: Path) -> Path:
    """A folder holding ``hf_config`` as config.json and the tokenizer files found beside the checkpoint
    (its folder or its ``tokenizer/``, else the run folder above it): what a framework's run carries, laid out as the HF
    folder the model and tokenizer are loaded from. Keyed on the config and the tokenizer files (path, size,
    mtime), so every rank finds the same and a changed tokenizer gets a new folder."""
    here = path if path.is_dir() else path.parent
    # beside the weights, in a tokenizer/ folder of the checkpoint (Megatron's --save-tokenizer-assets),
    # else in the run folder above it (LitGPT, nanoGPT)
    tok = next((d for d in (here, here / "tokenizer", here.parent) if has_tokenizer(d)), None)
    text = json.dumps(hf_config, indent=2, sort_keys=True) + "\n"
    files = [f for f in (sorted(tok.iterdir()) if tok else [])
             if f.is_file() and (f.name in TOKENIZER_FILES or f.name in _TOKENIZER_EXTRAS)]
    stamp = "".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns};" for f in files)
    out = _config_cache() / hashlib.sha256((text + stamp).encode()).hexdigest()[:16]
    if not (out / "config.json").is_file():
        # built under a private name and renamed whole: ranks opening the same checkpoint at once never see
        # a tokenizer file half copied by another
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in files:
            shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(text)
        try:
            os.rename(tmp, out)
        except OSError:  # another process published it first: the same content
            shutil.rmtree(tmp, ignore_errors=True)
            if not (out / "config.json").is_file():
                raise
    return out


_TOKENIZER_EXTRAS = ("merges.txt", "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def __getattr__(name: str):
    """``lightning_merge.checkpoints.CheckpointSeries``, the documented public entry point, now lives in
    ``series.py`` (which builds on this module): resolved on first access, so no import runs back up."""
    if name == "CheckpointSeries":
        from .series import CheckpointSeries

        return CheckpointSeries
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
