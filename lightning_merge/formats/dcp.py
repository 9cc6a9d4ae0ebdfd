"""PyTorch Distributed Checkpoint (DCP) folders: read by chunk without a process group, written streaming.

A DCP folder (``torch.distributed.checkpoint.save``: torchtitan, Megatron-core
``torch_dist``, OLMo-core) holds ``.metadata`` (a pickled
``torch.distributed.checkpoint.metadata.Metadata``: every key's global shape,
dtype and the saved chunks, each a box of offsets and sizes, plus where each
chunk lies in which ``__R_N.distcp`` file) and the ``.distcp`` files. The
manifest comes from :func:`read_metadata` alone; no tensor is read to open.

Reading (:class:`DCPCheckpoint`) drives the storage reader directly with read
items made by DCP's own resharding helper (``create_read_items_for_chunk_list``)
for the box a caller asks for, so no process group is needed and only the saved
chunks that overlap the box are read. A DCP file stores each chunk as one
``torch.save`` record, and ``FileSystemReader`` hands over whole records: a
slice costs the saved chunks it overlaps, so per-rank reads fall with the world
size only when the run itself saved sharded chunks (FSDP/ZeRO-3 saves; a
checkpoint saved by one process has one chunk per tensor, read whole). To keep
that from costing a chunk per row run (RoPE un-permutes read a tensor in many
runs), the last box read (the row span of the chunks it overlapped) is kept
until another tensor is read: peak memory is one such span.
``bytes_read`` counts the bytes of the records read.

Writing (:func:`write_dcp`) goes through ``torch.distributed.checkpoint.save``
with ``no_dist=True`` and a planner whose ``resolve_data`` asks for each tensor
only when the (single-threaded) ``FileSystemWriter`` writes it: one merged
tensor at a time. The result loads with ``dcp.load`` in any world size.

Pure: nothing here knows about ranks, Lightning or Hydra.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..errors import CheckpointError
from .base import Format, NativeCheckpoint, NativeTensor

__all__ = ["METADATA", "DCPCheckpoint", "DCPFormat", "is_dcp_dir", "read_metadata", "write_dcp"]

log = logging.getLogger(__name__)

METADATA = ".metadata"


def is_dcp_dir(path: Path) -> bool:
    """A folder DCP wrote into: ``.metadata`` or any ``.distcp`` file (finished or not)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return (path / METADATA).is_file() or any(p.suffix == ".distcp" for p in path.iterdir())


def read_metadata(path: Path, reader_factory: Callable[[str], object] | None = None):
    """DCP's ``Metadata`` of folder ``path`` (names, shapes, dtypes, chunks) from ``.metadata`` alone."""
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    if not (path / METADATA).is_file():
        raise CheckpointError(f"{path}: a DCP folder without {METADATA}: the checkpoint is still being written (or "
                              "its save failed); wait for it to finish, or name a finished one")
    factory = reader_factory or FileSystemReader
    try:
        return factory(str(path)).read_metadata()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path / METADATA}: unreadable DCP metadata ({type(e).__name__}: {e}); is the "
                              "checkpoint complete?") from e


class _BoxPlanner:
    """The least of a ``LoadPlanner`` that ``FileSystemReader.read_data`` uses: destinations by key."""

    def __init__(self, dest: Mapping[str, torch.Tensor]) -> None:
        self.dest = dest
        self.bytes: dict[str, bytes] = {}

    def resolve_tensor(self, item) -> torch.Tensor:
        from torch.distributed._shard._utils import narrow_tensor_by_index

        return narrow_tensor_by_index(self.dest[item.dest_index.fqn], item.dest_offsets, item.lengths)

    def commit_tensor(self, item, tensor) -> None:
        pass

    def load_bytes(self, item, value: io.BytesIO) -> None:
        self.bytes[item.dest_index.fqn] = value.read()


class DCPCheckpoint(NativeCheckpoint):
    """The model (and other) tensors of one DCP folder.

    ``model_keys`` / ``other_keys``: our name -> the DCP key (fqn) it is saved
    under (a format strips a ``model.`` prefix, or keeps it). Byte entries
    (``BytesStorageMetadata``: Megatron's ``_extra_state``, torchtitan's
    ``train_state``) are listed in ``model_bytes`` / ``other_bytes`` by key and
    read with :meth:`read_bytes`; the writer copies them, never merges them.
    """

    format = "dcp"

    def __init__(self, path: Path, metadata, model_keys: Mapping[str, str], other_keys: Mapping[str, str] | None = None,
                 hf_config: dict | None = None, reader_factory: Callable[[str], object] | None = None,
                 model_bytes: Iterable[str] = (), other_bytes: Iterable[str] = ()) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.metadata = metadata
        self.keys: dict[str, str] = {**dict(model_keys), **dict(other_keys or {})}
        self.model_bytes = list(model_bytes)
        self.other_bytes = list(other_bytes)
        self._factory = reader_factory or FileSystemReader
        self._reader = None
        self._cache: tuple[str, int, int, torch.Tensor] | None = None  # (fqn, row0, row1, rows)

        def manifest(names: Mapping[str, str]) -> dict[str, NativeTensor]:
            out = {}
            for name, fqn in names.items():
                md = metadata.state_dict_metadata.get(fqn)
                if not isinstance(md, TensorStorageMetadata):
                    raise CheckpointError(f"{path}: DCP key {fqn!r} is not a saved tensor")
                out[name] = NativeTensor(name, tuple(md.size), md.properties.dtype)
            return out

        super().__init__(path, manifest(model_keys), manifest(other_keys or {}), hf_config)

    # -- reading ---------------------------------------------------------------------------------------
    def _storage(self):
        if self._reader is None:
            reader = self._factory(str(self.path))
            reader.set_up_storage_reader(self.metadata, True)
            self._reader = reader
        return self._reader

    def _run(self, items: list, planner: _BoxPlanner) -> None:
        from torch.distributed.checkpoint.planner import LoadPlan

        reader = self._storage()
        plan = reader.prepare_local_plan(LoadPlan(items))
        plan = reader.prepare_global_plan([plan])[0]
        reader.read_data(plan, planner).wait()
        seen = {it.storage_index for it in plan.items}
        self.bytes_read += sum(self.metadata.storage_data[i].length for i in seen)

    def _read_box(self, fqn: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        md = self.metadata.state_dict_metadata[fqn]
        out = torch.empty(sizes, dtype=md.properties.dtype)
        if out.numel() == 0:
            return out
        box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(fqn, md, [box])
        covered = sum(math.prod(it.lengths) for it in items)
        if covered != out.numel():
            raise CheckpointError(f"{self.path}: DCP key {fqn!r}: the saved chunks cover {covered} of the "
                                  f"{out.numel()} elements asked for (offsets {list(offsets)}, sizes {list(sizes)}): "
                                  "the checkpoint is incomplete")
        self._run(items, _BoxPlanner({fqn: out}))
        return out

    def _fqn(self, name: str) -> str:
        fqn = self.keys.get(name)
        if fqn is None:
            raise CheckpointError(f"{self.path}: holds no tensor {name!r}")
        return fqn

    def read(self, name: str) -> torch.Tensor:
        fqn = self._fqn(name)
        shape = tuple(self.metadata.state_dict_metadata[fqn].size)
        c = self._cache
        if c is not None and c[0] == fqn and shape and c[1] == 0 and c[2] == shape[0]:
            return c[3].clone()
        return self._read_box(fqn, (0,) * len(shape), shape)

    def read_flat(self, name: str, start: int, end: int) -> torch.Tensor:
        fqn = self._fqn(name)
        md = self.metadata.state_dict_metadata[fqn]
        shape = tuple(md.size)
        if len(shape) == 0:
            return self.read(name).reshape(-1)[start:end].clone()
        row = math.prod(shape[1:])
        if end <= start or row == 0:
            return torch.empty(0, dtype=md.properties.dtype)
        r0, r1 = start // row, -(-end // row)
        c = self._cache
        if not (c is not None and c[0] == fqn and c[1] <= r0 and r1 <= c[2]):
            # Widen to the row span of the saved chunks the rows overlap: those are read whole anyway.
            lo, hi = r0, r1
            for ch in md.chunks:
                a, b = ch.offsets[0], ch.offsets[0] + ch.sizes[0]
                if a < r1 and b > r0:
                    lo, hi = min(lo, a), max(hi, b)
            self._cache = None
            rows = self._read_box(fqn, (lo,) + (0,) * (len(shape) - 1), (hi - lo,) + shape[1:])
            c = self._cache = (fqn, lo, hi, rows)
        flat = c[3].reshape(-1)
        return flat[start - c[1] * row:end - c[1] * row].clone()

    def read_bytes(self, fqn: str) -> bytes:
        """A byte entry (``BytesStorageMetadata``), by its DCP key."""
        from torch.distributed.checkpoint.metadata import MetadataIndex
        from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

        planner = _BoxPlanner({})
        item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(fqn), dest_offsets=torch.Size([]),
                        storage_index=MetadataIndex(fqn), storage_offsets=torch.Size([]), lengths=torch.Size([]))
        self._run([item], planner)
        return planner.bytes[fqn]

    def close(self) -> None:
        self._cache = None
        self._reader = None


def _stream_planner(produce: Callable[[str], torch.Tensor | bytes]):
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class _StreamPlanner(DefaultSavePlanner):
        """DCP's default plan over a manifest of meta tensors; each tensor is made when it is written."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, dedup_save_to_lowest_rank=False)

        def resolve_data(self, write_item):
            fqn = write_item.index.fqn
            value = produce(fqn)
            if write_item.type == WriteItemType.BYTE_IO:
                return io.BytesIO(value)
            want = write_item.tensor_data.size
            if tuple(value.shape) != tuple(want) or value.dtype != write_item.tensor_data.properties.dtype:
                raise CheckpointError(f"DCP writer: {fqn!r} was produced as {value.dtype} {list(value.shape)}, "
                                      f"planned as {write_item.tensor_data.properties.dtype} {list(want)}")
            return value.contiguous()

    return _StreamPlanner()


def write_dcp(out: Path, tensors: Mapping[str, NativeTensor], produce: Callable[[str], torch.Tensor],
              byte_entries: Mapping[str, bytes] | None = None) -> None:
    """Write a DCP folder ``out`` holding ``tensors`` (DCP key -> shape and dtype), each made by
    ``produce(key)`` when it is written (one at a time), and ``byte_entries`` as they are."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    byte_entries = dict(byte_entries or {})
    plan_sd: dict[str, object] = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}
    plan_sd.update({k: io.BytesIO(v) for k, v in byte_entries.items()})

    def make(key: str):
        return byte_entries[key] if key in byte_entries else produce(key)

    Path(out).mkdir(parents=True, exist_ok=True)
    writer = FileSystemWriter(str(out), single_file_per_rank=True, sync_files=True, thread_count=1,
                              per_thread_copy_ahead=0)
    dcp.save(plan_sd, storage_writer=writer, planner=_stream_planner(make), no_dist=True)
    log.info("wrote DCP checkpoint %s (%d tensors, %d byte entries)", out, len(tensors), len(byte_entries))


class DCPFormat(Format):
    """What the DCP formats share: a folder with ``.metadata`` (complete once it exists: torchtitan's
    ``_find_load_step`` rule, and DCP writes it last), a writer of the same keys.

    Subclasses implement :meth:`detect`, :meth:`open` and :meth:`maps`, and may override
    :meth:`extra_files` (files beside the DCP files that the framework needs to load it)."""

    def complete(self, path: Path) -> bool:
        return (Path(path) / METADATA).is_file()

    def extra_files(self, template: DCPCheckpoint) -> list[tuple[Path, str]]:
        """(file, its path relative to the written folder) to copy from the newest source."""
        return []

    def write(self, out: Path, template: NativeCheckpoint, produce: Callable[[str], torch.Tensor],
              names: Iterable[str]) -> None:
        import shutil

        if not isinstance(template, DCPCheckpoint):
            raise CheckpointError(f"{template.path}: not a DCP checkpoint opened by this format")
        names = list(names)
        by_key = {template.keys[n]: n for n in names}
        manifest = {k: (template.tensors.get(n) or template.others[n]) for k, n in by_key.items()}
        with_others = any(n in template.others for n in names)
        byte_keys = list(template.model_bytes) + (list(template.other_bytes) if with_others else [])
        byte_entries = {k: template.read_bytes(k) for k in byte_keys}
        write_dcp(Path(out), manifest, lambda key: produce(by_key[key]), byte_entries)
        for src, rel in self.extra_files(template):
            dst = Path(out) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
