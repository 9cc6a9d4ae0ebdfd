"""lm-eval tasks found, loaded once, run per trial and checked, offline.

Names are lm-eval's built-in tasks (offline only when their dataset is in the `datasets` cache), tasks in
``include_path`` folders, or the shipped local tasks of :data:`SHIPPED`: lm-eval's own stock configs
(``task_files/*.yaml``, copied from lm-eval 0.4.13) whose dataset is the user's files
(``lmeval.data.<name>``), so prompts, few-shot sampling, filters and metrics are the stock task's. The
shipped YAMLs are read as dict configs and built here into ``ConfigurableTask`` / ``Group`` objects; lm-eval's
``TaskManager`` (whose index of the ~15k built-in YAMLs takes ~15 s to build) is built only when a name is not
shipped. Every refusal is a :class:`TaskError` raised by :func:`load_tasks`, before any model work.
"""

from __future__ import annotations

import copy
import csv
import functools
import json
import logging
import os
import random
import re
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).parent / "task_files"
SHIPPED: dict[str, str] = {
    "mmlu_local": "folder of <subject>/{test,dev}*.{parquet,json,jsonl,csv} (cais/mmlu: question, subject, choices, "
                  "answer), or test.*/dev.* with a subject column; one task per subject",
    "ceval_local": "folder of <subject>/{val,dev}*.{parquet,json,jsonl,csv} or {val,dev}/<subject>[_val|_dev].* "
                   "(ceval/ceval-exam: id, question, A, B, C, D, answer, explanation); one task per subject",
    "cmmlu_local": "folder of <subject>/{test,dev}*.{parquet,json,jsonl,csv} or {test,dev}/<subject>.* "
                   "(haonan-li/cmmlu: Question, A, B, C, D, Answer); one task per subject",
    "gsm8k_local": "folder with test.* and train.* (openai/gsm8k main: question, answer)",
    "text_local": "file (.jsonl/.json/.parquet/.csv with a text or page column, or .txt split at blank lines) "
                  "or a folder with test.*",
    "cloze_local": "file (.jsonl/.json/.parquet/.csv with context, choices, answer; see build_cloze_items) "
                   "or a folder with test.*",
}
_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".txt": "text"}
# (eval split, few-shot split or None, required columns, per-subject?) of each shipped task
_LAYOUT = {
    "mmlu_local": ("test", "dev", ("question", "choices", "answer"), True),
    "ceval_local": ("val", "dev", ("question", "A", "B", "C", "D", "answer"), True),
    "cmmlu_local": ("test", "dev", ("Question", "A", "B", "C", "D", "Answer"), True),
    "gsm8k_local": ("test", "train", ("question", "answer"), False),
    "text_local": ("test", None, (), False),
    "cloze_local": ("test", None, ("context", "choices", "answer"), False),
}
_GROUP_METRICS = {"mmlu_local": ("acc",), "ceval_local": ("acc", "acc_norm"), "cmmlu_local": ("acc", "acc_norm")}
_NOT_SUBJECTS = {"all", "auxiliary_train"}  # cais/mmlu's extra folders (every subject again; train only)


class TaskError(ValueError):
    """A bad task name or task data; the message names the option at fault and what to do."""


def load_tasks(names: list[str], *, data: dict[str, str] | None = None, include_path: list[str] | None = None,
               num_fewshot: int | None = None, option: str = "lmeval.task or report.lmeval.tasks") -> dict:
    """lm-eval's TaskDict for ``names`` (``TaskManager.load``'s ``{"tasks", "groups", "group_map"}``; lm-eval
    0.4.13 deprecates ``get_task_dict``'s nested form), built once per run.

    Shipped names read ``data[name]`` (see :data:`SHIPPED`); other names go to
    ``TaskManager(include_path=...)``. ``num_fewshot`` overrides every task's default as
    ``lm_eval.simple_evaluate`` does: a task whose config says 0 keeps 0 (a warning), None keeps the task's
    default or 0. ``option`` is the config option named in refusals."""
    data = {k: str(v) for k, v in (data or {}).items()}
    if not names:
        raise TaskError(f"{option}: no lm-eval task named; shipped offline tasks: {', '.join(SHIPPED)}")
    files = {n: _resolve(n, data.get(n)) for n in dict.fromkeys(names) if n in SHIPPED}  # refusals first
    others = [n for n in dict.fromkeys(names) if n not in SHIPPED]
    manager = _manager(tuple(str(Path(p).expanduser()) for p in include_path or ())) if others else None
    unknown = [n for n in others if n not in manager.all_tasks and not n.endswith((".yaml", ".yml"))]
    if unknown:
        raise TaskError(
            f"{option}: unknown lm-eval task(s) {unknown}. Shipped offline tasks: {', '.join(SHIPPED)} (their files "
            "given as lmeval.data.<name>=/path); lm-eval built-in task and group names also work, but only when "
            "their dataset is already in the `datasets` cache (no download here); or add a folder of task YAMLs "
            "to lmeval.include_path")
    built = [_build_shipped(n, files[n]) for n in files]
    if manager is None:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_defaults=False)
    try:
        task_dict = manager.load([*built, *others])
    except Exception as e:  # a dataset not in the cache surfaces as whatever `datasets` raises offline
        raise TaskError(
            f"{option}: lm-eval could not load {others}: {type(e).__name__}: {e}. Built-in tasks run offline "
            "only when their dataset is already in the `datasets` cache (HF_DATASETS_CACHE); otherwise use "
            f"a shipped task ({', '.join(SHIPPED)}) with lmeval.data.<name>=/path") from e
    for name, task in task_dict["tasks"].items():
        default = task.get_config("num_fewshot")
        if num_fewshot is not None and default == 0:
            log.warning("lm-eval task %s sets num_fewshot: 0 in its config; lmeval.num_fewshot=%d is ignored for it",
                        name, num_fewshot)
        elif num_fewshot is not None:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif default is None:
            task.set_config(key="num_fewshot", value=0)
        shots, pool = task.get_config("num_fewshot"), getattr(getattr(task, "sampler", None), "df", None)
        if shots and pool is not None and len(pool) < shots:
            raise TaskError(f"lmeval.num_fewshot: {name} has {len(pool)} few-shot example(s), fewer than the "
                            f"{shots} asked for; lower lmeval.num_fewshot or give more few-shot rows")
        task.set_fewshot_seed(seed=1234)
    return task_dict


@functools.lru_cache(maxsize=4)
def _manager(include_path: tuple[str, ...]):
    """lm-eval's TaskManager over the built-in tasks and ``include_path``, built once per process (~15 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None)


def _split_files(folder: Path, split: str) -> list[Path]:
    """``<split>.<ext>`` or ``<split>[-_]<anything>.<ext>`` (the hub's ``test-00000-of-00001.parquet``)."""
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in _BUILDERS
                  and (f.stem == split or (f.stem.startswith(split) and f.stem[len(split)] in "-_")))


def _resolve(name: str, given: str | None) -> dict[str | None, dict[str, list[Path]]]:
    """``{subject or None: {split: files}}`` for a shipped task, every split and column checked."""
    opt = f"lmeval.data.{name}"
    if not given:
        raise TaskError(f"lm-eval task {name!r} is a shipped offline task and needs its files: set {opt}=/path "
                        f"({SHIPPED[name]})")
    root = Path(given).expanduser()
    if not root.exists():
        raise TaskError(f"{opt}={given}: no such file or folder ({SHIPPED[name]})")
    eval_split, shot_split, columns, per_subject = _LAYOUT[name]
    splits = [s for s in (eval_split, shot_split) if s]
    want = " and ".join(f"{s}.{{parquet,json,jsonl,csv}}" for s in splits)
    if root.is_file():
        if shot_split or root.suffix not in _BUILDERS:
            raise TaskError(f"{opt}={given}: expected a folder with {want} ({SHIPPED[name]})")
        found = {None: {eval_split: [root]}}
    elif per_subject and not _split_files(root, eval_split):
        if all((root / s).is_dir() for s in splits):  # {split}/<subject>[_split].ext (C-Eval's and CMMLU's zips)
            found = {}
            for s in splits:
                for f in sorted(p for p in (root / s).iterdir() if p.is_file() and p.suffix in _BUILDERS):
                    found.setdefault(f.stem.removesuffix(f"_{s}"), {}).setdefault(s, []).append(f)
        else:
            found = {d.name: {s: _split_files(d, s) for s in splits} for d in sorted(root.iterdir())
                     if d.is_dir() and not d.name.startswith((".", "_")) and d.name not in _NOT_SUBJECTS}
        if not found:
            raise TaskError(f"{opt}={given}: no subject folders; expected <subject>/{want} ({SHIPPED[name]})")
    else:
        if not _split_files(root, eval_split) and name == "gsm8k_local" and (root / "main").is_dir():
            root = root / "main"  # openai/gsm8k's hub layout
        found = {None: {s: _split_files(root, s) for s in splits}}
        columns = (*columns, "subject") if per_subject else columns
    for subject, by_split in found.items():
        where = root / subject if subject and (root / subject).is_dir() else root
        for s in splits:
            if not by_split.get(s):
                raise TaskError(f"{opt}={given}: {where} has no {s} file; expected {want} ({SHIPPED[name]})")
            if len({_BUILDERS[f.suffix] for f in by_split[s]}) > 1:
                raise TaskError(f"{opt}={given}: {where} mixes file types for {s}; use one of parquet, json, csv")
        try:
            have = _columns(by_split[eval_split][0])
        except (OSError, ValueError) as e:  # JSONDecodeError and pyarrow's ArrowInvalid are ValueErrors
            raise TaskError(f"{opt}={given}: cannot read {by_split[eval_split][0]}: {e}") from e
        need = [c for c in columns if c not in have] or (["text or page"] if name == "text_local" and
                                                         not {"text", "page"} & have else [])
        if need:
            raise TaskError(f"{opt}={given}: {by_split[eval_split][0]} lacks column(s) {need} (it has "
                            f"{sorted(have)}); {name} reads {SHIPPED[name]}")
    return found


def _columns(f: Path) -> set[str]:
    """The column names of a data file, read from its head."""
    if f.suffix == ".txt":
        return {"text"}
    if f.suffix == ".parquet":
        import pyarrow.parquet as pq

        return set(pq.read_schema(f).names)
    with f.open(encoding="utf-8", newline="") as fh:
        if f.suffix == ".csv":
            return set(next(csv.reader(fh), []))
        try:
            row = json.loads(fh.readline() or "null")
        except json.JSONDecodeError:
            fh.seek(0)
            row = json.load(fh)
    row = row[0] if isinstance(row, list) and row else row
    return set(row) if isinstance(row, dict) else set()


def _build_shipped(name: str, found: dict[str | None, dict[str, list[Path]]]):
    """The ConfigurableTask (or per-subject tasks in a Group) of a shipped task over the resolved files."""
    from lm_eval.api.group import Group
    from lm_eval.api.task import ConfigurableTask

    template = yaml.safe_load((SHIPPED_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    opt = f"lmeval.data.{name}"

    def build(cfg: dict, by_split: dict[str, list[Path]]):
        files = {s: [str(f.resolve()) for f in fs] for s, fs in by_split.items()}
        cfg["dataset_path"] = _BUILDERS[Path(files[_LAYOUT[name][0]][0]).suffix]
        cfg["dataset_kwargs"] = {"data_files": files, **({"sample_by": "paragraph"} if cfg["dataset_path"] == "text"
                                                         else {})}
        try:
            return ConfigurableTask(config=cfg)
        except Exception as e:
            raise TaskError(f"{opt}: lm-eval could not load {name} from {files}: {type(e).__name__}: {e}") from e

    if not _LAYOUT[name][3]:
        cfg, by_split = copy.deepcopy(template), found[None]
        if name == "text_local":
            cfg["process_docs"] = functools.partial(_nonempty, strip=by_split["test"][0].suffix == ".txt")
            if "text" not in _columns(by_split["test"][0]):  # wikitext's layout: the stock wikitext functions
                from lm_eval.tasks.wikitext import preprocess_wikitext as wt

                cfg.update(doc_to_target=wt.wikitext_detokenizer, process_results=wt.process_results,
                           doc_to_decontamination_query="page")
        return build(cfg, by_split)
    filtered = None in found
    if filtered:  # one file per split holding every subject: split by the subject column (MMLU's `all`)
        import datasets

        by_split, (ev, shot) = found[None], _LAYOUT[name][:2]
        subjects = {s: set(datasets.load_dataset(_BUILDERS[fs[0].suffix], split=s, data_files={
            s: [str(f.resolve()) for f in fs]})["subject"]) for s, fs in by_split.items()}
        if lacking := sorted(subjects[ev] - subjects[shot]):
            raise TaskError(f"{opt}: subject(s) {lacking} have {ev} rows but no {shot} rows (the few-shot examples)")
        found = {s: by_split for s in sorted(subjects[ev])}
    group = Group.from_config({"group": name, "metadata": {"version": template["metadata"]["version"]},
                               "aggregate_metric_list": [{"metric": m, "weight_by_size": True}
                                                         for m in _GROUP_METRICS[name]]})
    describe = _describer(name)
    for subject, by_split in found.items():
        cfg = copy.deepcopy(template)
        cfg.update(task=f"{name}_{subject}", task_alias=subject, description=describe(subject))
        if filtered:
            cfg["process_docs"] = functools.partial(_only_subject, subject=subject)
            cfg["metadata"] = {**cfg["metadata"], "subject_filter": subject}
        group.add(build(cfg, by_split))
    return group


def _nonempty(docs, strip: bool):
    """text_local keeps the documents with text (an empty one has nothing to score); a .txt file's paragraphs
    are stripped (`datasets` keeps the last one's newline, which lm-eval's word count would count as a word)."""
    col = "text" if "text" in docs.column_names else "page"
    docs = docs.map(lambda d: {col: d[col].strip()}) if strip else docs
    return docs.filter(lambda d: bool(d[col] and d[col].strip()))


def _only_subject(docs, subject: str):
    """One subject's rows of a split holding every subject (MMLU's ``all`` layout)."""
    return docs.filter(lambda d: d["subject"] == subject)


def _describer(name: str):
    """subject -> the stock task's description (MMLU: its formula; C-Eval, CMMLU: their YAMLs' Chinese names)."""
    if name == "mmlu_local":
        return lambda s: f"The following are multiple choice questions (with answers) about {s.replace('_', ' ')}.\n\n"
    import lm_eval.tasks

    folder, prefix = {"ceval_local": ("ceval", "ceval-valid_"), "cmmlu_local": ("cmmlu", "cmmlu_")}[name]
    stock = {}
    for f in sorted((Path(lm_eval.tasks.__file__).parent / folder).glob(f"{prefix}*.yaml")):
        cfg = yaml.safe_load(f.read_text(encoding="utf-8"))
        stock[cfg["dataset_name"]] = cfg["description"]

    def describe(subject: str) -> str:
        if subject in stock:
            return stock[subject]
        log.warning("%s: %r is not one of lm-eval's subjects; its description names the folder", name, subject)
        return (f"以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n" if name == "ceval_local"
                else f"以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n")

    return describe


def run_tasks(lm, task_dict: dict, *, limit: int | float | None = None, seed: int = 1234) -> dict | None:
    """One evaluation of ``task_dict`` on ``lm``: ``{task or group: {"acc,none": ..., ...}}`` (groups' aggregates
    included), or None where lm-eval returns nothing (``lm.rank`` != 0 of a multi-process lm-eval model).

    Every task's few-shot sampler is reset to ``seed`` first, so that repeated calls (one per search trial)
    build the same prompts; python, numpy and torch are seeded as ``simple_evaluate`` seeds them (python 0,
    numpy and torch ``seed``), and their previous states are restored afterwards, so the caller's own random
    streams (the search's) do not restart at every trial. No stderr (``bootstrap_iters=0``), no samples kept."""
    import numpy as np
    import torch
    from lm_eval.defaults import DEFAULT_RANDOM_SEED
    from lm_eval.evaluator import evaluate

    for task in task_dict["tasks"].values():
        task.set_fewshot_seed(seed=seed)
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            random.seed(DEFAULT_RANDOM_SEED)
            np.random.seed(seed)
            torch.manual_seed(seed)
            out = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=False)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    if out is None:
        return None
    return {**out["results"], **out.get("groups", {})}


def metric_value(results: dict, task: str, metric: str) -> float:
    """``results[task][metric]`` as a float; ``metric`` is lm-eval's ``metric,filter`` key (a bare ``acc`` means
    ``acc,none``). The error lists the tasks or metrics there are."""
    if task not in results:
        raise TaskError(f"lm-eval returned no results for task {task!r}; it returned {sorted(results)}")
    key = metric if "," in metric else f"{metric},none"
    row = results[task]
    if key not in row:
        have = sorted(k for k in row if "," in k and "_stderr" not in k)
        raise TaskError(f"lmeval.metric={metric!r}: task {task!r} reports no {key!r}; it reports {have}")
    return float(row[key])


def _leaves(task_dict: dict, task: str) -> list:
    """The leaf tasks of a task or group name of ``task_dict``."""
    if task in task_dict["tasks"]:
        return [task_dict["tasks"][task]]
    if task in task_dict.get("groups", {}):
        return task_dict["groups"][task].get_all_tasks()
    raise TaskError(f"{task!r} is not among the loaded lm-eval tasks and groups "
                    f"{sorted([*task_dict['tasks'], *task_dict.get('groups', {})])}")


def higher_is_better(task_dict: dict, task: str, metric: str) -> bool:
    """Whether ``metric`` (``acc``, ``acc,none``, ``exact_match,strict-match``) of ``task`` improves upwards: the
    task's own ``higher_is_better``, or for a group its subtasks' (which must agree)."""
    name = metric.split(",")[0]
    seen = {}
    for leaf in _leaves(task_dict, task):
        hib = leaf.higher_is_better()
        if name not in hib:
            raise TaskError(f"lmeval.metric={metric!r}: {leaf.task_name} has no metric {name!r}; it has {sorted(hib)}")
        seen[leaf.task_name] = bool(hib[name])
    if len(set(seen.values())) != 1:
        raise TaskError(f"lmeval.metric={metric!r}: the subtasks of {task!r} disagree on its direction: {seen}")
    return next(iter(seen.values()))


def split_key(task_dict: dict, task: str) -> set[tuple]:
    """What ``task`` (every leaf of a group) evaluates: ``(dataset_path, dataset_name, file, eval split)`` with one
    tuple per local data file of the evaluated split (``file`` None for hub datasets). A leaf that scores one
    subject of a file holding several carries the subject as its dataset_name. Two tasks whose keys intersect
    score the same data."""
    keys = set()
    for leaf in _leaves(task_dict, task):
        cfg = leaf.config
        split = cfg.test_split or cfg.validation_split
        name = cfg.dataset_name or (cfg.metadata or {}).get("subject_filter")
        files = (cfg.dataset_kwargs or {}).get("data_files")
        files = files.get(split) if isinstance(files, dict) else files
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files or [None])
        keys |= {(cfg.dataset_path, name, f and str(Path(f).expanduser().resolve()), split) for f in files}
    return keys


def task_texts(task_dict: dict, limit=None) -> dict[str, list[str]]:
    """Per leaf task, the text of each document evaluated under ``limit`` (as ``run_tasks`` counts it): the
    prompt (``doc_to_text``) then the target delimiter and the correct answer rendered (the choice text for a
    multiple-choice index). The few-shot examples and the description are left out."""
    from lm_eval.evaluator_utils import get_sample_size

    out = {}
    for name, task in task_dict["tasks"].items():
        texts = []
        for _, doc in task.doc_iterator(limit=get_sample_size(task, limit)):
            choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
            q, a = task.doc_to_text(doc), task.doc_to_target(doc)
            if isinstance(q, int) and choices:  # multiple inputs (Winogrande style): the text is a choice
                q = choices[q]
            elif isinstance(a, int) and choices:
                a = choices[a]
            a = " ".join(map(str, a)) if isinstance(a, list) else str(a)
            texts.append(f"{q}{task.config.target_delimiter}{a}".strip())
        out[name] = texts
    return out


def build_cloze_items(texts: list[str], path: Path, n_items: int, n_choices: int = 4, seed: int = 0) -> Path:
    """Write ``cloze_local`` rows (jsonl: context, choices, answer) made from plain documents, and return ``path``.

    Each item is a paragraph (blank-line separated; at least 8 words) cut in the middle: the context is up to
    48 words before the cut, the true continuation up to 12 words after it. The other choices are continuations
    cut from other documents (other paragraphs of the same one when there is a single document), of deliberately
    different lengths (half to twice the true one's, never equal), so that length alone neither gives the answer
    away nor hides it and acc and acc_norm differ. Items, distractors and the order of choices are drawn from
    ``random.Random(seed)``: the same texts and seed give the same file. Written to a temporary name first."""
    if n_items < 1 or n_choices < 2:
        raise ValueError(f"build_cloze_items needs n_items >= 1 and n_choices >= 2, got {n_items}, {n_choices}")
    units = [(d, p.split()) for d, text in enumerate(texts) for p in re.split(r"\n\s*\n", text)]
    units = [(d, w) for d, w in units if len(w) >= 8]
    if len(units) < n_choices:
        raise ValueError(f"build_cloze_items: {len(units)} paragraph(s) of 8+ words in {len(texts)} document(s); "
                         f"need at least n_choices={n_choices}")
    rng = random.Random(seed)
    rows = []
    for i in rng.sample(range(len(units)), min(n_items, len(units))):
        doc, words = units[i]
        cut = len(words) // 2
        true = words[cut:cut + 12]
        others = [j for j, (d, _) in enumerate(units) if d != doc] or [j for j in range(len(units)) if j != i]
        choices = [" ".join(true)]
        for j in rng.sample(others, len(others)):
            if len(choices) == n_choices:
                break
            length = rng.choice([n for n in range(max(1, len(true) // 2), 2 * len(true) + 1) if n != len(true)])
            other = units[j][1]
            start = min(len(other) // 2, max(0, len(other) - length))
            text = " ".join(other[start:start + length])
            if text not in choices:
                choices.append(text)
        if len(choices) < n_choices:
            continue
        order = rng.sample(range(n_choices), n_choices)
        rows.append({"context": " ".join(words[max(0, cut - 48):cut]), "choices": [choices[k] for k in order],
                     "answer": order.index(0)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path
