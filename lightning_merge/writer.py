"""The streaming merged-model writer: ``write_merged`` and its size-capped safetensors shards.

Tensors are read, merged (``merge.merge_into``, fp32 accumulation) and appended to
their shard file in slices of a few MiB, and the folder is published atomically.
The merge is element-wise, so merging a flat slice ``[a, b)`` of every source
gives exactly those elements of the whole-tensor merge: the output is the same,
bit for bit, whatever the slice size. Three stages overlap, one thread each: a
reader fills the next slices of every source into reused buffers, this thread
merges, a writer appends them to the shard with ``O_DIRECT`` where the
filesystem allows (file reads and writes, and torch's kernels, release the
GIL; torch runs one intra-op thread meanwhile, so the stages do not
oversubscribe the cores). Peak memory is a few slices per source, not K copies
of the largest tensor (``benchmarks/write_vs_mergekit.py``,
``benchmarks/write_scale.py``).
Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import torch

from .errors import DiskFullError, disk_full
from .io import atomic_write_text, publishing_dir
from .merge import MergeError, check_weights, merge_into, read_source
from .series import CheckpointSeries

__all__ = ["write_merged"]

# Bytes of one source's slice: large enough that the per-slice overhead (a few Python calls, one read
# and one write) is lost in the copying, small enough that the slices just read are still in cache
# when they are merged (K x 4 MiB within a 32 MiB L3; 16 MiB slices were slower, benchmarks/README.md).
SLICE_BYTES = 4 << 20
_AHEAD = 2  # slices read ahead of the merge (each a set of K reused buffers)
_OUT_SLOTS = 2  # output buffers: one being merged into while the other is written
_STAGE_BYTES = 16 << 20  # the shard writer's aligned block (16 MiB direct writes: ~1.9 GB/s here, 4 MiB: 1.1)

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


_ALIGN = 4096  # O_DIRECT's alignment of file offsets, lengths and memory (a multiple of any block size in use)


def _aligned(nbytes: int) -> torch.Tensor:
    """A uint8 buffer of ``nbytes`` whose address is a multiple of ``_ALIGN``."""
    raw = torch.empty(nbytes + _ALIGN, dtype=torch.uint8)
    off = -raw.data_ptr() % _ALIGN
    return raw[off:off + nbytes]


class _ShardWriter:
    """Writes one safetensors file slice by slice, so a shard (or a tensor) is never held whole in memory.

    The header (names, dtypes, shapes, offsets) is known from the manifest before
    any data is merged, so it is written first and each merged slice is appended
    as soon as it exists, in the header's order; the file is the same as
    ``save_file`` would write for these tensors (a little-endian host is
    assumed, as safetensors does).

    Bytes go through ``stage``, an aligned buffer written whole with ``O_DIRECT``
    where the filesystem allows it: the page cache is bypassed, so no page is
    allocated per byte written. On a VM whose freed memory goes back to the host
    a fresh page cache page costs a fault on the host, and buffered writes ran at
    ~0.3 GB/s against ~1.9 GB/s direct (``benchmarks/README.md``); on any machine
    a 13 GB output no longer evicts the sources from the cache. The tail is padded
    to the alignment and the file truncated to its size; filesystems without
    ``O_DIRECT`` (tmpfs) get plain writes of the same bytes.
    """

    def __init__(self, path: Path, layout: list[tuple[str, tuple, torch.dtype]], stage: torch.Tensor) -> None:
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
        self.path, self.i, self.done, self.closed = path, 0, 0, False
        self.stage, self.fill, self.pos = stage, 0, 0  # bytes in the stage; file offset of its first byte
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.fd = self.direct = None
        if getattr(os, "O_DIRECT", 0):
            try:
                self.fd, self.direct = os.open(path, flags | os.O_DIRECT, 0o666), True
            except OSError as e:  # no O_DIRECT on this filesystem (tmpfs): plain writes
                if e.errno != errno.EINVAL:
                    raise
        if self.fd is None:
            self.fd, self.direct = os.open(path, flags, 0o666), False
        # written with the first slice, so that only the writer thread touches the stage (shards share it)
        self.header = torch.frombuffer(bytearray(len(raw).to_bytes(8, "little") + raw), dtype=torch.uint8)

    def _pwrite(self, view: memoryview, pos: int) -> None:
        while len(view):
            try:
                n = os.pwrite(self.fd, view, pos)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                # O_DIRECT refused after all (an alignment this device does not take): plain writes from here
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                continue
            view, pos = view[n:], pos + n

    def _append(self, data: torch.Tensor) -> None:
        """Copy ``data`` (uint8) into the stage, writing it each time it fills (full, aligned blocks)."""
        size = self.stage.numel()
        while data.numel():
            k = min(size - self.fill, data.numel())
            self.stage[self.fill:self.fill + k].copy_(data[:k])
            self.fill += k
            data = data[k:]
            if self.fill == size:
                self._pwrite(memoryview(self.stage.numpy()), self.pos)
                self.pos += size
                self.fill = 0

    def write(self, t: torch.Tensor) -> None:
        """Append ``t``: the next slice (or all) of the current tensor's bytes."""
        name, nbytes = self.expected[self.i]
        data = t.contiguous().view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if self.done + data.numel() > nbytes:  # pragma: no cover - the layout comes from the same manifest
            raise MergeError(f"{self.path}: tensor {name!r} got {self.done + data.numel()} bytes, header says {nbytes}")
        if self.header is not None:
            self._append(self.header)
            self.header = None
        self._append(data)
        self.done += data.numel()
        if self.done == nbytes:
            self.i, self.done = self.i + 1, 0

    def close(self) -> None:
        """Write the tail, fsync and close the complete file."""
        if self.i != len(self.expected):  # pragma: no cover
            self.abort()
            raise MergeError(f"{self.path}: wrote {self.i} of {len(self.expected)} tensors")
        if self.header is not None:  # pragma: no cover - every shard holds a tensor, so write() ran
            self._append(self.header)
            self.header = None
        size = self.pos + self.fill
        if self.fill:
            tail = self.fill if not self.direct else self.fill + (-self.fill % _ALIGN)
            self.stage[self.fill:tail].zero_()
            self._pwrite(memoryview(self.stage[:tail].numpy()), self.pos)
            if tail != self.fill:
                os.ftruncate(self.fd, size)
        os.fsync(self.fd)
        self.abort()

    def abort(self) -> None:
        """Close the file (after a failure: the folder it is in is removed)."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    def __enter__(self) -> "_ShardWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Piece(NamedTuple):
    """Elements ``[start, end)`` of tensor ``name``, the next bytes of shard ``shard``."""

    shard: int
    name: str
    start: int
    end: int
    dtype: torch.dtype  # the output's
    last: bool  # the shard's last piece


def _pieces(series: CheckpointSeries, shards: list[list[str]], dtype: torch.dtype | None,
            slice_bytes: int) -> list[_Piece]:
    """Every tensor cut into flat slices of at most ``slice_bytes`` per source (and output), in write order."""
    out: list[_Piece] = []
    for si, shard in enumerate(shards):
        for n in shard:
            odt = _out_dtype(series, n, dtype)
            esize = max(d.itemsize for d in [odt] + [ck.tensors[n].dtype for ck in series.checkpoints])
            step = max(1, slice_bytes // esize)
            total = math.prod(series.newest.tensors[n].shape)
            for a in range(0, max(total, 1), step):
                out.append(_Piece(si, n, a, min(a + step, total), odt, False))
        out[-1] = out[-1]._replace(last=True)
    return out


class _Into:
    """A checkpoint whose ``read_slice`` fills ``buf`` (``Checkpoint.read_slice_into``), so that
    ``merge.read_source`` reads into a reused buffer and still words a failure as it always does."""

    def __init__(self, ck, buf: torch.Tensor) -> None:
        self.ck, self.buf, self.path = ck, buf, ck.path

    def read_slice(self, name: str, start: int, end: int) -> torch.Tensor:
        return self.ck.read_slice_into(name, start, end, self.buf)


class _SliceReader:
    """Reads each piece's slice of every source, ahead of the merge, into ``_AHEAD`` sets of reused buffers.

    Safetensors sources are read by byte range (``Checkpoint.reads_ranges``) into a
    buffer per source and set. Other formats (``.bin``, ``.ckpt``, ZeRO, the
    frameworks' formats) read a whole tensor once, at its first piece, and hand
    out views of it. Runs in one thread (so pieces are read in order); a set is
    reused only after the piece that used it was merged (see ``_write_pieces``).
    """

    def __init__(self, checkpoints, pieces: list[_Piece]) -> None:
        self.cks = list(checkpoints)
        self.ranged = [ck.reads_ranges for ck in self.cks]
        sizes = [max((p.end - p.start) * ck.tensors[p.name].dtype.itemsize for p in pieces) if r else 0
                 for ck, r in zip(self.cks, self.ranged)]
        self.sets = [[_Into(ck, torch.empty(size, dtype=torch.uint8)) if r else None
                      for ck, r, size in zip(self.cks, self.ranged, sizes)] for _ in range(_AHEAD)]
        self.whole: list[tuple[str, torch.Tensor] | None] = [None] * len(self.cks)

    def read(self, p: _Piece, slot: int) -> list[torch.Tensor]:
        srcs = []
        for k, ck in enumerate(self.cks):
            if self.ranged[k]:
                srcs.append(read_source(self.sets[slot][k], p.name, p.start, p.end))
                continue
            if self.whole[k] is None or self.whole[k][0] != p.name:
                self.whole[k] = None  # the previous tensor goes before the next is read
                self.whole[k] = (p.name, read_source(ck, p.name).reshape(-1))
            srcs.append(self.whole[k][1][p.start:p.end])
        return srcs


def write_merged(series: CheckpointSeries, weights: Sequence[float], out_dir: str | Path, *,
                 dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3,
                 normalize: bool | None = False, nonfloat: str = "equal", metadata: Mapping | None = None,
                 extra_files: Mapping[str, str] | None = None, slice_bytes: int = SLICE_BYTES) -> Path:
    """Stream the merge of ``series`` with ``weights`` into an HF checkpoint at ``out_dir``.

    Tensors are read, merged and appended to their shard file in flat slices of
    at most ``slice_bytes`` per source, reading ahead while merging and writing,
    so peak memory is a few slices per source (plus, for formats without
    byte-range reads, one whole tensor per source), never a whole shard, let
    alone K whole checkpoints; the bytes do not depend on ``slice_bytes``. While it
    runs, torch's intra-op threads are capped (a quarter of the cores, at least
    one) and restored after. Shards
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
                             extra_files, slice_bytes)
    except OSError as e:
        if e.errno == errno.ENOSPC and not isinstance(e, DiskFullError):  # the disk filled up meanwhile
            raise disk_full(out_dir, need, "the merged model (and a 2% + 1 MiB margin)") from e
        raise


def _write_pieces(series: CheckpointSeries, w: list[float], tmp: Path, shards: list[list[str]],
                  fnames: list[str], dtype: torch.dtype | None, nonfloat: str, slice_bytes: int) -> None:
    """Read, merge and append every piece, the three stages overlapped (see the module docstring)."""
    pieces = _pieces(series, shards, dtype, slice_bytes)
    reader = _SliceReader(series.checkpoints, pieces)
    out_bytes = max((p.end - p.start) * p.dtype.itemsize for p in pieces)
    outs = [torch.empty(out_bytes, dtype=torch.uint8) for _ in range(_OUT_SLOTS)]
    stage = _aligned(_STAGE_BYTES)  # every shard's, in turn: only the writer thread uses it, in order
    writing: list[Future | None] = [None] * _OUT_SLOTS  # the write of each output buffer, when in flight
    reads: deque[Future] = deque()
    open_writers: list[_ShardWriter] = []
    closes: list[Future] = []
    failed: list[BaseException] = []  # after a write fails, the writer thread does no more I/O

    def in_order(fn, *args):
        if failed:
            return
        try:
            fn(*args)
        except BaseException as e:
            failed.append(e)
            raise

    # The three stages are the parallelism. torch's own threads on top (a team per stage that runs a
    # kernel) oversubscribe the cores, and a team waiting on a descheduled thread is slow: on a busy
    # 2-core machine the merge took 25 s with 2 threads, 0.9 s with 1 (benchmarks/README.md).
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)) // 4)))
    rpool, wpool = ThreadPoolExecutor(1, "lm-read"), ThreadPoolExecutor(1, "lm-write")
    try:
        for i, p in enumerate(pieces):
            # piece j uses buffer set j % _AHEAD, free once piece j - _AHEAD was merged (last iteration)
            for j in range(i + len(reads), min(i + _AHEAD, len(pieces))):
                reads.append(rpool.submit(reader.read, pieces[j], j % _AHEAD))
            srcs = reads.popleft().result()
            if not open_writers or open_writers[-1].path.name != fnames[p.shard]:
                layout = [(n, tuple(series.newest.tensors[n].shape), _out_dtype(series, n, dtype))
                          for n in shards[p.shard]]
                open_writers.append(_ShardWriter(tmp / fnames[p.shard], layout, stage))
            slot = i % _OUT_SLOTS
            if writing[slot] is not None:
                writing[slot].result()  # its last write is done: the buffer is free
            nbytes = (p.end - p.start) * p.dtype.itemsize
            out = outs[slot][:nbytes].view(p.dtype)
            if nbytes:
                merge_into({p.name: out}, [{p.name: t} for t in srcs], w, nonfloat=nonfloat)
            del srcs
            writing[slot] = wpool.submit(in_order, open_writers[-1].write, out)
            if p.last:
                closes.append(wpool.submit(in_order, open_writers[-1].close))
            if failed:  # a write or a shard's fsync failed: stop at once, with its error
                raise failed[0]
        for f in [*writing, *closes]:
            if f is not None:
                f.result()
    finally:
        for f in reads:
            f.cancel()
        rpool.shutdown(wait=True, cancel_futures=True)
        wpool.shutdown(wait=True, cancel_futures=True)
        for sw in open_writers:  # after a failure: the folder is removed, only the handles need closing
            sw.abort()
        torch.set_num_threads(threads)


def _write_merged(series, w, out_dir, shards, need, dtype, normalize, nonfloat, metadata, extra_files,
                  slice_bytes) -> Path:
    total = len(shards)
    fnames = ["model.safetensors" if total == 1 else f"model-{si + 1:05d}-of-{total:05d}.safetensors"
              for si in range(total)]
    weight_map = {n: fnames[si] for si, shard in enumerate(shards) for n in shard}
    with publishing_dir(out_dir) as tmp:
        _write_pieces(series, w, tmp, shards, fnames, dtype, nonfloat, slice_bytes)
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
