"""Real multi-process evaluation (Lightning DDP on gloo) against single-process references.

Each run is the CLI in ``mode=evaluate`` with three sources and given weights,
so every rank merges its resident sources in place and evaluates its own
shard. The reference writes the same merge with ``write_merged`` and scores it
with a plain transformers loop over blocks rebuilt here from the file. The
block count (37) divides evenly by neither 2 nor 3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lightning_merge.series import CheckpointSeries
from lightning_merge.writer import write_merged

pytestmark = pytest.mark.distributed
WEIGHTS = [0.2, 0.3, 0.5]
BLOCK, NBLOCKS = 24, 37


def reference_loss(merged_dir, heldout) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    ids: list[int] = []
    for line in open(heldout):
        ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = torch.tensor(ids[: len(ids) // BLOCK * BLOCK]).view(-1, BLOCK)
    assert blocks.shape[0] >= NBLOCKS
    blocks = blocks[torch.linspace(0, blocks.shape[0] - 1, NBLOCKS).round().long()]
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    nll, n = 0.0, 0
    with torch.inference_mode():
        for b in blocks:
            out = model(input_ids=b[None], labels=b[None])
            nll += out.loss.double().item() * (BLOCK - 1)
            n += BLOCK - 1
    return nll / n


@pytest.fixture(scope="module")
def reference(tiny_run, tmp_path_factory, tokenizer):
    """The single-process reference: write_merged, then a plain transformers loop (the loss; lm-eval's
    metrics under DDP are checked against lm-eval itself in test_lmeval_distributed.py)."""
    root = tmp_path_factory.mktemp("ref")
    out = root / "merged"
    write_merged(CheckpointSeries.from_sources(tiny_run["paths"]), WEIGHTS, out)
    return {"loss": reference_loss(out, tiny_run["heldout"])}


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ddp_loss_equals_single_process_reference(tiny_run, reference, tmp_path, world):
    strategy = ["strategy=single"] if world == 1 else ["strategy=ddp", f"strategy.devices={world}"]
    args = [sys.executable, "-m", "lightning_merge", "mode=evaluate", "demo.enabled=false",
            f"checkpoints.sources=[{tiny_run['ckdir']}]", "checkpoints.last=null",
            f"merge.weights=[{','.join(map(str, WEIGHTS))}]", f"data.heldout.path={tiny_run['heldout']}",
            f"data.heldout.block_size={BLOCK}", f"data.heldout.num_blocks={NBLOCKS}", "data.batch_size=4",
            f"output_dir={tmp_path}", *strategy]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["best"]["weights"] == WEIGHTS
    assert res["best"]["heldout_loss"] == pytest.approx(reference["loss"], rel=1e-6)


def test_bad_input_fails_on_rank_zero_before_any_process_group(tiny_run, tmp_path):
    """A missing column under strategy=ddp: a clear error and exit, not a hang of waiting ranks."""
    args = [sys.executable, "-m", "lightning_merge", "mode=evaluate", "demo.enabled=false",
            f"checkpoints.sources=[{tiny_run['ckdir']}]", "checkpoints.last=null", "merge.weights=[0.2,0.3,0.5]",
            f"data.heldout.path={tiny_run['heldout']}", "data.heldout.text_column=body",
            f"data.heldout.block_size={BLOCK}",  # within the model's 128 positions (else that is refused first)
            "strategy=ddp", "strategy.devices=2", f"output_dir={tmp_path}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2
    assert "no column 'body'" in proc.stderr and "['text']" in proc.stderr
    assert "initializing distributed" not in (proc.stdout + proc.stderr).lower()


def test_ddp_search_makes_the_same_trials_as_one_process(tiny_run, tmp_path):
    """The whole search loop under DDP (2 ranks): baselines, reuse and GP trials agree with one process."""
    def search(out, *strategy):
        args = [sys.executable, "-m", "lightning_merge", "demo.enabled=false",
                f"checkpoints.sources=[{tiny_run['ckdir']}]", "checkpoints.last=3",
                f"data.heldout.path={tiny_run['heldout']}", f"data.heldout.block_size={BLOCK}",
                f"data.heldout.num_blocks={NBLOCKS}", "data.search_blocks=13", "data.batch_size=4",
                "search.trials=4", "search.acquisition=ei", "report.progress=false", "merge.write=false",
                f"output_dir={out}", *strategy]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        last = {}
        for line in (out / "trials.jsonl").read_text().splitlines():
            rec = json.loads(line)
            last[rec["trial"]] = rec
        return last, json.loads((out / "results.json").read_text())

    one, res1 = search(tmp_path / "one", "strategy=single")
    two, res2 = search(tmp_path / "two", "strategy=ddp", "strategy.devices=2")
    assert sorted(one) == sorted(two)
    for i in one:
        assert two[i]["origin"] == one[i]["origin"] and two[i]["status"] == one[i]["status"] == "completed"
        assert two[i]["weights"] == pytest.approx(one[i]["weights"], abs=1e-9)
        assert two[i]["objective"] == pytest.approx(one[i]["objective"], rel=1e-6)
    assert [c["name"] for c in res2["candidates"]] == [c["name"] for c in res1["candidates"]]
    for a, b in zip(res1["candidates"], res2["candidates"]):
        assert b["heldout_loss"] == pytest.approx(a["heldout_loss"], rel=1e-6)
