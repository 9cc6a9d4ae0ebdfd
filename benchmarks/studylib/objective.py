"""The study's one evaluation path: the tool's own session (``driver._session``), memoized on disk.

Every number in the study is a held-out loss (or a cloze accuracy) of a weighted merge of one trajectory's
checkpoints, computed by the same code a ``python -m lightning_merge`` run uses: the Evaluator (Lightning,
exact token-weighted sums, fp32), its resident merger, and for accuracy the lm-eval ``ResidentLM`` scorer
over the shipped ``cloze_local`` task built from the held-out text. Evaluation is deterministic, so each
``(set, weights)`` is computed once and appended to ``evals.jsonl``: a killed study resumes where it stopped,
and the tables can be rebuilt without evaluating anything.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from .trajectories import CONFS

log = logging.getLogger(__name__)

_ROUND = 12  # weights are keyed to 12 decimals (as the driver keys trials)


def _key(set_name: str, weights) -> str:
    return set_name + "|" + ",".join(f"{float(w):.{_ROUND}f}" for w in weights)


class Objective:
    """Losses of merges of one trajectory's checkpoints (all of them, oldest first), on named block sets.

    Sets: ``search`` (``search_blocks`` evenly spaced held-out blocks, the search objective), ``report``
    (the ``report_blocks`` held-out blocks, 256 by default), ``search_N`` (N evenly spaced held-out blocks), ``ood:NAME`` (each
    out-of-domain set), ``cloze`` (1 - accuracy on 400 cloze items cut from the held-out text).
    """

    def __init__(self, base: str, cache_dir: str | Path, study_dir: Path, search_blocks: int,
                 accuracy: bool = False, limit: int | None = None, report_blocks: int = 256,
                 batch_size: int = 16) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from lightning_merge.config import (CheckpointsConf, DataConf, LMEvalConf, MergeConf, RunConfig, SearchConf,
                                            TextSetConf)
        from lightning_merge.data import evenly_spaced
        from lightning_merge.driver import Stages, _resolve_inputs, _seed_everything, _session
        from lightning_merge.series import CheckpointSeries

        self.base, self.search_size = base, search_blocks
        n = CONFS[base].num_checkpoints  # mode=evaluate: no signal handlers, no search state; weights are ours
        cfg = RunConfig(mode="evaluate", cache_dir=str(cache_dir), demo=CONFS[base], checkpoints=CheckpointsConf(last=None),
                        merge=MergeConf(weights=[1.0 / n] * n, write=False),
                        data=DataConf(heldout=TextSetConf(num_blocks=report_blocks), search_blocks=search_blocks,
                                      batch_size=batch_size))  # the out-of-domain sets get as many blocks
        if accuracy:
            cfg = replace(cfg, search=SearchConf(objective="lmeval"), lmeval=LMEvalConf(task="cloze_local", limit=limit))
        _seed_everything(cfg.seed, cfg.threads)
        torch.set_num_threads(int(os.environ.get("STUDY_THREADS", "2")))
        cfg = _resolve_inputs(cfg, Stages())
        self.cfg = cfg
        c = cfg.checkpoints
        self.series = CheckpointSeries.from_sources(c.sources, selector=c.selector())
        session, _ = _session(cfg, self.series, Stages(), lambda blocks: None, None)
        self.session, self.evaluator = session, session.evaluator
        from lightning_merge.data import load_blocks
        from lightning_merge.model import load_tokenizer

        tok = load_tokenizer(self.series.config_dir)
        self.report_blocks = load_blocks(cfg.data.heldout, tok, "heldout", cache_dir=cfg.cache_dir)
        self.blocks = {"search": session.search_blocks, "report": self.report_blocks}
        for name, conf in cfg.data.ood.items():
            self.blocks[f"ood:{name}"] = load_blocks(conf, tok, f"ood.{name}", cache_dir=cfg.cache_dir)
        self._evenly = evenly_spaced
        self.k = len(self.series)
        cloze = cfg.lmeval.data.get("cloze_local")
        self.cloze_items = len(Path(cloze).read_text().splitlines()) if accuracy and cloze else 0
        if limit is not None:
            self.cloze_items = min(self.cloze_items, int(limit))
        self.memo_path = study_dir / "evals" / f"{base}-report{report_blocks}-search{search_blocks}-cloze{limit}.jsonl"
        self.memo_path.parent.mkdir(parents=True, exist_ok=True)
        self.memo: dict[str, float] = {}
        if self.memo_path.is_file():
            for line in self.memo_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut by a kill: the evaluation is simply redone
                    continue
                self.memo[rec["key"]] = rec["value"]
        self.evals, self.seconds = 0, 0.0

    def blocks_for(self, set_name: str) -> torch.Tensor:
        if set_name not in self.blocks and set_name.startswith("search_"):
            self.blocks[set_name] = self._evenly(self.report_blocks, int(set_name.split("_", 1)[1]))
        return self.blocks[set_name]

    def __call__(self, weights, set_name: str = "search") -> float:
        """The loss (``cloze``: 1 - accuracy) of the merge with ``weights`` (one per checkpoint) on ``set_name``."""
        weights = [float(w) for w in weights]
        if len(weights) != self.k:
            raise ValueError(f"{self.base}: {len(weights)} weights for {self.k} checkpoints")
        key = _key(set_name, weights)
        if key in self.memo:
            return self.memo[key]
        t0 = time.perf_counter()
        self.evaluator.set_weights(weights)
        if set_name == "cloze":
            value = self.session.lmeval.objective()[0]
        else:
            value = self.evaluator.evaluate(self.blocks_for(set_name)).loss
        self.seconds += time.perf_counter() - t0
        self.evals += 1
        self.memo[key] = value
        with open(self.memo_path, "a") as f:  # one line per evaluation: a kill loses at most this one
            f.write(json.dumps({"key": key, "value": value}) + "\n")
        return value

    def one_hot(self, i: int) -> list[float]:
        return [1.0 if j == i else 0.0 for j in range(self.k)]

    def pair(self, i: int, j: int, lam: float) -> list[float]:
        """``lam`` on checkpoint ``j`` (the newer), ``1 - lam`` on ``i``: the paper's pairwise merge."""
        w = [0.0] * self.k
        w[j] += lam
        w[i] += 1.0 - lam
        return w

    def spread(self, indices: list[int], sub: list[float]) -> list[float]:
        """Weights over ``indices`` (a subset's search space) as weights over every checkpoint."""
        w = [0.0] * self.k
        for i, x in zip(indices, sub):
            w[i] += float(x)
        return w


class View:
    """An :class:`Objective` restricted to some checkpoints and one set: what a search over them calls."""

    def __init__(self, obj: Objective, indices: list[int], set_name: str = "search") -> None:
        self.obj, self.indices, self.set_name = obj, list(indices), set_name

    def __call__(self, sub_weights) -> float:
        return self.obj(self.obj.spread(self.indices, sub_weights), self.set_name)

    @property
    def seconds(self) -> float:
        """The objective's evaluation time so far (``run_search`` takes it off the search's wall time)."""
        return self.obj.seconds
