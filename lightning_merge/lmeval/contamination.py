"""Does the held-out text set contain an lm-eval task's documents? A word n-gram overlap count.

The held-out loss and an lm-eval score are two views of a merge; if the held-out text holds a task's
questions, the two are not independent and a merge chosen on one flatters the other. The check is the
GPT-3 / lm-eval decontamination one in miniature: a task document counts as seen when it shares at least
one word n-gram (13 by default) with any held-out document. Words are lowercased runs of letters and
digits (punctuation dropped). Only the task side is held in memory (hashes of its n-grams); the held-out
documents are streamed once.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Iterable

_WORD = re.compile(r"\w+")


def _words(text: str) -> list[str]:
    """Lowercased words with the punctuation stripped (``\\w+`` runs; ``don't`` is ``don``, ``t``)."""
    return _WORD.findall(text.lower())


def _grams(words: list[str], n: int) -> Iterable[int]:
    return (hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1))


def ngram_overlap(documents: Iterable[str], task_texts: dict[str, list[str]], n: int = 13) -> dict[str, int]:
    """Per task, how many of its docs share at least one word n-gram with ``documents`` (the held-out text set).

    A task doc shorter than ``n`` words uses its whole word sequence as its one n-gram (it counts when that
    sequence occurs in a held-out document); a doc with no words never counts. Every task of ``task_texts``
    is in the result, 0 when clean."""
    ids = [(task, i) for task, texts in task_texts.items() for i in range(len(texts))]
    owner: dict[int, dict[int, int]] = defaultdict(dict)  # n-gram length -> hash -> first doc id
    more: dict[tuple[int, int], list[int]] = defaultdict(list)  # the same n-gram in further docs
    for doc_id, (task, i) in enumerate(ids):
        words = _words(task_texts[task][i])
        size = min(n, len(words))
        for h in (set(_grams(words, size)) if size else ()):
            if owner[size].setdefault(h, doc_id) != doc_id:
                more[size, h].append(doc_id)
    seen: set[int] = set()
    for doc in documents:
        words = _words(doc)
        for size, table in owner.items():
            for h in _grams(words, size):
                if h in table:
                    seen.add(table[h])
                    seen.update(more.get((size, h), ()))
    counts = {task: 0 for task in task_texts}
    for doc_id in seen:
        counts[ids[doc_id][0]] += 1
    return counts
