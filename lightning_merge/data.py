"""Held-out text: loading through ``datasets``, tokenizing, packing into blocks.

A held-out set is a stream of documents, tokenized with the checkpoint's own
tokenizer and concatenated with EOS between documents, then cut into
non-overlapping blocks of ``block_size`` tokens (no padding inside a block).
``num_blocks`` evenly spaced blocks are kept, so a small set still covers the
whole stream. Each block predicts ``block_size - 1`` tokens; the loss of a set
is the sum of their NLL over their count (see ``evaluate.py``).

Knows nothing of ranks: sharding across ranks is the sampler's job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from .config import TextSetConf

__all__ = ["DataError", "load_texts", "pack_blocks", "evenly_spaced", "load_blocks"]

log = logging.getLogger(__name__)

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}


class DataError(ValueError):
    """A held-out set is missing, empty, too short or lacks its text column."""


def load_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """Load the documents of a local json/jsonl/parquet/txt file through ``datasets``."""
    import datasets

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"held-out file {path} does not exist")
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(_BUILDERS)}")
    datasets.disable_progress_bars()
    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    if text_column not in ds.column_names:
        raise DataError(f"{path}: no column {text_column!r}; the columns are {ds.column_names} "
                        "(set data.*.text_column)")
    texts = [t for t in ds[text_column] if t]
    if not texts:
        raise DataError(f"{path}: the set is empty (0 non-empty documents in column {text_column!r})")
    return texts


def pack_blocks(texts: Sequence[str], tokenizer, block_size: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, and cut into ``[n, block_size]`` int64 blocks."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the checkpoint's tokenizer has no EOS token; it is needed between documents")
    ids: list[int] = []
    for enc in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    n = len(ids) // block_size
    if n == 0:
        raise DataError(f"the held-out set has {len(ids)} tokens, fewer than one block of {block_size}; "
                        "add text or lower data.*.block_size")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def evenly_spaced(blocks: torch.Tensor, n: int | None) -> torch.Tensor:
    """Keep ``n`` blocks evenly spaced over the stream (all of them if ``n`` is None or too large)."""
    total = blocks.shape[0]
    if n is None or n >= total:
        return blocks
    idx = torch.linspace(0, total - 1, n).round().long()
    return blocks[idx]


def load_blocks(conf: TextSetConf, tokenizer, name: str = "heldout") -> torch.Tensor:
    """Load, tokenize and pack one configured set; log its size."""
    texts = load_texts(conf.path, conf.text_column)
    blocks = pack_blocks(texts, tokenizer, conf.block_size)
    kept = evenly_spaced(blocks, conf.num_blocks)
    if conf.num_blocks is not None and kept.shape[0] < conf.num_blocks:
        log.warning("%s: asked for %d blocks but the set holds only %d of %d tokens",
                    name, conf.num_blocks, kept.shape[0], conf.block_size)
    log.info("%s: %d documents -> %d blocks of %d tokens (kept %d)", name, len(texts),
             blocks.shape[0], conf.block_size, kept.shape[0])
    return kept
