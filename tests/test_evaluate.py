"""The Lightning evaluation equals a plain transformers loop, exactly, whatever the batching."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_merge.config import StrategyConf, TextSetConf
from lightning_merge.data import DataError, evenly_spaced, load_blocks, pack_blocks
from lightning_merge.evaluate import Evaluator, ShardSampler


def reference_loss(model, blocks: torch.Tensor) -> float:
    """Plain transformers loop: sum of token NLL / number of predicted tokens."""
    nll, n = 0.0, 0
    with torch.inference_mode():
        for b in blocks:
            out = model(input_ids=b[None], labels=b[None])
            k = b.numel() - 1
            nll += out.loss.double().item() * k
            n += k
    return nll / n


@pytest.fixture(scope="module")
def model_and_blocks(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_run["paths"][0]
    tok = AutoTokenizer.from_pretrained(path)
    blocks = load_blocks(TextSetConf(path=str(tiny_run["heldout"]), block_size=24, num_blocks=None), tok)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, blocks


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_matches_plain_transformers_loop(model_and_blocks, batch_size):
    model, blocks = model_and_blocks
    assert blocks.shape[0] % 3 != 0 or blocks.shape[0] % 8 != 0
    ev = Evaluator(model, StrategyConf(), batch_size=batch_size)
    res = ev.evaluate(blocks)
    ref = reference_loss(model, blocks)
    assert res.tokens == blocks.shape[0] * (blocks.shape[1] - 1)
    assert res.loss == pytest.approx(ref, rel=1e-6)
    assert res.ppl == pytest.approx(math.exp(ref), rel=1e-5)
    # The same Trainer, reused, gives the same number again.
    assert ev.evaluate(blocks).loss == res.loss


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_sampler_gives_each_block_to_one_rank(monkeypatch, world):
    n = 10
    seen = []
    lengths = set()
    for rank in range(world):
        monkeypatch.setattr(ShardSampler, "_rank_world", staticmethod(lambda r=rank: (r, world)))
        idx = list(ShardSampler(n))
        lengths.add(len(idx))
        seen += [i for i in idx if i < n]
    assert sorted(seen) == list(range(n))  # every block exactly once
    assert len(lengths) == 1  # every rank runs the same number of steps


def test_pack_blocks_puts_eos_between_documents(tokenizer):
    blocks = pack_blocks(["ab", "cd"], tokenizer, block_size=2)
    flat = blocks.flatten().tolist()
    eos = tokenizer.eos_token_id
    assert flat.count(eos) >= 1 and blocks.shape[1] == 2
    ids_a = tokenizer("ab", add_special_tokens=False)["input_ids"]
    assert flat[: len(ids_a) + 1] == ids_a + [eos]


def test_evenly_spaced_keeps_ends():
    blocks = torch.arange(100).view(100, 1)
    kept = evenly_spaced(blocks, 5).flatten().tolist()
    assert kept[0] == 0 and kept[-1] == 99 and len(kept) == 5
    assert evenly_spaced(blocks, None).shape[0] == 100


def test_bad_data_errors_name_the_problem(tiny_run, tokenizer, tmp_path):
    with pytest.raises(DataError, match="no column 'body'.*'text'"):
        load_blocks(TextSetConf(path=str(tiny_run["heldout"]), text_column="body"), tokenizer)
    with pytest.raises(DataError, match="fewer than one block of 100000"):
        load_blocks(TextSetConf(path=str(tiny_run["heldout"]), block_size=100_000), tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="empty"):
        load_blocks(TextSetConf(path=str(empty)), tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        load_blocks(TextSetConf(path=str(tmp_path / "nope.jsonl")), tokenizer)


def test_staged_batches_are_the_loader_batches_on_every_rank(monkeypatch):
    """StagedBatches gives exactly what the per-block DataLoader gave: same ids, same validity, same order."""
    from torch.utils.data import DataLoader, Dataset

    from lightning_merge.sampling import StagedBatches

    class PerBlock(Dataset):  # the per-trial loader this replaced
        def __init__(self, blocks):
            self.blocks = blocks

        def __len__(self):
            return self.blocks.shape[0]

        def __getitem__(self, i):
            n = self.blocks.shape[0]
            return (self.blocks[i], torch.tensor(1)) if i < n else (self.blocks[0], torch.tensor(0))

    blocks = torch.arange(11 * 6).view(11, 6)
    for world in (1, 2, 3, 4):
        for rank in range(world):
            monkeypatch.setattr(ShardSampler, "_rank_world", staticmethod(lambda r=rank, w=world: (r, w)))
            old = list(DataLoader(PerBlock(blocks), batch_size=4, sampler=ShardSampler(11)))
            new = list(DataLoader(StagedBatches(blocks, 4, lambda: "cpu"), batch_size=None))
            assert len(old) == len(new)
            for (a, va), (b, vb) in zip(old, new):
                assert torch.equal(a, b) and torch.equal(va, vb) and va.dtype == vb.dtype
