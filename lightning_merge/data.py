"""Held-out text: loading through ``datasets``, tokenizing, packing into blocks, caching.

A held-out set is a stream of documents, tokenized with the checkpoint's own
tokenizer and concatenated with EOS between documents, then cut into
non-overlapping blocks of ``block_size`` tokens (no padding inside a block).
``num_blocks`` evenly spaced blocks are kept, so a small set still covers the
whole stream. Each block predicts ``block_size - 1`` tokens; the loss of a set
is the sum of their NLL over their count (see ``evaluate.py``).

A ``.txt`` file is cut into documents as ``txt_documents`` says: ``file`` (the
whole file is one document: the default, so a ``.txt`` scores as the same text
in one ``.jsonl`` row does), ``blank_lines`` (paragraphs, each kept with its own
line breaks) or ``lines`` (one document per line, blank lines dropped: an EOS
after every line, which scores code or prose as much harder text than it is).

Tokenized blocks are cached under ``cache_dir/blocks/`` keyed on the dataset's
fingerprint, the tokenizer and every option that shapes the blocks, so a
second run (or the other ranks of this one) does not tokenize again.

Knows nothing of ranks: sharding across ranks is the sampler's job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from .config import TextSetConf

__all__ = ["DataError", "load_dataset_split", "load_texts", "pack_blocks", "evenly_spaced", "evenly_spaced_index",
           "load_blocks"]

log = logging.getLogger(__name__)

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".text": "text",
             ".csv": "csv"}
_FORMAT = 1  # bump when the block layout changes, to invalidate caches
# (``txt_documents`` is part of the key through ``asdict(conf)``: caches written before it existed,
# when a .txt was read by lines, have other keys and are never read as ``file``.)
TXT_DOCUMENTS = ("file", "blank_lines", "lines")
_TXT_SAMPLE_BY = {"file": "document", "blank_lines": "document", "lines": "line"}
# One or more blank (empty or spaces/tabs only) lines, at the start or after a line break.
_BLANK_LINES = re.compile(r"(?:^|(?<=\n))[ \t]*\n(?:[ \t]*\n)*")


class DataError(ValueError):
    """A held-out set is missing, empty, too short or lacks its text column."""


def load_dataset_split(path: str = "", name: str | None = None, config_name: str | None = None,
                       split: str = "train", what: str = "data.heldout", txt_documents: str = "file"):
    """A ``datasets.Dataset`` from a local file or a hub dataset (offline from its cache).

    A ``.txt`` file is cut into rows (documents) as ``txt_documents`` says (see
    the module docstring), and the reading is logged.
    """
    import datasets

    datasets.disable_progress_bars()
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"{what}.path: {p} does not exist")
        builder = _BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataError(f"{what}.path: {p} has unsupported type {p.suffix!r}; use one of {sorted(_BUILDERS)}")
        if split != "train":
            raise DataError(f"{what}.split={split!r}: a local file has only the split 'train'")
        if builder == "text":
            return _load_txt(p, what, txt_documents)
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    if not name:
        raise DataError(f"{what}: give a local `path` or a hub dataset `name`")
    try:
        return datasets.load_dataset(name, config_name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{what}.split={split!r} is not a split of {name} ({config_name}): {e}") from None
        raise DataError(f"{what}: cannot load {name} ({config_name}): {e}") from None
    except (ConnectionError, FileNotFoundError, OSError) as e:
        raise DataError(f"{what}: dataset {name} ({config_name}, split {split}) is not in the datasets "
                        f"cache and the hub cannot be reached ({type(e).__name__}: {e})") from None


def _load_txt(p: Path, what: str, txt_documents: str):
    """A ``.txt`` file as rows of documents (``file`` | ``blank_lines`` | ``lines``).

    datasets' own ``sample_by="paragraph"`` is not used: it splits on the exact
    string ``"\\n\\n"``, so a third newline starts the next paragraph, a line of
    spaces separates nothing, and only the last paragraph keeps its final line
    break. Paragraphs are cut here from the one-document reading instead (by a
    module-level function, so the dataset's fingerprint, and the block cache
    keyed on it, stay stable across runs).
    """
    import datasets

    if txt_documents not in TXT_DOCUMENTS:
        raise DataError(f"{what}.txt_documents={txt_documents!r}: use one of {list(TXT_DOCUMENTS)}")
    ds = datasets.load_dataset("text", data_files=str(p), split="train", sample_by=_TXT_SAMPLE_BY[txt_documents])
    if txt_documents == "file":
        how = "1 document"
    elif txt_documents == "blank_lines":
        ds = ds.map(_paragraph_rows, batched=True, keep_in_memory=True)
        how = f"{ds.num_rows} documents separated by blank lines"
    else:
        how = f"one document per line ({ds.num_rows} lines; blank ones are dropped)"
    log.info("%s: %s read as %s (%s.txt_documents=%s)", what, p, how, what, txt_documents)
    return ds


def _paragraphs(text: str) -> list[str]:
    """The paragraphs of ``text``: runs of non-blank lines, each kept with its own line breaks."""
    return [para for para in _BLANK_LINES.split(text) if para.strip()]


def _paragraph_rows(batch: dict) -> dict:
    return {"text": [para for text in batch["text"] for para in _paragraphs(text or "")]}


def load_texts(path: str | Path, text_column: str = "text", txt_documents: str = "file") -> list[str]:
    """The non-empty documents of a local json/jsonl/parquet/txt file (``.txt``: see ``txt_documents``)."""
    return _texts(load_dataset_split(str(path), txt_documents=txt_documents), text_column, str(path))


def _texts(ds, text_column: str, where: str) -> list[str]:
    if text_column not in ds.column_names:
        raise DataError(f"{where}: no column {text_column!r}; the columns are {ds.column_names} "
                        "(set data.*.text_column)")
    texts = [t for t in ds[text_column] if t]
    if not texts:
        raise DataError(f"{where}: the set is empty (0 non-empty documents in column {text_column!r})")
    return texts


def _tokenize(texts: Sequence[str], tokenizer) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _join(docs: Sequence[Sequence[int]], eos: int) -> list[int]:
    ids: list[int] = []
    for d in docs:
        ids.extend(d)
        ids.append(eos)
    return ids


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the checkpoint's tokenizer has no EOS token; it is needed between documents")
    return tokenizer.eos_token_id


def pack_blocks(texts: Sequence[str], tokenizer, block_size: int) -> torch.Tensor:
    """Tokenize, join documents with EOS, and cut into ``[n, block_size]`` int64 blocks."""
    return _cut(_join(_tokenize(texts, tokenizer), _eos(tokenizer)), block_size)


def _cut(ids: list[int], block_size: int) -> torch.Tensor:
    n = len(ids) // block_size
    if n == 0:
        raise DataError(f"the held-out set has {len(ids)} tokens, fewer than one block of {block_size}; "
                        "add text or lower data.*.block_size")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def evenly_spaced(blocks: torch.Tensor, n: int | None) -> torch.Tensor:
    """Keep ``n`` blocks evenly spaced over the stream (all of them if ``n`` is None or too large)."""
    idx = evenly_spaced_index(blocks.shape[0], n)
    return blocks if idx is None else blocks[idx]


def evenly_spaced_index(total: int, n: int | None) -> torch.Tensor | None:
    """The indices :func:`evenly_spaced` keeps (distinct, ascending), or None when it keeps every block."""
    if n is None or n >= total:
        return None
    return torch.linspace(0, total - 1, n).round().long()


def _subset(docs: list[list[int]], conf: TextSetConf) -> list[list[int]]:
    """A seeded subset of documents (by count, then by token budget), kept in corpus order."""
    if conf.max_documents is None and conf.max_tokens is None:
        return docs
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(conf.seed)).tolist()
    if conf.max_documents is not None:
        order = order[: conf.max_documents]
    if conf.max_tokens is not None:
        kept, total = [], 0
        for i in order:
            if total >= conf.max_tokens:
                break
            kept.append(i)
            total += len(docs[i]) + 1
        order = kept
    return [docs[i] for i in sorted(order)]


def _tokenizer_hash(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def load_blocks(conf: TextSetConf, tokenizer, name: str = "heldout", cache_dir: str | Path | None = None
                ) -> torch.Tensor:
    """Load, subset, tokenize and pack one configured set (cached); log its size."""
    where = conf.path or f"{conf.name}:{conf.config_name}:{conf.split}"
    ds = load_dataset_split(conf.path, conf.name, conf.config_name, conf.split, what=f"data.{name}",
                            txt_documents=conf.txt_documents)
    cache = None
    if cache_dir is not None:
        key = hashlib.sha1(json.dumps([_FORMAT, ds._fingerprint, _tokenizer_hash(tokenizer), asdict(conf)],
                                      sort_keys=True, default=str).encode()).hexdigest()[:20]
        cache = Path(cache_dir).expanduser() / "blocks" / f"{key}.pt"
        if cache.exists():
            blocks = torch.load(cache, weights_only=True)
            log.info("%s: %d blocks of %d tokens from the cache (%s)", name, blocks.shape[0], conf.block_size,
                     cache.name)
            return blocks
    docs = _subset(_tokenize(_texts(ds, conf.text_column, where), tokenizer), conf)
    ids = _join(docs, _eos(tokenizer))
    if conf.max_tokens is not None:
        ids = ids[: max(conf.max_tokens, conf.block_size)]
    blocks = _cut(ids, conf.block_size)
    kept = evenly_spaced(blocks, conf.num_blocks)
    if conf.num_blocks is not None and kept.shape[0] < conf.num_blocks:
        log.warning("%s: asked for %d blocks but the set holds only %d of %d tokens",
                    name, conf.num_blocks, kept.shape[0], conf.block_size)
    log.info("%s: %d documents -> %d blocks of %d tokens (kept %d)", name, len(docs), blocks.shape[0],
             conf.block_size, kept.shape[0])
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        os.close(fd)
        torch.save(kept.clone(), tmp)
        os.replace(tmp, cache)
    return kept
