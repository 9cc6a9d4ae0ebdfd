"""The streaming writer's slices: any slice size writes the same bytes as the whole-tensor merge.

``write_merged`` cuts every tensor into flat slices (``slice_bytes`` per source), reads them ahead
into reused buffers, merges each with ``merge_into`` and appends it in a writer thread. The merge is
element-wise, so the files must not depend on the slice size; these tests force many slices with a
tiny ``slice_bytes`` and compare bit for bit with ``merge_into`` over whole tensors.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_merge import writer
from lightning_merge.checkpoints import Checkpoint
from lightning_merge.errors import SourceReadError
from lightning_merge.merge import MergeError, merge_into
from lightning_merge.series import CheckpointSeries
from lightning_merge.writer import write_merged


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _whole_merge(series: CheckpointSeries, w, dtype=None, nonfloat="equal") -> dict[str, torch.Tensor]:
    """The reference: every tensor read whole from every source and merged at once."""
    out = {}
    for n in series.names:
        srcs = [ck.read(n) for ck in series.checkpoints]
        info = series.newest.tensors[n]
        dt = dtype if dtype is not None and info.dtype.is_floating_point else info.dtype
        out[n] = torch.empty(info.shape, dtype=dt)
        if out[n].numel():  # (merge_into has no empty-tensor case; the writer writes nothing for one)
            merge_into({n: out[n]}, [{n: s} for s in srcs], w, nonfloat=nonfloat)
    return out


def _bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert torch.equal(a[n].view(-1).view(torch.uint8), b[n].view(-1).view(torch.uint8)), n


def _mixed(path: Path, seed: int, dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> Path:
    """A safetensors checkpoint holding every dtype the buffers must be reused across."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    save_file({"a.weight": torch.randn(37, 5, generator=g).to(dtypes[0]),
               "b.weight": torch.randn(1001, generator=g).to(dtypes[1]),
               "c.weight": torch.randn(3, 7, generator=g).to(dtypes[2]),
               "d.scalar": torch.randn((), generator=g),
               "e.steps": torch.arange(11, dtype=torch.int64),
               "f.empty": torch.empty(0, 4)}, path / "model.safetensors")
    return path


@pytest.mark.parametrize("slice_bytes", [100, 1000, writer.SLICE_BYTES])
def test_many_slices_equal_the_whole_tensor_merge_bitwise(tiny_run, tmp_path, slice_bytes):
    series = CheckpointSeries.from_sources(tiny_run["paths"])
    w = [0.2, 0.3, 0.5]  # three sources: the fp32-accumulated path, not the fused lerp
    out = write_merged(series, w, tmp_path / "m", max_shard_bytes=40_000, slice_bytes=slice_bytes)
    _bitwise_equal(_tensors(out), _whole_merge(series, w))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(index["weight_map"]) == series.names  # the shard plan and its order are unchanged


def test_the_files_do_not_depend_on_the_slice_size(tiny_run, tmp_path):
    series = CheckpointSeries.from_sources(tiny_run["paths"][:2])
    a = write_merged(series, [0.4, 0.6], tmp_path / "a", max_shard_bytes=40_000, slice_bytes=48)
    b = write_merged(series, [0.4, 0.6], tmp_path / "b", max_shard_bytes=40_000)
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in b.glob("*.safetensors"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float32])
def test_buffers_reused_across_dtypes(tmp_path, dtype):
    """fp32, bf16, fp16, an fp32 scalar, an int64 buffer and an empty tensor, with sources of different
    float dtypes: one source's read buffer and the output buffer hold each dtype in turn."""
    paths = [_mixed(tmp_path / "s0", 0),
             _mixed(tmp_path / "s1", 1, (torch.bfloat16, torch.float32, torch.float16)),
             _mixed(tmp_path / "s2", 2)]
    series = CheckpointSeries.from_sources(paths)
    w = [0.25, -0.5, 1.25]
    out = write_merged(series, w, tmp_path / "m", dtype=dtype, slice_bytes=30)
    got, ref = _tensors(out), _whole_merge(series, w, dtype)
    _bitwise_equal(got, ref)
    assert got["e.steps"].tolist() == list(range(11)) and got["f.empty"].shape == (0, 4)


def test_formats_without_range_reads_read_each_tensor_once(tiny_run, tmp_path, monkeypatch):
    """A ``pytorch_model.bin`` source is read whole, once per tensor, and sliced in memory; the
    safetensors source beside it is read by byte range. The output is the same."""
    st = tiny_run["paths"][0]
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(load_file(tiny_run["paths"][1] / "model.safetensors"), binary / "pytorch_model.bin")
    shutil.copy(tiny_run["paths"][1] / "config.json", binary / "config.json")
    series = CheckpointSeries.from_sources([st, binary])
    assert [ck.reads_ranges for ck in series.checkpoints] == [True, False]
    whole_reads, slice_reads = [], []
    real_read, real_into = Checkpoint.read, Checkpoint.read_slice_into
    monkeypatch.setattr(Checkpoint, "read", lambda self, n: whole_reads.append((self.path, n)) or real_read(self, n))
    monkeypatch.setattr(Checkpoint, "read_slice_into", lambda self, n, a, b, buf: slice_reads.append(self.path)
                        or real_into(self, n, a, b, buf))
    w = [0.3, 0.7]
    out = write_merged(series, w, tmp_path / "m", slice_bytes=256)
    assert sorted(n for _, n in whole_reads) == sorted(series.names)  # one whole read per tensor
    assert {p for p, _ in whole_reads} == {binary}
    assert set(slice_reads) == {st} and len(slice_reads) > len(series.names)  # many slices
    monkeypatch.undo()
    _bitwise_equal(_tensors(out), _whole_merge(series, w))


def test_read_buffers_are_one_slice_per_source(tiny_run):
    series = CheckpointSeries.from_sources(tiny_run["paths"][:2])
    pieces = writer._pieces(series, [series.names], None, 1000)
    assert max(p.end - p.start for p in pieces) * 4 <= 1000  # fp32: 250 elements a slice
    reader = writer._SliceReader(series.checkpoints, pieces)
    assert all(into.buf.numel() <= 1000 for s in reader.sets for into in s)


def test_a_bad_slice_mid_tensor_leaves_nothing_and_names_the_file(tmp_path):
    """A NaN in a late slice of a large tensor: the read stops with the file and tensor named, nothing is
    published, and torch's thread count is back as it was."""
    paths = [_mixed(tmp_path / "s0", 0), _mixed(tmp_path / "s1", 1)]
    t = load_file(paths[1] / "model.safetensors")
    t["b.weight"][900] = float("nan")
    save_file(t, paths[1] / "model.safetensors")
    series = CheckpointSeries.from_sources(paths)
    threads = torch.get_num_threads()
    with pytest.raises(SourceReadError, match=r"s1/model.safetensors: tensor 'b.weight' holds non-finite"):
        write_merged(series, [0.5, 0.5], tmp_path / "m", slice_bytes=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0", "s1"]
    assert torch.get_num_threads() == threads


def test_an_overflowing_merge_in_a_late_slice_leaves_nothing(tmp_path):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(4000, generator=g)
    big[3500] = 3e38  # finite in each source; 3e38 + 3e38 overflows fp32
    paths = []
    for i in range(2):
        (tmp_path / f"s{i}").mkdir()
        save_file({"w": big}, tmp_path / f"s{i}" / "model.safetensors")
        paths.append(tmp_path / f"s{i}")
    with pytest.raises(MergeError, match="'w' with weights"):
        write_merged(CheckpointSeries.from_sources(paths), [1.0, 1.0], tmp_path / "m", slice_bytes=400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0", "s1"]


def test_plain_writes_where_o_direct_is_refused_give_the_same_files(tiny_run, tmp_path, monkeypatch):
    """Shards are written with O_DIRECT through an aligned stage (tail padded, then truncated); a filesystem
    that refuses O_DIRECT at open (EINVAL) or at the first write gets plain writes of the same bytes."""
    series = CheckpointSeries.from_sources(tiny_run["paths"][:2])
    monkeypatch.setattr(writer, "_STAGE_BYTES", 8192)  # many full blocks and a padded tail per shard
    ref = write_merged(series, [0.4, 0.6], tmp_path / "direct", max_shard_bytes=40_000)
    real_open, real_pwrite = os.open, os.pwrite

    def no_direct_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(writer.os, "open", no_direct_open)
    a = write_merged(series, [0.4, 0.6], tmp_path / "plain_open", max_shard_bytes=40_000)
    monkeypatch.setattr(writer.os, "open", real_open)
    refused = []

    def no_direct_pwrite(fd, data, pos):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(pos)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(writer.os, "pwrite", no_direct_pwrite)
    b = write_merged(series, [0.4, 0.6], tmp_path / "plain_write", max_shard_bytes=40_000)
    assert refused  # the fallback really ran
    files = sorted(p.name for p in ref.glob("*.safetensors"))
    assert len(files) > 1
    for f in files:
        assert (a / f).read_bytes() == (ref / f).read_bytes() == (b / f).read_bytes()
