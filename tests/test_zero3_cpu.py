"""Sharded merging: the ZeRO-3 partition layout, and real 2-rank ZeRO-3 (and FSDP) runs on CPU.

Lightning refuses DeepSpeed on CPU, but raw ``deepspeed`` ZeRO-3 runs on CPU
under ``torchrun`` on gloo. ``zero3_worker.py`` merges each rank's own
``ds_tensor`` partitions and evaluates; the loss must equal an unsharded
merge (``write_merged``) scored by a plain transformers loop. The model has
odd-sized tensors (hidden 33, vocab 127) so the last rank's partitions are
padded, and every parameter is small enough to be ZeRO-3 "persistent" (kept
gathered after a forward), so re-merging must drop the stale gathered copies.
The same worker runs torch FSDP1 (Lightning's ``FSDPStrategy``) and FSDP2
(``fully_shard``), whose root parameters also stay gathered after a forward.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightning_merge.series import CheckpointSeries
from lightning_merge.merge import merge_into
from lightning_merge.writer import write_merged
from lightning_merge.sharding import LocalShard, ShardingError, ShardMerger, local_shards, zero3_partition

WORKER = Path(__file__).with_name("zero3_worker.py")
WEIGHTS = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [-0.5, 0.5, 1.0]]
VOCAB, BLOCK, NBLOCKS = 127, 16, 9  # 9 blocks: the 2 ranks get unequal shares


def make_checkpoints(root: Path) -> list[Path]:
    """Three tiny Llamas (different seeds) with odd-sized tensors, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=33, head_dim=8, num_attention_heads=3,
                          num_key_value_heads=3, intermediate_size=45, num_hidden_layers=2,
                          max_position_embeddings=64, tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(root / f"step{seed}")
        paths.append(root / f"step{seed}")
    return paths


def reference_loss(model_dir: Path, blocks: torch.Tensor) -> float:
    """Token-weighted NLL of a saved model on ``blocks``, one process, no sharding."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.inference_mode():
        for b in blocks.split(2):
            logits = model(input_ids=b).logits
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b[:, 1:].flatten(),
                                   reduction="sum").double().item()
            n += b[:, 1:].numel()
    return nll / n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the layout, by hand ---------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_zero3_partitions_tile_the_tensor_with_padding_on_the_last_ranks(world):
    for numel in [1, 2, 3, 5, 6, 7, 33, 4191]:
        parts = [zero3_partition(numel, world, r) for r in range(world)]
        size = -(-numel // world)
        assert all(p == size for _, _, p in parts)  # every rank stores ceil(numel / world)
        assert [s for s, _, _ in parts] == [min(r * size, numel) for r in range(world)]
        flat = torch.arange(numel)
        # DeepSpeed's gather: concatenate the padded partitions, keep the first numel elements
        padded = [torch.cat([flat[s:e], torch.full((size - (e - s),), -1)]) for s, e, _ in parts]
        assert torch.equal(torch.cat(padded)[:numel], flat)
        assert sum(e - s for s, e, _ in parts) == numel


def test_zero3_partition_rejects_a_rank_outside_the_group():
    with pytest.raises(ShardingError, match="rank 2"):
        zero3_partition(10, 2, 2)


def test_local_shard_target_must_match_its_range():
    with pytest.raises(ShardingError, match="'w'"):
        LocalShard("w", torch.zeros(3), 0, 4)


def test_whole_shard_merger_equals_the_unsharded_merge(tmp_path):
    from transformers import AutoModelForCausalLM

    series = CheckpointSeries.from_sources(make_checkpoints(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(series.paths[0]).eval()
    merger = ShardMerger(model, "whole", series)
    assert merger.local_numel == merger.full_numel == sum(p.numel() for p in model.parameters())
    merger.apply(WEIGHTS[0])
    expect = {n: torch.empty_like(p) for n, p in model.named_parameters()}
    merge_into(expect, [{n: ck.read(n) for n in expect} for ck in series.checkpoints], WEIGHTS[0])
    for n, p in model.named_parameters():
        assert torch.equal(p, expect[n]), n
    with pytest.raises(ShardingError, match="is not partitioned by DeepSpeed"):
        local_shards(model, "zero3")


# --- real 2-rank runs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded_inputs(tmp_path_factory):
    """Checkpoints, blocks and the unsharded reference loss of each weight vector."""
    root = tmp_path_factory.mktemp("sharded")
    paths = make_checkpoints(root / "ckpts")
    blocks = torch.randint(0, VOCAB, (NBLOCKS, BLOCK), generator=torch.Generator().manual_seed(0))
    torch.save(blocks, root / "blocks.pt")
    series = CheckpointSeries.from_sources(paths)
    refs = [reference_loss(write_merged(series, w, root / f"merged{i}"), blocks) for i, w in enumerate(WEIGHTS)]
    return {"paths": paths, "blocks": root / "blocks.pt", "series": series, "refs": refs}


def run_worker(strategy: str, inputs: dict, tmp_path: Path) -> dict:
    out = tmp_path / f"{strategy}.json"
    spec = {"strategy": strategy, "sources": [str(p) for p in inputs["paths"]], "weights": WEIGHTS,
            "blocks": str(inputs["blocks"]), "batch_size": 2, "out": str(out)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={free_port()}", str(WORKER), str(tmp_path / "spec.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["strategy"] == strategy
    for w, got, ref in zip(WEIGHTS, res["losses"], inputs["refs"]):
        assert got["tokens"] == NBLOCKS * (BLOCK - 1)
        assert got["loss"] == pytest.approx(ref, rel=1e-6), (strategy, w)
    assert inputs["refs"][0] != pytest.approx(inputs["refs"][1], rel=1e-6)  # re-merging is visible
    full = inputs["series"].newest.nbytes // 4  # fp32 elements of one model
    for r in res["ranks"]:
        # Each rank merges about half of the model, from about half of each source.
        assert r["full_numel"] == full
        assert abs(r["local_numel"] - full / 2) <= full * 0.05, r["local_numel"]
        assert r["source_numel"] == [r["local_numel"]] * len(WEIGHTS[0])
    assert sum(r["local_numel"] for r in res["ranks"]) == full
    return res


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_ranks_merge_their_partitions_to_the_unsharded_loss(sharded_inputs, tmp_path):
    res = run_worker("zero3", sharded_inputs, tmp_path)
    for r in res["ranks"]:
        # ZeRO-3 layout: every rank stores ceil(numel / 2); the last rank's tail is padding, not merged.
        for name, numel, real, stored in r["per_param"]:
            assert stored == -(-numel // 2), name
            assert real == (stored if r["rank"] == 0 else numel - stored), name
        assert any(numel % 2 for _, numel, _, _ in r["per_param"])  # padding is exercised
        # Nothing was gathered to merge (a gathered parameter is AVAILABLE; partitioned, NOT_AVAILABLE).
        assert r["gathered_after_init"] == r["gathered_after_load"] == []
        assert r["gathered_after_merge"] == [[], [], []]
        # Persistent parameters stay gathered after a forward: the later merges had stale copies to drop.
        assert r["gathered_before_merge"][0] == 0 and min(r["gathered_before_merge"][1:]) > 0


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["fsdp1", "fsdp2"])
def test_fsdp_two_ranks_merge_their_local_shards_to_the_unsharded_loss(sharded_inputs, tmp_path, strategy):
    run_worker(strategy, sharded_inputs, tmp_path)
