"""lm-eval in a run: tasks loaded and checked before the model exists, then scored on the Evaluator's model.

Two uses, both with ``lmeval``'s settings (``config.LMEvalConf``):

- the search objective (``search.objective=lmeval``): ``lmeval.task``'s ``lmeval.metric`` of the
  trial's merge, minimised as ``1 - metric`` when lm-eval says higher is better;
- the report (``report.lmeval.tasks``): after the search, each checkpoint, the best baseline and the
  best merge scored on every report task, kept in ``lmeval_report.jsonl`` (a resumed run does not
  score a candidate twice) and shown in ``results.json``, ``report.md`` and the model card.

Checks that cost no model come first (:func:`prepare`): unknown tasks or missing files (``tasks.py``),
the objective's split also reported (refused unless ``lmeval.allow_same_split``), and held-out
documents sharing n-grams with a reported task's documents (a warning naming the task and count).
The scoring goes through :class:`~lightning_merge.lmeval.model.ResidentLM` with the Evaluator as its
runner: this module knows no ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import ConfigError
from ..io import append_jsonl, read_jsonl

__all__ = ["Plan", "prepare", "Scorer", "report_candidates", "objective_label"]

log = logging.getLogger(__name__)

REPORT_FILE = "lmeval_report.jsonl"


@dataclass
class Plan:
    """The loaded tasks: the objective's (or None) and the report's (or None), and the objective's direction."""

    objective: dict | None
    report: dict | None
    higher_is_better: bool | None


def prepare(cfg, heldout_texts: Sequence[str]) -> Plan | None:
    """Load the tasks ``cfg`` names and run the checks that need no model; None when lm-eval is not used."""
    conf = cfg.lmeval
    want_objective = cfg.search.objective == "lmeval"
    report_tasks = list(cfg.report.lmeval.tasks)
    if not want_objective and not report_tasks:
        return None
    from .contamination import ngram_overlap
    from .tasks import TaskError, higher_is_better, load_tasks, split_key, task_texts

    def load(names: list[str], option: str) -> dict:
        try:
            return load_tasks(names, data={k: v for k, v in conf.data.items() if v}, include_path=list(conf.include_path),
                              num_fewshot=conf.num_fewshot, option=option)
        except TaskError as e:
            raise ConfigError(f"config option {e}") from None

    objective = load([conf.task], "lmeval.task") if want_objective else None
    report = load(report_tasks, "report.lmeval.tasks") if report_tasks else None
    hib = None
    if objective is not None:
        try:
            hib = higher_is_better(objective, conf.task, conf.metric_key)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"config option `lmeval.metric`: {e}") from None
        if report is not None and not conf.allow_same_split:
            mine = split_key(objective, conf.task)
            for name in report_tasks:
                if mine & split_key(report, name):
                    raise ConfigError(
                        f"config option `report.lmeval.tasks`: {name!r} scores the same data split as the search's "
                        f"task {conf.task!r}; a merge chosen on a split and reported on it overstates the gain. "
                        "Report another split, or set lmeval.allow_same_split=true")
    # The reported tasks must be independent of the held-out text (the search's own task may be built from it).
    checked = task_texts(report, limit=conf.limit) if report is not None else {}
    for task, count in sorted(ngram_overlap(heldout_texts, checked, n=conf.ngram).items()):
        if count:
            log.warning("contamination: %d document(s) of lm-eval task %s share a %d-word n-gram with the held-out "
                        "text set (data.heldout); the held-out loss and that task are not independent",
                        count, task, conf.ngram)
    return Plan(objective, report, hib)


class Scorer:
    """The lm-eval side of a run, built once: the tasks, and a ResidentLM over the Evaluator."""

    def __init__(self, plan: Plan, cfg, evaluator, tokenizer, model_config) -> None:
        from .model import ResidentLM

        self.plan, self.conf, self.evaluator = plan, cfg.lmeval, evaluator
        self.report_names = list(cfg.report.lmeval.tasks)
        # lm-eval logs "Building contexts ..." and more at INFO for every evaluation, i.e. every trial.
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        self.lm = ResidentLM(model_config, tokenizer, evaluator, batch_size=self.conf.batch_size,
                             add_bos_token=self.conf.add_bos_token, max_gen_toks=self.conf.max_gen_toks,
                             synced=evaluator.sharded)

    def _run(self, task_dict: dict) -> dict:
        import functools

        import lm_eval.api.task as lm_task
        from tqdm import tqdm

        from .tasks import run_tasks

        limit = self.conf.limit
        limit = int(limit) if limit is not None and limit >= 1 else limit
        # Hack, said plainly: lm-eval draws a bare tqdm bar over the documents each time it builds a task's
        # requests (every trial, every subject); the run's own progress bar already shows the evaluation.
        quiet, lm_task.tqdm = lm_task.tqdm, functools.partial(tqdm, disable=True)
        try:
            return run_tasks(self.lm, task_dict, limit=limit, seed=self.conf.seed)
        finally:
            lm_task.tqdm = quiet

    def objective(self) -> tuple[float, dict]:
        """The minimised value of the current parameters and the metric it came from (every rank)."""
        from .tasks import metric_value

        value = metric_value(self._run(self.plan.objective), self.conf.task, self.conf.metric_key)
        if not math.isfinite(value):
            raise FloatingPointError(f"lm-eval {self.conf.task} {self.conf.metric_key} is {value}")
        return (1.0 - value if self.plan.higher_is_better else value), {"lmeval_value": value}

    def scores(self) -> dict[str, dict[str, float]]:
        """Every report task's metrics (stderr left out) of the current parameters (every rank)."""
        res = self._run(self.plan.report)
        missing = [t for t in self.report_names if t not in res]
        if missing:
            raise RuntimeError(f"lm-eval returned no results for {missing}; it returned {sorted(res)}")
        return {task: {k: float(v) for k, v in sorted(res[task].items())  # lm-eval's "metric,filter" keys
                       if "," in k and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
                for task in self.report_names}

    def report(self, candidates: list[dict], objective: str, out: Path) -> dict:
        """Score the final candidates on the report tasks; cached per candidate in ``lmeval_report.jsonl``."""
        ev = self.evaluator
        chosen = report_candidates(candidates, objective, self.plan.higher_is_better)
        done = {}
        if ev.is_global_zero:
            done = {(r["name"], tuple(r["weights"])): r for r in read_jsonl(Path(out) / REPORT_FILE)}
        done = ev.broadcast(done)
        rows = []
        for c in chosen:
            key = (c["name"], tuple(c["weights"]))
            if key not in done:
                ev.set_weights(c["weights"])
                rec = {"name": c["name"], "kind": c["kind"], "weights": list(c["weights"]), "metrics": self.scores()}
                if ev.is_global_zero:
                    append_jsonl(Path(out) / REPORT_FILE, rec)
                done[key] = rec
            rows.append(done[key])
        return {"tasks": self.report_names, "limit": self.conf.limit, "num_fewshot": self.conf.num_fewshot,
                "seed": self.conf.seed, "rows": rows}


def report_candidates(candidates: list[dict], objective: str, higher_is_better: bool | None = None) -> list[dict]:
    """Each checkpoint, the best baseline and the best merge. The best baseline is ranked on the objective's
    report figure: the held-out loss on the whole report set, or the lm-eval metric."""
    def rank(c: dict) -> float:
        if objective == "lmeval" and "lmeval_value" in c:
            return 1.0 - c["lmeval_value"] if higher_is_better else c["lmeval_value"]
        return c.get("heldout_loss", math.inf)

    singles = [c for c in candidates if c.get("kind") == "checkpoint"]
    baselines = [c for c in candidates if c.get("kind") == "baseline"]
    best = [c for c in candidates if c.get("kind") == "search"]
    chosen = singles + ([min(baselines, key=rank)] if baselines else []) + best
    return chosen


def objective_label(conf) -> str:
    """What ``search.objective=lmeval`` minimises, in words (``conf``: ``LMEvalConf``)."""
    return f"lm-eval {conf.task} {conf.metric_key.removesuffix(',none')}"
