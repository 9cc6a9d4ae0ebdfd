"""Shared fixtures: tiny real Llama checkpoints on disk with an offline-trained tokenizer.

Everything is built once per session from a config (random init, saved as real
safetensors with ``save_pretrained``); nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "The quick brown fox jumps over the lazy dog. Checkpoint merging averages weights.\n",
] * 20


def make_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained offline with `tokenizers` (the demo's trainer), wrapped for transformers."""
    from lightning_merge.demo import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size)


def make_llama(path: Path, seed: int, tokenizer, hidden: int = 32, layers: int = 2,
               dtype: torch.dtype = torch.float32, positions: int = 128, **save_kwargs) -> Path:
    """Save a random-init tiny Llama (and the tokenizer) as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, intermediate_size=2 * hidden,
                      max_position_embeddings=positions, tie_word_embeddings=False,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    return path


class OneProcess:
    """What the loop needs of an Evaluator, on a single process."""

    merge_seconds = hook_seconds = 0.0
    on_merged = on_batch = None

    def broadcast(self, obj):
        return obj

    def any_rank(self, flag):
        return bool(flag)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tokenizer) -> dict:
    """Three tiny checkpoints in a run folder (step900, step1000, step1100) and a held-out jsonl."""
    root = tmp_path_factory.mktemp("tiny_run")
    ckdir = root / "checkpoints"
    paths = [make_llama(ckdir / f"step{s}", seed=i, tokenizer=tokenizer)
             for i, s in enumerate((900, 1000, 1100))]
    held = root / "heldout.jsonl"
    with open(held, "w") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": CORPUS[i % 5] + f"# doc {i}\n"}) + "\n")
    return {"root": root, "ckdir": ckdir, "paths": paths, "heldout": held}
