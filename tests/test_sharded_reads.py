"""A rank reads only its slices: bytes read per rank under FSDP2 on 2 gloo ranks against 1 (issue 11).

Two small Llamas are saved with transformers' ``save_pretrained`` (safetensors).
``sharded_reads_worker.py`` shards a model built from their config with FSDP2
(``fully_shard`` over the decoder layers and the root) on 1 and on 2 CPU
ranks and builds ``ShardMerger``, which reads each source's slices through
``Checkpoint.read_slice``. Per rank, the bytes read (``Checkpoint.bytes_read``
summed over the series) must be exactly those of its shards' ``[start, end)``
ranges, each checkpoint once, and at 2 ranks at most 1.1x half of the 1-rank
figure; the 2 ranks' ranges must tile every tensor exactly once; and the merged
shards, put together, must equal ``sum_k w_k * theta_k`` computed here from the
whole tensors. The vocabulary (1001 rows) is odd, so FSDP2's dim-0 split of
the embeddings and the output layer is uneven.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_merge.series import CheckpointSeries
from lightning_merge.merge import merge_into

WORKER = Path(__file__).with_name("sharded_reads_worker.py")
WEIGHTS = [0.3, 0.7]


def make_series(root: Path) -> list[Path]:
    """Two Llamas (different seeds), ~1.7 MB each in fp32, saved by transformers as safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for seed in range(2):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=1001, hidden_size=96, head_dim=24, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=250, num_hidden_layers=2,
                          max_position_embeddings=64, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(root / f"step{seed}")
        assert (root / f"step{seed}" / "model.safetensors").is_file()
        paths.append(root / f"step{seed}")
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(paths: list[Path], world: int, out: Path) -> dict:
    out.mkdir()
    spec = {"sources": [str(p) for p in paths], "weights": WEIGHTS, "out": str(out)}
    (out / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--nnodes=1",
           f"--master_port={free_port()}", str(WORKER), str(out / "spec.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads((out / "result.json").read_text())
    assert res["world"] == world and [r["rank"] for r in res["ranks"]] == list(range(world))
    return res


def expected_bytes(series: CheckpointSeries, layout: list) -> int:
    """Bytes of a rank's ranges in every checkpoint (each checkpoint's own dtype), read once each."""
    total = 0
    for ck in series.checkpoints:
        for name, start, end, _, _ in layout:
            total += (end - start) * ck.tensors[name].dtype.itemsize
    return total


@pytest.mark.distributed
def test_two_ranks_each_read_half_the_bytes_of_one_and_merge_exactly(tmp_path):
    paths = make_series(tmp_path / "ckpts")
    series = CheckpointSeries.from_sources(paths)
    names = series.names
    model_bytes = sum(ck.nbytes for ck in series.checkpoints)  # every tensor of every source, once
    one = run_world(paths, 1, tmp_path / "w1")
    two = run_world(paths, 2, tmp_path / "w2")

    # Opening reads headers only; then each rank reads exactly its ranges, nothing else.
    for res in (one, two):
        for r in res["ranks"]:
            assert r["bytes_before"] == [0, 0]
            assert sum(r["bytes_after"]) == expected_bytes(series, r["layout"]), r["rank"]
    single = sum(one["ranks"][0]["bytes_after"])
    assert single == model_bytes  # one rank holds everything, so it reads everything once
    per_rank = [sum(r["bytes_after"]) for r in two["ranks"]]
    assert sum(per_rank) == single  # no byte is read twice across ranks
    for b in per_rank:
        assert b <= 1.1 * single / 2, (b, single)
    assert per_rank[0] != per_rank[1]  # the odd vocabulary makes the split uneven (and it still fits)

    # The 2 ranks' ranges tile every tensor exactly once.
    ranges: dict[str, list[tuple[int, int]]] = {n: [] for n in names}
    for r in two["ranks"]:
        assert sorted(s[0] for s in r["layout"]) == sorted(names)
        for name, start, end, shape, _ in r["layout"]:
            assert tuple(shape) == series.newest.tensors[name].shape
            if end > start:
                ranges[name].append((start, end))
    for name, rs in ranges.items():
        rs.sort()
        assert rs[0][0] == 0 and rs[-1][1] == math.prod(series.newest.tensors[name].shape), name
        assert all(a[1] == b[0] for a, b in zip(rs, rs[1:])), (name, rs)

    # The merged shards, put back together, are the merge of the whole tensors.
    whole = {n: [ck.read(n) for ck in series.checkpoints] for n in names}
    expect = {n: torch.empty_like(whole[n][0]) for n in names}
    merge_into(expect, [{n: whole[n][k] for n in names} for k in range(len(series))], WEIGHTS)
    for res, out in ((one, tmp_path / "w1"), (two, tmp_path / "w2")):
        got = [torch.load(out / f"rank{r['rank']}.pt", weights_only=True) for r in res["ranks"]]
        for name in names:
            pieces = sorted((start, got[r["rank"]][name]) for r in res["ranks"]
                            for n, start, end, _, _ in r["layout"] if n == name and end > start)
            merged = torch.cat([p for _, p in pieces]).view(expect[name].shape)
            assert torch.equal(merged, expect[name]), name  # bitwise: same fp32 accumulation
            by_hand = sum(w * t.double() for w, t in zip(WEIGHTS, whole[name]))
            torch.testing.assert_close(merged.double(), by_hand, rtol=1e-6, atol=1e-7)
