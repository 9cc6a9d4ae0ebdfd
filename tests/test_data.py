"""Held-out data: local formats through `datasets`, seeded subsets, the block cache, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_merge import data as data_mod
from lightning_merge.config import TextSetConf
from lightning_merge.data import DataError, load_blocks

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 3) for i in range(30)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import pandas as pd

    d = tmp_path_factory.mktemp("data")
    (d / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in DOCS))
    (d / "a.json").write_text(json.dumps([{"body": t} for t in DOCS]))
    pd.DataFrame({"body": DOCS}).to_parquet(d / "a.parquet")
    pd.DataFrame({"body": DOCS}).to_csv(d / "a.csv", index=False)
    (d / "a.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in DOCS))
    return d


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet", "csv"])
def test_local_formats_give_the_same_blocks(files, tokenizer, ext):
    ref = load_blocks(TextSetConf(path=str(files / "a.jsonl"), text_column="body", block_size=16,
                                  num_blocks=None), tokenizer)
    got = load_blocks(TextSetConf(path=str(files / f"a.{ext}"), text_column="body", block_size=16,
                                  num_blocks=None), tokenizer)
    assert torch.equal(ref, got)
    eos = tokenizer.eos_token_id
    assert (ref == eos).sum() >= len(DOCS) - 1  # EOS between documents, no padding


def test_text_files_use_the_text_column(files, tokenizer):
    blocks = load_blocks(TextSetConf(path=str(files / "a.txt"), block_size=16, num_blocks=None), tokenizer)
    assert blocks.shape[1] == 16 and blocks.shape[0] > 10


def test_document_and_token_subsets_are_seeded(files, tokenizer):
    base = dict(path=str(files / "a.jsonl"), text_column="body", block_size=8, num_blocks=None)
    a = load_blocks(TextSetConf(**base, max_documents=10, seed=1), tokenizer)
    b = load_blocks(TextSetConf(**base, max_documents=10, seed=1), tokenizer)
    c = load_blocks(TextSetConf(**base, max_documents=10, seed=2), tokenizer)
    full = load_blocks(TextSetConf(**base), tokenizer)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape[0] < full.shape[0]
    t = load_blocks(TextSetConf(**base, max_tokens=120, seed=0), tokenizer)
    assert t.shape[0] == 120 // 8


def test_blocks_are_cached(files, tokenizer, tmp_path, monkeypatch):
    conf = TextSetConf(path=str(files / "a.jsonl"), text_column="body", block_size=16, num_blocks=5)
    first = load_blocks(conf, tokenizer, cache_dir=tmp_path)
    assert len(list((tmp_path / "blocks").glob("*.pt"))) == 1

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(data_mod, "_tokenize", no_tokenizing)
    assert torch.equal(load_blocks(conf, tokenizer, cache_dir=tmp_path), first)
    other = TextSetConf(path=str(files / "a.jsonl"), text_column="body", block_size=8, num_blocks=5)
    with pytest.raises(AssertionError, match="tokenized again"):  # another block length is another key
        load_blocks(other, tokenizer, cache_dir=tmp_path)


def test_errors_name_what_is_wrong(files, tokenizer):
    with pytest.raises(DataError, match=r"no column 'text'.*\['body'\]"):
        load_blocks(TextSetConf(path=str(files / "a.jsonl")), tokenizer)
    with pytest.raises(DataError, match=r"split='validation'.*only the split 'train'"):
        load_blocks(TextSetConf(path=str(files / "a.jsonl"), text_column="body", split="validation"), tokenizer)
    with pytest.raises(DataError, match=r"\d+ tokens, fewer than one block of 100000"):
        load_blocks(TextSetConf(path=str(files / "a.jsonl"), text_column="body", block_size=100_000), tokenizer)
