"""The embedded demo trajectory: a tiny real build, cached, with a clean corpus split."""

from __future__ import annotations

import dataclasses
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_merge import demo
from lightning_merge.config import DemoConf

TINY = dict(steps=30, num_checkpoints=3, max_train_bytes=300_000, vocab_size=300, seq_len=64)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    conf = DemoConf(**TINY)
    cache = tmp_path_factory.mktemp("cache")
    return conf, cache, demo.build_trajectory(conf, cache, progress=False)


def test_checkpoints_ordered_and_loadable(built):
    conf, cache, traj = built
    assert not traj.cached and set(traj.seconds) == {"corpus_tokenizer", "training"}
    assert traj.root == cache / "demo" / demo.cache_key(conf)
    assert [p.name for p in traj.checkpoints] == ["step10", "step20", "step30"]
    assert all(p.parent == traj.root / "checkpoints" for p in traj.checkpoints)
    for ckpt in traj.checkpoints:
        model = AutoModelForCausalLM.from_pretrained(ckpt)
        tok = AutoTokenizer.from_pretrained(ckpt)
        assert tok.eos_token == tok.bos_token == demo.EOS
        assert len(tok) == model.config.vocab_size == conf.vocab_size
        assert model.config.eos_token_id == tok.eos_token_id
        assert not model.config.tie_word_embeddings
        assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_checkpoints_differ_and_learn(built):
    conf, _, traj = built
    models = [AutoModelForCausalLM.from_pretrained(p).eval() for p in traj.checkpoints]
    sds = [m.state_dict() for m in models]
    for a, b in zip(sds, sds[1:]):
        assert any(not torch.equal(a[k], b[k]) for k in a)
    # Training is real: the last checkpoint beats the first on held-out text.
    tok = AutoTokenizer.from_pretrained(traj.checkpoints[-1])
    text = "\n".join(json.loads(line)["text"] for line in traj.heldout.read_text().splitlines())
    ids = torch.tensor(tok(text[:20_000])["input_ids"][: 8 * conf.seq_len]).view(8, conf.seq_len)
    with torch.no_grad():
        first, last = (m(input_ids=ids, labels=ids).loss.item() for m in (models[0], models[-1]))
    assert last < first < math.log(conf.vocab_size) + 1.0


def test_split_disjoint_and_deterministic():
    conf = DemoConf(**TINY)
    a, b = demo.split_corpus(conf), demo.split_corpus(conf)
    assert a == b
    assert a["train"] and a["heldout"] and a["stdlib_tests"]
    assert not set(a["train"]) & set(a["heldout"])
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in a["train"] + a["heldout"]:
        parts = set(path.relative_to(root).parts[:-1])
        assert not parts & {"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data"}, path
    assert all(p.parent == root / "test" for p in a["stdlib_tests"])
    assert sum(p.stat().st_size for p in a["train"]) < conf.max_train_bytes + 300_000
    # The held-out split does not depend on the training cap.
    assert demo.split_corpus(DemoConf())["heldout"] == a["heldout"]


def test_jsonl_sets(built):
    _, _, traj = built
    assert set(traj.ood) == {"stdlib_tests", "pydoc"}
    for path in [traj.heldout, *traj.ood.values()]:
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines, path
        docs = [json.loads(line) for line in lines]
        assert all(set(d) == {"text"} and d["text"].strip() for d in docs)


def test_second_call_uses_cache(built, monkeypatch):
    conf, cache, traj = built
    monkeypatch.setattr(demo, "train", lambda *a, **k: pytest.fail("retrained a cached trajectory"))
    again = demo.build_trajectory(DemoConf(**TINY), cache, progress=False)
    assert again.cached
    assert (again.root, again.checkpoints, again.heldout, again.ood) == (
        traj.root, traj.checkpoints, traj.heldout, traj.ood)
    assert set(again.seconds) == set(traj.seconds) and not any(again.seconds.values())


def test_incomplete_folder_is_not_a_trajectory(tmp_path):
    (tmp_path / "checkpoints" / "step10").mkdir(parents=True)
    assert demo._load(tmp_path) is None


def test_cache_key():
    base = DemoConf(**TINY)
    assert demo.cache_key(base) == demo.cache_key(DemoConf(**TINY))
    assert demo.cache_key(base) == demo.cache_key(DemoConf(**TINY, enabled=True))
    assert demo.cache_key(base) != demo.cache_key(DemoConf(**{**TINY, "seed": 1}))


def test_schedule_and_save_steps():
    conf = DemoConf(steps=100, num_checkpoints=10, warmup_frac=0.1, lr_schedule="cosine")
    assert demo.checkpoint_steps(conf) == list(range(10, 101, 10))
    assert demo.checkpoint_steps(DemoConf(steps=7, num_checkpoints=3)) == [2, 4, 7]
    assert demo.lr_factor(conf, 0) == pytest.approx(0.1)
    assert demo.lr_factor(conf, 9) == pytest.approx(1.0)
    assert demo.lr_factor(conf, 99) == pytest.approx(0.0, abs=1e-9)
    const = DemoConf(steps=100, warmup_frac=0.1)
    assert [demo.lr_factor(const, s) for s in (10, 50, 99)] == [1.0, 1.0, 1.0]
    # WSD: the constant run until the last 25 steps, then a linear decay (step 99 trains at 1/25 of the LR)
    wsd = DemoConf(steps=100, warmup_frac=0.1, lr_schedule="wsd", decay_frac=0.25)
    assert [demo.lr_factor(wsd, s) for s in range(75)] == [demo.lr_factor(const, s) for s in range(75)]
    assert [demo.lr_factor(wsd, s) for s in (75, 80, 99)] == pytest.approx([1.0, 0.8, 0.04])
    # decay_frac keys only a WSD trajectory: the constant and cosine caches of older versions stay valid
    assert demo.cache_key(DemoConf(**TINY, decay_frac=0.3)) == demo.cache_key(DemoConf(**TINY))
    assert demo.cache_key(wsd) != demo.cache_key(dataclasses.replace(wsd, decay_frac=0.3))


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # as if the build were killed mid-training

    monkeypatch.setattr(demo, "train", boom)
    with pytest.raises(KeyboardInterrupt):
        demo.build_trajectory(DemoConf(**TINY), tmp_path, progress=False)
    assert list((tmp_path / "demo").iterdir()) == []
