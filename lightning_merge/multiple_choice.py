"""Multiple-choice benchmark accuracy (MMLU / C-Eval / CMMLU) as an exact merge objective.

Scoring follows lm-evaluation-harness's ``multiple_choice`` output type: each
choice is a continuation of the prompt, scored by the summed log-likelihood of
its tokens given the context. ``acc`` is the argmax of that sum; ``acc_norm``
the argmax of the sum over the choice's length in characters (lm-eval's
``completion_len = len(choice)``, the choice text without the space that
separates it from ``Answer:``). With ``continuation: text`` (the default) the
scored string is ``" " + choice text``, lm-eval's ARC/HellaSwag style, where the
length normalisation means something; ``continuation: letter`` scores ``" A"``,
``" B"``... as lm-eval's ``mmlu`` task does, and there every choice has length 1,
so ``acc_norm == acc``.

Why counts, not means: like the held-out loss (``evaluate.py``) the result must
not depend on the world size or the batch size. Batches hold whole items (all
choices of an item on one rank), ``ShardSampler`` gives every item to exactly
one rank and pads with masked items, and int64 ``correct`` / ``correct_norm``
/ ``total`` sums are all-reduced once per evaluation.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric

from .config import MCSetConf  # noqa: F401  (re-exported: the schema lives with the others)
from .data import DataError
from .sampling import ShardSampler

__all__ = ["MCSetConf", "MCItem", "MCData", "MCAccuracy", "MultipleChoiceEval", "detect_schema",
           "load_items", "format_prompt", "fewshot_for", "build_mc_tensors", "load_mc", "evaluate_mc"]

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The columns each schema needs, as the hub datasets spell them:
#   cais/mmlu          question, subject, choices (4 strings), answer (ClassLabel A-D -> int 0-3);
#                      splits test / validation / dev (/ auxiliary_train)
#   ceval/ceval-exam   id, question, A, B, C, D, answer ("A".."D"), explanation; splits test / val / dev,
#                      and the test answers are blank (labels withheld)
#   haonan-li/cmmlu    Question, A, B, C, D, Answer ("A".."D"); splits test / dev (the release CSVs
#                      also carry an unnamed index column, ignored here)
SCHEMAS = {
    "mmlu": ("question", "choices", "answer"),
    "ceval": ("question", "A", "B", "C", "D", "answer"),
    "cmmlu": ("Question", "A", "B", "C", "D", "Answer"),
}


@dataclass(frozen=True)
class MCItem:
    """One question, normalised: ``answer`` indexes ``choices``."""

    question: str
    choices: list[str]
    answer: int
    subject: str | None = None


# --------------------------------------------------------------------------- loading

def detect_schema(columns: Sequence[str], where: str) -> str:
    """The first schema whose columns are all present; the error lists what was found."""
    for schema, needed in SCHEMAS.items():
        if set(needed) <= set(columns):
            return schema
    expected = "; ".join(f"{s}: {', '.join(c)}" for s, c in SCHEMAS.items())
    raise DataError(f"{where}: columns {list(columns)} match no multiple-choice schema; expected "
                    f"one of [{expected}] (see data.mc.schema)")


def _blank(value: Any) -> bool:
    """A missing answer: None, an empty string, or the NaN that a blank CSV cell becomes."""
    return value is None or value != value or (isinstance(value, str) and not value.strip())


def _answer_index(value: Any, n: int, where: str) -> int:
    """An int 0..n-1 (MMLU's ClassLabel) or a letter A.. (C-Eval, CMMLU) as an index."""
    if isinstance(value, str):
        v = value.strip().upper()
        idx = LETTERS.index(v) if len(v) == 1 and v in LETTERS else int(v) if v.isdigit() else -1
    elif isinstance(value, int) and not isinstance(value, bool):
        idx = value
    else:
        idx = -1
    if not 0 <= idx < n:
        raise DataError(f"{where}: answer {value!r} is not one of {list(LETTERS[:n])} or 0..{n - 1}")
    return idx


def _rows_to_items(rows: dict[str, list], schema: str, where: str, subject: str | None) -> list[MCItem]:
    if not rows or not any(rows.values()):
        return []
    if schema == "auto":
        schema = detect_schema(list(rows), where)
    missing = [c for c in SCHEMAS[schema] if c not in rows]
    if missing:
        raise DataError(f"{where}: schema {schema!r} needs columns {missing}; the columns are {list(rows)}")
    q_col, a_col = ("Question", "Answer") if schema == "cmmlu" else ("question", "answer")
    n = len(rows[q_col])
    answers = rows[a_col]
    if n and all(_blank(a) for a in answers):
        raise DataError(f"{where}: column {a_col!r} is blank in all {n} rows, so this split cannot be "
                        "scored (C-Eval withholds its test labels); use data.mc.split=val")
    subjects = rows.get("subject") or [subject] * n
    items = []
    for i in range(n):
        choices = rows["choices"][i] if schema == "mmlu" else [rows[c][i] for c in "ABCD"]
        if not isinstance(choices, (list, tuple)) or any(not isinstance(c, str) for c in choices):
            raise DataError(f"{where}: row {i}: the choices must be a list of strings, got {choices!r}")
        choices = list(choices)
        items.append(MCItem(str(rows[q_col][i]), choices,
                            _answer_index(answers[i], len(choices), f"{where}: row {i}"), subjects[i]))
    return items


def _local_splits(root: Path) -> dict[str, list[Path]]:
    """Split name -> files: ``root/<split>.<ext>`` files and ``root/<split>/*.<ext>`` folders."""
    splits: dict[str, list[Path]] = {}
    for child in sorted(root.iterdir()):
        if child.is_file() and child.suffix.lower() in _BUILDERS:
            splits.setdefault(child.stem, []).append(child)
        elif child.is_dir():
            files = sorted(f for f in child.iterdir() if f.is_file() and f.suffix.lower() in _BUILDERS)
            if files:
                splits.setdefault(child.name, []).extend(files)
    return splits


def _read_file(path: Path) -> dict[str, list]:
    import datasets

    if path.stat().st_size == 0:
        return {}  # datasets' json reader fails on an empty file (StopIteration); it is an empty split
    datasets.disable_progress_bars()
    builder = _BUILDERS[path.suffix.lower()]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        raise DataError(f"{path}: could not be read as {builder}: {type(e).__name__}: {e}") from e
    return ds.to_dict()


def load_items(conf: MCSetConf, split: str) -> list[MCItem]:
    """Load and normalise every item of ``split`` (no ``max_items`` applied); refuse a bad split."""
    if conf.name:
        import datasets

        where = f"{conf.name}" + (f" ({conf.config_name})" if conf.config_name else "")
        datasets.disable_progress_bars()
        try:  # offline, this works from the datasets cache only
            dsd = datasets.load_dataset(conf.name, conf.config_name)
        except Exception as e:
            raise DataError(f"{where}: could not be loaded through datasets (data.mc.name / "
                            f"data.mc.config_name; is it in the cache?): {type(e).__name__}: {e}") from e
        if split not in dsd:
            raise DataError(f"{where}: no split {split!r}; the splits are {sorted(dsd)} "
                            "(set data.mc.split / data.mc.dev_split)")
        subject = conf.config_name if conf.config_name not in (None, "all") else None
        items = _rows_to_items(dsd[split].to_dict(), conf.schema, f"{where} split {split!r}", subject)
    else:
        if not conf.path:
            raise DataError("no multiple-choice set given; set data.mc.path (local files) or data.mc.name")
        root = Path(conf.path).expanduser()
        if not root.exists():
            raise DataError(f"multiple-choice set {root} does not exist (data.mc.path)")
        if root.is_file():
            if root.suffix.lower() not in _BUILDERS:
                raise DataError(f"{root}: unsupported file type {root.suffix!r}; use one of {sorted(_BUILDERS)}")
            if split != conf.split:
                raise DataError(f"{root} is a single file, so it has no {split!r} split for few-shot "
                                "examples; point data.mc.path at a folder holding e.g. test.jsonl and "
                                "dev.jsonl, or set data.mc.num_fewshot=0")
            items = _rows_to_items(_read_file(root), conf.schema, str(root), None)
        else:
            splits = _local_splits(root)
            if split not in splits:
                raise DataError(f"{root}: no split {split!r}; the splits found are {sorted(splits)} "
                                f"(files or folders of {'/'.join(sorted(_BUILDERS))}; set data.mc.split "
                                "/ data.mc.dev_split)")
            items = []
            for f in splits[split]:
                # Subfolder layout (C-Eval ``val/law_val.csv``, CMMLU ``test/law.csv``): the stem is the subject.
                subject = f.stem.removesuffix(f"_{split}") if f.parent != root else None
                items += _rows_to_items(_read_file(f), conf.schema, str(f), subject)
    if not items:
        raise DataError(f"{conf.path or conf.name}: split {split!r} is empty (0 items)")
    return items


# --------------------------------------------------------------------------- prompts

def _question_block(item: MCItem) -> str:
    options = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.question.strip()}{options}\nAnswer:"


def _targets(item: MCItem, continuation: str) -> list[str]:
    """What each choice contributes after ``Answer:`` (without the separating space)."""
    return list(item.choices) if continuation == "text" else list(LETTERS[: len(item.choices)])


def format_prompt(item: MCItem, shots: Sequence[MCItem] = (), continuation: str = "text") -> str:
    """The context string: solved shots separated by a blank line, then the question, ending ``Answer:``."""
    solved = "".join(f"{_question_block(s)} {_targets(s, continuation)[s.answer]}\n\n" for s in shots)
    return solved + _question_block(item)


def fewshot_for(item: MCItem, dev: Sequence[MCItem], k: int) -> list[MCItem]:
    """The first ``k`` dev items (of the same subject when subjects are known), never the item itself.

    First-k is lm-eval's ``first_n`` sampler for MMLU: deterministic, and the
    same shots on every rank and every trial.
    """
    if k == 0:
        return []
    pool = [d for d in dev if d != item]
    if item.subject is not None and any(d.subject is not None for d in pool):
        pool = [d for d in pool if d.subject == item.subject]
    if len(pool) < k:
        raise DataError(f"data.mc.num_fewshot={k}, but the dev split holds only {len(pool)} usable "
                        f"examples{f' for subject {item.subject!r}' if item.subject else ''}")
    return pool[:k]


# --------------------------------------------------------------------------- tensors

@dataclass
class MCData:
    """Per (item, choice) rows, ``[items, choices, T]``; the rows of one item stay together.

    ``input_ids`` is the truncated context + continuation, right-padded;
    ``cont_mask`` marks the continuation tokens; ``lengths`` the real length
    of each row; ``choice_chars`` the acc_norm divisor (characters).
    """

    input_ids: torch.Tensor     # [N, C, T] int64
    cont_mask: torch.Tensor     # [N, C, T] bool
    lengths: torch.Tensor       # [N, C] int64
    answer: torch.Tensor        # [N] int64
    choice_chars: torch.Tensor  # [N, C] float64

    @property
    def num_items(self) -> int:
        return self.input_ids.shape[0]


def build_mc_tensors(items: Sequence[MCItem], tokenizer, *, dev: Sequence[MCItem] = (), num_fewshot: int = 0,
                     continuation: str = "text", max_length: int | None = None,
                     add_bos: bool = False) -> MCData:
    """Tokenize every (item, choice) pair the way lm-eval's ``_encode_pair`` does.

    The continuation tokens are those of ``encode(context + continuation)``
    after the first ``len(encode(context))`` tokens, appended to the context's
    own encoding, so a merge across the boundary cannot leak continuation text
    into the context. Rows longer than ``max_length + 1`` lose context from the
    left (the model sees ``max_length`` tokens and predicts the last one).
    ``add_bos`` prepends BOS to the context (lm-eval's ``add_bos_token``; off
    by default, as there).
    """
    if not items:
        raise DataError("the multiple-choice set is empty (0 items)")
    n_choices = len(items[0].choices)
    if max_length is None and 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        max_length = int(tokenizer.model_max_length)
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    rows: list[list[tuple[list[int], int]]] = []
    chars: list[list[float]] = []
    for i, item in enumerate(items):
        if len(item.choices) != n_choices:
            raise DataError(f"item {i} has {len(item.choices)} choices but item 0 has {n_choices}; "
                            "a set must have the same number of choices throughout")
        context = format_prompt(item, fewshot_for(item, dev, num_fewshot), continuation)
        targets = _targets(item, continuation)
        ctx = bos + tokenizer(context, add_special_tokens=False)["input_ids"]
        wholes = tokenizer([context + " " + t for t in targets], add_special_tokens=False)["input_ids"]
        row = []
        for c, whole in enumerate(wholes):
            cont = whole[len(ctx) - len(bos):]
            if not cont:
                raise DataError(f"item {i} choice {LETTERS[c]}: {targets[c]!r} adds no token after the context")
            if max_length is not None and len(cont) >= max_length:
                raise DataError(f"item {i} choice {LETTERS[c]}: the continuation alone has {len(cont)} tokens, "
                                f"not fewer than max_length={max_length}")
            full = ctx + cont
            if max_length is not None:
                full = full[-(max_length + 1):]
            row.append((full, len(cont)))
        rows.append(row)
        chars.append([float(max(len(t), 1)) for t in targets])  # lm-eval's len(choice); 0 would divide by 0
    T = max(len(full) for row in rows for full, _ in row)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(items), n_choices, T), pad, dtype=torch.long)
    mask = torch.zeros((len(items), n_choices, T), dtype=torch.bool)
    lengths = torch.zeros((len(items), n_choices), dtype=torch.long)
    for i, row in enumerate(rows):
        for c, (full, n_cont) in enumerate(row):
            ids[i, c, : len(full)] = torch.tensor(full)
            mask[i, c, len(full) - n_cont: len(full)] = True
            lengths[i, c] = len(full)
    return MCData(ids, mask, lengths, torch.tensor([it.answer for it in items], dtype=torch.long),
                  torch.tensor(chars, dtype=torch.float64))


def load_mc(conf: MCSetConf, tokenizer, max_length: int | None = None, add_bos: bool = False) -> MCData:
    """Load ``conf.split`` (and the few-shot pool), keep ``max_items`` evenly spaced, tokenize."""
    items = load_items(conf, conf.split)
    dev = load_items(conf, conf.dev_split) if conf.num_fewshot > 0 and conf.dev_split else []
    if conf.max_items is not None and conf.max_items < len(items):
        keep = torch.linspace(0, len(items) - 1, conf.max_items).round().long().tolist()
        items = [items[i] for i in keep]
    data = build_mc_tensors(items, tokenizer, dev=dev, num_fewshot=conf.num_fewshot,
                            continuation=conf.continuation, max_length=max_length, add_bos=add_bos)
    log.info("multiple choice %s [%s]: %d items x %d choices, %d-shot, up to %d tokens per row",
             conf.path or conf.name, conf.split, data.num_items, data.input_ids.shape[1], conf.num_fewshot,
             data.input_ids.shape[2])
    return data


# --------------------------------------------------------------------------- evaluation

class MCAccuracy(Metric):
    """Counts of items right by summed log-likelihood and by per-character log-likelihood, reduced by sum."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("correct", "correct_norm", "total"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, correct_norm: torch.Tensor, total: torch.Tensor) -> None:
        self.correct += correct.to(torch.int64)
        self.correct_norm += correct_norm.to(torch.int64)
        self.total += total.to(torch.int64)

    def compute(self) -> dict[str, torch.Tensor]:
        return {"correct": self.correct, "correct_norm": self.correct_norm, "total": self.total}


class _Items(Dataset):
    """Whole items plus a validity flag; indices past the end are masked copies of item 0."""

    def __init__(self, data: MCData) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.num_items

    def __getitem__(self, i: int):
        d = self.data
        j, valid = (i, 1) if i < d.num_items else (0, 0)
        return (d.input_ids[j], d.cont_mask[j], d.lengths[j], d.answer[j], d.choice_chars[j],
                torch.tensor(valid, dtype=torch.int64))


class MultipleChoiceEval(L.LightningModule):
    """Wraps a causal LM; accumulates exact acc / acc_norm counts over batches of whole items."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.metric = MCAccuracy()
        self.result: dict[str, Any] | None = None
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    def choice_loglik(self, ids: torch.Tensor, cont: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Summed log-likelihood (float64) of each row's continuation tokens; ``[R, T]`` -> ``[R]``."""
        T = int(lengths.max())
        ids, cont = ids[:, :T], cont[:, :T]
        attn = (torch.arange(T, device=ids.device)[None] < lengths[:, None]).long()
        sel = cont[:, 1:]                    # target positions t+1 that are continuation tokens
        pos = sel.any(0).nonzero().squeeze(1)  # input positions whose logits are needed
        # Only the continuation positions go through the LM head (``logits_to_keep`` as positions,
        # which saves a [rows, T, vocab] tensor); a model without it returns every position.
        extra = {"logits_to_keep": pos} if self._keep else {}
        logits = self.model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1], **extra).logits
        if logits.shape[1] != pos.numel():
            logits = logits[:, pos]
        sel, tgt = sel[:, pos], ids[:, 1:][:, pos]
        lp = F.log_softmax(logits[sel].float(), dim=-1).gather(-1, tgt[sel][:, None]).squeeze(1)
        out = torch.zeros(sel.shape, dtype=torch.float64, device=ids.device)
        out[sel] = lp.to(torch.float64)
        return out.sum(dim=1)  # a fixed-order sum, unlike index_add_ (atomics on GPU)

    def validation_step(self, batch, batch_idx: int) -> None:
        ids, cont, lengths, answer, chars, valid = batch
        B, C, T = ids.shape
        ll = self.choice_loglik(ids.reshape(B * C, T), cont.reshape(B * C, T), lengths.reshape(-1)).view(B, C)
        ok = valid.bool()
        right = (ll.argmax(dim=1) == answer) & ok
        right_norm = ((ll / chars).argmax(dim=1) == answer) & ok
        self.metric.update(right.sum(), right_norm.sum(), ok.sum())

    def on_validation_epoch_end(self) -> None:
        out = self.metric.compute()  # all-reduce (sum) across ranks, once
        correct, correct_norm, total = (int(out[k]) for k in ("correct", "correct_norm", "total"))
        self.result = {"acc": correct / total if total else float("nan"),
                       "acc_norm": correct_norm / total if total else float("nan"),
                       "correct": correct, "correct_norm": correct_norm, "total": total}
        self.metric.reset()


def evaluate_mc(trainer: L.Trainer, module: MultipleChoiceEval, data: MCData, batch_size: int) -> dict:
    """One exact evaluation: each rank scores its shard of whole items; returns ``module.result``."""
    loader = DataLoader(_Items(data), batch_size=batch_size, sampler=ShardSampler(data.num_items),
                        num_workers=0)
    module.result = None
    trainer.validate(module, dataloaders=loader, verbose=False)
    if module.result is None or module.result["total"] == 0:
        raise RuntimeError("multiple-choice evaluation scored no items; is the set empty?")
    return module.result
