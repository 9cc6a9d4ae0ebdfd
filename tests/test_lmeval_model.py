"""ResidentLM request for request against lm-eval's own HFLM, and the dealing of batches over ranks.

The reference is ``lm_eval.models.huggingface.HFLM(pretrained=folder)`` on the same saved model: every
log-likelihood, rolling log-likelihood and greedy generation must be equal, bit for bit (the batches
are HFLM's own, built with lm-eval's Collator). Cases: batch sizes 1 and 3, a tokenizer that adds a
BOS token, contexts longer than the model's positions (left truncation), one-token continuations
sharing a context (HFLM's logits cache), an empty context. The multi-rank dealing is checked by
running each simulated rank's share and gathering: the same outputs at 1, 2 and 3 ranks.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lightning_merge.lmeval.model import LocalRunner, ResidentLM, collect, deal

pytest.importorskip("accelerate")  # lm-eval's HFLM imports it


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer) -> dict:
    from conftest import make_llama
    from tokenizers.processors import TemplateProcessing

    root = tmp_path_factory.mktemp("lmeval_model")
    plain = make_llama(root / "plain", seed=3, tokenizer=tokenizer)
    bos_tok = copy.deepcopy(tokenizer)
    bos = bos_tok.bos_token
    bos_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_tok.bos_token_id)])
    with_bos = make_llama(root / "bos", seed=4, tokenizer=bos_tok)
    return {"plain": plain, "bos": with_bos}


def _pair(folder: Path, batch_size: int):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = HFLM(pretrained=str(folder), device="cpu", batch_size=batch_size, dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = ResidentLM(model.config, AutoTokenizer.from_pretrained(folder), LocalRunner(model), batch_size=batch_size)
    return hf, ours


def _requests():
    from conftest import CORPUS

    docs = CORPUS[:5]
    ll = []
    for doc in docs:
        cut = len(doc) // 2
        ctx = doc[:cut]
        ll += [(ctx, " A"), (ctx, " B"), (ctx, doc[cut:]), (ctx + " ", "the quick brown"), ("", doc[:12])]
    long_ctx = " ".join(CORPUS[:8]) * 3  # far more than the model's 128 positions
    ll += [(long_ctx, " return a + b"), (long_ctx, " x")]
    rolling = [(d * k,) for d, k in zip(docs, (1, 2, 4, 9, 3))]  # the 9x document needs several windows
    gen = [(d[: 15 + i], {"until": ["\n\n", "print"], "max_gen_toks": 10 + i, "do_sample": False})
           for i, d in enumerate(docs)]
    gen += [(long_ctx, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})]
    return ll, rolling, gen


@pytest.mark.parametrize("which, batch_size", [("plain", 3), ("plain", 1), ("bos", 3)])
def test_equal_to_hflm_bit_for_bit(folders, which, batch_size):
    hf, ours = _pair(folders[which], batch_size)
    ll, rolling, gen = _requests()
    assert ours.tok_encode("def f") == hf.tok_encode("def f")
    if which == "bos":
        assert ours.tok_encode("def f")[0] == hf.tokenizer.bos_token_id  # the tokenizer's default BOS, kept
    assert ours.max_length == hf.max_length == 128
    assert ours.loglikelihood(_instances("loglikelihood", ll)) == hf.loglikelihood(_instances("loglikelihood", ll))
    assert ours.loglikelihood_rolling(_instances("loglikelihood_rolling", rolling)) == \
        hf.loglikelihood_rolling(_instances("loglikelihood_rolling", rolling))
    assert ours.generate_until(_instances("generate_until", gen)) == hf.generate_until(_instances("generate_until", gen))


class _Ranks:
    """Runs each of ``world`` simulated ranks' dealt items in turn, then gathers: what the Evaluator does."""

    def __init__(self, model, world: int) -> None:
        self.model, self.world, self.dummies = model, world, 0

    def map(self, fn, items):
        per_rank = []
        for r in range(self.world):
            idx = deal(len(items), r, self.world)
            self.dummies += idx.count(-1)
            with torch.no_grad():
                outs = [(i, fn(self.model, items[max(i, 0)])) for i in idx]
            per_rank.append([(i, o) for i, o in outs if i >= 0])
        return collect(per_rank, len(items))


@pytest.mark.parametrize("world", [2, 3])
def test_dealt_over_ranks_equals_one_process(folders, world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = folders["plain"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    one = ResidentLM(model.config, tok, LocalRunner(model), batch_size=2)
    ranks = _Ranks(model, world)
    many = ResidentLM(model.config, tok, ranks, batch_size=2)
    ll, rolling, gen = _requests()
    assert many.loglikelihood(_instances("loglikelihood", ll)) == one.loglikelihood(_instances("loglikelihood", ll))
    assert many.loglikelihood_rolling(_instances("loglikelihood_rolling", rolling)) == \
        one.loglikelihood_rolling(_instances("loglikelihood_rolling", rolling))
    assert many.generate_until(_instances("generate_until", gen)) == one.generate_until(_instances("generate_until", gen))
    assert ranks.dummies > 0  # some runs did not divide evenly: the padding path ran and its outputs were dropped
    # A second evaluation of the same requests reuses the token ids and gives the same numbers.
    assert many.loglikelihood(_instances("loglikelihood", ll)) == one.loglikelihood(_instances("loglikelihood", ll))


def test_deal_pads_every_rank_to_the_same_count_and_collect_restores_order():
    assert deal(7, 0, 3) == [0, 3, 6] and deal(7, 1, 3) == [1, 4, -1] and deal(7, 2, 3) == [2, 5, -1]
    assert deal(0, 1, 2) == [] and deal(1, 1, 2) == [-1]
    per_rank = [[(i, f"o{i}") for i in deal(7, r, 3) if i >= 0] for r in range(3)]
    assert collect(per_rank, 7) == [f"o{i}" for i in range(7)]
    with pytest.raises(RuntimeError, match="by no rank"):
        collect(per_rank[:2], 7)
    with pytest.raises(RuntimeError, match="two ranks"):
        collect(per_rank + per_rank[:1], 7)
