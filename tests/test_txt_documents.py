"""How a ``.txt`` held-out file is cut into documents (``data.*.txt_documents``).

Each reading is checked against the same text written as a ``.jsonl`` with the
rows that reading should give, block for block (token ids exactly equal): the
EOS between documents is the only thing the reading decides.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from lightning_merge.config import ConfigError, TextSetConf
from lightning_merge.data import DataError, load_blocks, load_texts

# Three paragraphs, separated by one blank line, by two, and by a line of spaces; inner
# line breaks, indentation and the final line break must all survive.
PARAS = ["def add(a, b):\n    return a + b\n",
         "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
         "The quick brown fox jumps over the lazy dog.\nCheckpoint merging averages weights.\n"]
TEXT = PARAS[0] + "\n" + PARAS[1] + "\n\n" + PARAS[2].replace("\n", "\n  \n", 1)
PARA_ROWS = [PARAS[0], PARAS[1], PARAS[2].split("\n", 1)[0] + "\n", PARAS[2].split("\n", 1)[1]]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "held.txt").write_text(TEXT)
    return {"txt": tmp_path / "held.txt",
            "one_row": _jsonl(tmp_path / "one_row.jsonl", [TEXT]),
            "paragraphs": _jsonl(tmp_path / "paragraphs.jsonl", PARA_ROWS),
            "lines": _jsonl(tmp_path / "lines.jsonl", [x for x in TEXT.split("\n") if x])}


def _blocks(path, tokenizer, **kw):
    return load_blocks(TextSetConf(path=str(path), block_size=4, num_blocks=None, **kw), tokenizer)


def test_a_txt_file_is_one_document_by_default(files, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_merge.data"):
        got = _blocks(files["txt"], tokenizer)
    assert torch.equal(got, _blocks(files["one_row"], tokenizer))
    assert (got == tokenizer.eos_token_id).sum() <= 1  # one document: at most its final EOS fits a block
    assert f"data.heldout: {files['txt']} read as 1 document (data.heldout.txt_documents=file)" in caplog.text
    assert load_texts(files["txt"]) == [TEXT]


def test_blank_lines_cut_paragraphs_faithfully(files, tokenizer, caplog):
    assert load_texts(files["txt"], txt_documents="blank_lines") == PARA_ROWS
    with caplog.at_level(logging.INFO, logger="lightning_merge.data"):
        got = _blocks(files["txt"], tokenizer, txt_documents="blank_lines")
    assert torch.equal(got, _blocks(files["paragraphs"], tokenizer))
    assert "read as 4 documents separated by blank lines (data.heldout.txt_documents=blank_lines)" in caplog.text


def test_lines_keep_the_old_reading(files, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="lightning_merge.data"):
        got = _blocks(files["txt"], tokenizer, txt_documents="lines")
    assert torch.equal(got, _blocks(files["lines"], tokenizer))
    assert "one document per line" in caplog.text and "txt_documents=lines" in caplog.text
    assert not torch.equal(got[: 10], _blocks(files["txt"], tokenizer)[: 10])


def test_the_reading_is_part_of_the_cache_key(files, tokenizer, tmp_path):
    conf = dict(path=str(files["txt"]), block_size=4, num_blocks=None)
    whole = load_blocks(TextSetConf(**conf), tokenizer, cache_dir=tmp_path / "c")
    lines = load_blocks(TextSetConf(**conf, txt_documents="lines"), tokenizer, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c" / "blocks").glob("*.pt"))) == 2
    assert not torch.equal(whole[: 10], lines[: 10])
    assert torch.equal(load_blocks(TextSetConf(**conf), tokenizer, cache_dir=tmp_path / "c"), whole)


def test_a_bad_reading_is_refused_by_name(files):
    with pytest.raises(ConfigError, match=r"txt_documents.*'paragraph'.*file.*blank_lines.*lines"):
        TextSetConf(path=str(files["txt"]), txt_documents="paragraph")
    with pytest.raises(DataError, match=r"data\.heldout\.txt_documents='paragraph'"):
        load_texts(files["txt"], txt_documents="paragraph")
