"""lm-eval tasks offline: shipped tasks render exactly the stock prompts, score by hand, refuse early.

Tiny data files are written in tmp_path in each dataset's own layout; nothing is downloaded. The stock
lm-eval configs (``lm_eval/tasks/...``) are built on the same files with only the dataset source swapped,
and their prompts compared with the shipped tasks'. A fake LM returns log-likelihoods and generations
chosen so that every metric can be computed by hand.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

import lm_eval.tasks  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from lightning_merge.lmeval.contamination import ngram_overlap  # noqa: E402
from lightning_merge.lmeval.tasks import (SHIPPED, SHIPPED_DIR, TaskError, build_cloze_items,  # noqa: E402
                                          higher_is_better, load_tasks, metric_value, run_tasks, split_key,
                                          task_texts)

STOCK = Path(lm_eval.tasks.__file__).parent


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    """Keep `datasets`' cache of the tiny files out of the user's cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")


def write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def mmlu_rows(subject: str, answers: list[int], tag: str) -> list[dict]:
    return [{"question": f" {subject} {tag} question {i}? ", "subject": subject,
             "choices": [f"{tag}{i}a", f"{tag}{i}b", f"{tag}{i}c", f"{tag}{i}d"], "answer": a}
            for i, a in enumerate(answers)]


def mmlu_folder(root: Path) -> Path:
    """cais/mmlu's layout: <subject>/{test,dev}-00000-of-00001.<ext>; 3 + 1 test rows, 3 dev rows each."""
    write(root / "abstract_algebra" / "test-00000-of-00001.parquet", mmlu_rows("abstract_algebra", [1, 0, 1], "t"))
    write(root / "abstract_algebra" / "dev-00000-of-00001.parquet", mmlu_rows("abstract_algebra", [0, 1, 2], "d"))
    write(root / "anatomy" / "test.jsonl", mmlu_rows("anatomy", [2], "t"))
    write(root / "anatomy" / "dev.jsonl", mmlu_rows("anatomy", [3, 2, 1], "d"))
    write(root / "all" / "test.jsonl", mmlu_rows("anatomy", [2], "t"))  # the hub's every-subject copy: skipped
    return root


def ceval_rows(n: int, tag: str) -> list[dict]:
    return [{"id": i, "question": f"{tag}问题{i}", "A": "甲", "B": "乙", "C": "丙", "D": "丁",
             "answer": "ABCD"[i % 4], "explanation": ""} for i in range(n)]


def cmmlu_rows(n: int, tag: str) -> list[dict]:
    return [{"Question": f"{tag}题{i}", "A": "一", "B": "二", "C": "三", "D": "四", "Answer": "DCBA"[i % 4]}
            for i in range(n)]


def gsm8k_folder(root: Path) -> Path:
    write(root / "test.jsonl", [{"question": "Tom has 70 apples and gets 2. How many?", "answer": "70+2=72\n#### 72"},
                                {"question": "Ann has 2 and gets 3. How many?", "answer": "2+3=5\n#### 5"}])
    write(root / "train.jsonl", [{"question": f"Train question {i}?", "answer": f"Because.\n#### {i}"}
                                 for i in range(6)])
    return root


def stock_task(yaml_rel: str, files: dict[str, list[str]], builder: str = "json") -> ConfigurableTask:
    """lm-eval's own task config, with only its dataset source swapped for the same local files."""
    cfg = load_yaml(STOCK / yaml_rel, resolve_func=True)
    cfg.update(dataset_path=builder, dataset_name=None, dataset_kwargs={"data_files": files})
    task = ConfigurableTask(config=cfg)
    task.set_fewshot_seed(1234)
    return task


def same_prompts(mine, stock, shots: int) -> None:
    assert mine.config.description == stock.config.description
    for doc in mine.eval_docs:
        assert mine.doc_to_text(doc) == stock.doc_to_text(doc)
        assert mine.doc_to_target(doc) == stock.doc_to_target(doc)
        if stock.config.doc_to_choice is not None:
            assert mine.doc_to_choice(doc) == stock.doc_to_choice(doc)
        assert mine.fewshot_context(doc, num_fewshot=shots) == stock.fewshot_context(doc, num_fewshot=shots)


class FakeLM(LM):
    """Scores " B" highest (and otherwise -len(continuation)), rolls -1 per document, and answers '#### 72'."""

    def __init__(self):
        super().__init__()
        self.contexts: list[str] = []

    def loglikelihood(self, requests):
        self.contexts += [r.args[0] for r in requests]
        return [(0.0 if r.args[1] == " B" else -float(len(r.args[1])), False) for r in requests]

    def loglikelihood_rolling(self, requests):
        return [-1.0 for _ in requests]

    def generate_until(self, requests):
        self.contexts += [r.args[0] for r in requests]
        return ["The total is 72.\n#### 72" for _ in requests]


def test_mmlu_local_prompts_are_stock_mmlu(tmp_path):
    root = mmlu_folder(tmp_path / "mmlu")
    td = load_tasks(["mmlu_local"], data={"mmlu_local": str(root)}, num_fewshot=2)
    assert sorted(td["tasks"]) == ["mmlu_local_abstract_algebra", "mmlu_local_anatomy"]  # `all` skipped
    mine = td["tasks"]["mmlu_local_abstract_algebra"]
    folder = root / "abstract_algebra"
    stock = stock_task("mmlu/default/mmlu_abstract_algebra.yaml",
                       {s: [str(folder / f"{s}-00000-of-00001.parquet")] for s in ("test", "dev")}, "parquet")
    same_prompts(mine, stock, 2)
    doc = mine.eval_docs[0]
    q = "abstract_algebra {t} question {i}?\nA. {t}{i}a\nB. {t}{i}b\nC. {t}{i}c\nD. {t}{i}d\nAnswer:"
    assert mine.fewshot_context(doc, num_fewshot=2) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        + q.format(t="d", i=0) + " A\n\n" + q.format(t="d", i=1) + " B\n\n" + q.format(t="t", i=0))


def test_mmlu_local_one_file_with_subject_column(tmp_path):
    rows = mmlu_rows("anatomy", [2, 1], "t") + mmlu_rows("astronomy", [0], "t")
    write(tmp_path / "test.jsonl", rows)
    write(tmp_path / "dev.jsonl", mmlu_rows("astronomy", [1, 1], "s") + mmlu_rows("anatomy", [0, 3], "a"))
    td = load_tasks(["mmlu_local"], data={"mmlu_local": str(tmp_path)}, num_fewshot=2)
    task = td["tasks"]["mmlu_local_anatomy"]
    assert len(task.eval_docs) == 2
    ctx = task.fewshot_context(task.eval_docs[0], num_fewshot=2)
    assert "about anatomy" in ctx and "anatomy a question 1?" in ctx and "astronomy" not in ctx
    assert split_key(td, "mmlu_local_anatomy") != split_key(td, "mmlu_local_astronomy")
    assert {k[1] for k in split_key(td, "mmlu_local")} == {"anatomy", "astronomy"}


def test_ceval_and_cmmlu_local_prompts_are_stock(tmp_path):
    # C-Eval in the hub's per-subject folders; CMMLU in its zip's {test,dev}/<subject>.csv folders
    cev = tmp_path / "ceval"
    write(cev / "computer_network" / "val.csv", ceval_rows(3, "验"))
    write(cev / "computer_network" / "dev.csv", ceval_rows(4, "样"))
    cm = tmp_path / "cmmlu"
    write(cm / "test" / "agronomy.csv", cmmlu_rows(2, "测"))
    write(cm / "dev" / "agronomy.csv", cmmlu_rows(3, "例"))
    td = load_tasks(["ceval_local", "cmmlu_local"], data={"ceval_local": str(cev), "cmmlu_local": str(cm)},
                    num_fewshot=2)
    stock = stock_task("ceval/ceval-valid_computer_network.yaml",
                       {"val": [str(cev / "computer_network" / "val.csv")],
                        "dev": [str(cev / "computer_network" / "dev.csv")]}, "csv")
    mine = td["tasks"]["ceval_local_computer_network"]
    same_prompts(mine, stock, 2)
    assert mine.config.description.startswith("以下是中国关于计算机网络的单项选择题")
    stock = stock_task("cmmlu/cmmlu_agronomy.yaml", {"test": [str(cm / "test" / "agronomy.csv")],
                                                     "dev": [str(cm / "dev" / "agronomy.csv")]}, "csv")
    same_prompts(td["tasks"]["cmmlu_local_agronomy"], stock, 2)
    assert td["tasks"]["cmmlu_local_agronomy"].config.description.startswith("以下是关于农学的单项选择题")


def test_gsm8k_local_prompts_are_stock_and_scored_by_hand(tmp_path):
    root = gsm8k_folder(tmp_path / "gsm8k")
    td = load_tasks(["gsm8k_local"], data={"gsm8k_local": str(root)}, num_fewshot=2)
    mine = td["tasks"]["gsm8k_local"]
    stock = stock_task("gsm8k/gsm8k.yaml", {"test": [str(root / "test.jsonl")], "train": [str(root / "train.jsonl")]})
    same_prompts(mine, stock, 2)
    assert load_tasks(["gsm8k_local"], data={"gsm8k_local": str(root)})["tasks"]["gsm8k_local"].config.num_fewshot == 5

    lm = FakeLM()
    res = run_tasks(lm, td)
    assert metric_value(res, "gsm8k_local", "exact_match,strict-match") == 0.5  # 72 right, 5 wrong
    assert metric_value(res, "gsm8k_local", "exact_match,flexible-extract") == 0.5
    first = list(lm.contexts)
    lm.contexts.clear()
    run_tasks(lm, td)
    assert lm.contexts == first and first[0].count("Question:") == 3  # same 2 shots again: the seed is reset
    from lm_eval.evaluator import evaluate

    lm.contexts.clear()
    evaluate(lm=lm, task_dict=td, bootstrap_iters=0, log_samples=False)  # lm-eval alone: the sampler moves on
    assert lm.contexts != first


def test_run_tasks_scores_by_hand(tmp_path):
    mmlu = mmlu_folder(tmp_path / "mmlu")
    write(tmp_path / "cloze.jsonl", [
        {"context": "One two", "choices": ["x", "longest one", "mid"], "answer": 0},  # shortest: acc
        {"context": "Three", "choices": ["aa", "b", "longest choice"], "answer": 2},  # longest: acc_norm
        {"context": "Four", "choices": ["medium", "tiny", "the longest"], "answer": 1}])  # shortest: acc
    (tmp_path / "docs.txt").write_text("a b c\n\n\n\nd e\n", encoding="utf-8")
    data = {"mmlu_local": str(mmlu), "cloze_local": str(tmp_path / "cloze.jsonl"),
            "text_local": str(tmp_path / "docs.txt")}
    td = load_tasks(["mmlu_local", "cloze_local", "text_local"], data=data)
    random.seed(7)
    expected_next = random.Random(7).random()
    res = run_tasks(FakeLM(), td, seed=1234)
    assert random.random() == expected_next  # the caller's random stream is left where it was
    # FakeLM picks B: abstract_algebra answers [1, 0, 1] -> 2/3, anatomy [2] -> 0; micro-average 2/4
    assert metric_value(res, "mmlu_local_abstract_algebra", "acc") == pytest.approx(2 / 3)
    assert metric_value(res, "mmlu_local_anatomy", "acc,none") == 0.0
    assert metric_value(res, "mmlu_local", "acc") == pytest.approx(0.5)
    # ll = -(len(choice) + 1): acc picks the shortest choice, acc_norm (ll / len) the longest
    assert metric_value(res, "cloze_local", "acc") == pytest.approx(2 / 3)
    assert metric_value(res, "cloze_local", "acc_norm") == pytest.approx(1 / 3)
    # two documents ("a b c", "d e"), -1 each: 5 words, 8 bytes
    assert metric_value(res, "text_local", "word_perplexity") == pytest.approx(math.exp(2 / 5))
    assert metric_value(res, "text_local", "byte_perplexity") == pytest.approx(math.exp(2 / 8))
    assert metric_value(res, "text_local", "bits_per_byte") == pytest.approx(2 / 8 / math.log(2))
    assert run_tasks(FakeLM(), td, limit=1)["mmlu_local_abstract_algebra"]["acc,none"] == 1.0

    with pytest.raises(TaskError, match=r"lmeval.metric='f1'.*acc,none"):
        metric_value(res, "cloze_local", "f1")
    assert higher_is_better(td, "mmlu_local", "acc") is True
    assert higher_is_better(td, "cloze_local", "acc_norm,none") is True
    assert higher_is_better(td, "text_local", "word_perplexity") is False
    with pytest.raises(TaskError, match="word_perplexity"):
        higher_is_better(td, "text_local", "acc")

    texts = task_texts(td)
    assert texts["cloze_local"][1] == "Three longest choice"
    assert texts["mmlu_local_anatomy"] == ["anatomy t question 0?\nA. t0a\nB. t0b\nC. t0c\nD. t0d\nAnswer: C"]
    assert texts["text_local"] == ["a b c", "d e"]
    assert len(task_texts(td, limit=1)["mmlu_local_abstract_algebra"]) == 1


def test_text_local_page_column_is_stock_wikitext(tmp_path):
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    page = " = Title = \n The cat @-@ dog , he said . \n"
    td = load_tasks(["text_local"], data={"text_local": str(write(tmp_path / "wiki.jsonl", [{"page": page}]))})
    task = td["tasks"]["text_local"]
    assert task.doc_to_target(task.eval_docs[0]) == wikitext_detokenizer({"page": page})
    res = run_tasks(FakeLM(), td)
    words = len(re.split(r"\s+", page))  # wikitext counts the words of the raw page
    assert metric_value(res, "text_local", "word_perplexity") == pytest.approx(math.exp(1 / words))


def test_split_key_says_which_tasks_score_the_same_data(tmp_path):
    mmlu = mmlu_folder(tmp_path / "mmlu")
    gsm = gsm8k_folder(tmp_path / "gsm8k")
    a = load_tasks(["mmlu_local"], data={"mmlu_local": str(mmlu)})
    b = load_tasks(["mmlu_local", "gsm8k_local"], data={"mmlu_local": str(mmlu), "gsm8k_local": str(gsm)})
    assert split_key(a, "mmlu_local") == split_key(b, "mmlu_local")
    assert split_key(a, "mmlu_local_anatomy") < split_key(a, "mmlu_local")
    assert split_key(b, "gsm8k_local") == {("json", None, str((gsm / "test.jsonl").resolve()), "test")}
    assert not split_key(a, "mmlu_local") & split_key(b, "gsm8k_local")
    with pytest.raises(TaskError, match="not among the loaded"):
        split_key(a, "gsm8k_local")


def test_refusals_name_the_option(tmp_path):
    with pytest.raises(TaskError, match=r"lmeval.data.mmlu_local=/path"):
        load_tasks(["mmlu_local"])
    with pytest.raises(TaskError, match=r"lmeval.data.gsm8k_local=.*no such file"):
        load_tasks(["gsm8k_local"], data={"gsm8k_local": str(tmp_path / "nope")})
    mmlu = tmp_path / "mmlu"
    write(mmlu / "anatomy" / "test.jsonl", mmlu_rows("anatomy", [1], "t"))
    with pytest.raises(TaskError, match=r"anatomy has no dev file; expected test\..* and dev\."):
        load_tasks(["mmlu_local"], data={"mmlu_local": str(mmlu)})
    write(tmp_path / "bad.jsonl", [{"prompt": "x", "choices": ["a"], "answer": 0}])
    with pytest.raises(TaskError, match=r"lacks column\(s\) \['context'\]"):
        load_tasks(["cloze_local"], data={"cloze_local": str(tmp_path / "bad.jsonl")})
    write(mmlu / "anatomy" / "dev.jsonl", mmlu_rows("anatomy", [1], "d"))
    with pytest.raises(TaskError, match=r"lmeval.num_fewshot: mmlu_local_anatomy has 1 few-shot"):
        load_tasks(["mmlu_local"], data={"mmlu_local": str(mmlu)}, num_fewshot=3)
    with pytest.raises(TaskError, match=r"report.lmeval.tasks: unknown lm-eval task\(s\) \['no_such_task'\].*"
                                        r"mmlu_local.*cache"):  # builds lm-eval's task index (~15 s)
        load_tasks(["no_such_task"], option="report.lmeval.tasks")


def test_build_cloze_items(tmp_path):
    texts = [f"Document {d} says: " + " ".join(f"w{d}_{i}" for i in range(30)) + f"\n\nSecond part {d} " +
             " ".join(f"v{d}_{i}" for i in range(10)) for d in range(5)]
    path = build_cloze_items(texts, tmp_path / "items" / "cloze.jsonl", n_items=6, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [json.loads(line) for line in
                    build_cloze_items(texts, tmp_path / "again.jsonl", n_items=6, seed=3).read_text().splitlines()]
    assert len(rows) == 6 and not list(path.parent.glob("*.tmp"))
    for r in rows:
        true = r["choices"][r["answer"]]
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert any(r["context"] + " " + true in " ".join(t.split()) for t in texts)  # the real continuation
        assert all(len(c.split()) != len(true.split()) for i, c in enumerate(r["choices"]) if i != r["answer"])
    assert {r["answer"] for r in rows} != {rows[0]["answer"]}  # shuffled
    td = load_tasks(["cloze_local"], data={"cloze_local": str(path)})
    assert len(td["tasks"]["cloze_local"].eval_docs) == 6
    with pytest.raises(ValueError, match="n_choices=4"):
        build_cloze_items(["too short"], tmp_path / "x.jsonl", n_items=1)


def test_ngram_overlap_by_hand():
    held_out = ["The quick brown fox, jumps over the LAZY dog!", "nothing to see"]
    tasks = {"a": ["quick brown fox jumps", "brown dog", "lazy dog", ""], "b": ["Jumps over the lazy cat"]}
    # n=3: "quick brown fox" (a0) is there; "brown dog" (2 words < 3) is not a run in any document; "lazy dog" is
    assert ngram_overlap(held_out, tasks, n=3) == {"a": 2, "b": 1}  # b: "jumps over the"
    assert ngram_overlap(held_out, tasks, n=5) == {"a": 2, "b": 0}  # a0, a2 whole (< 5 words); b's 5-gram: cat
    assert ngram_overlap([], tasks) == {"a": 0, "b": 0}


def test_shipped_files_are_there():
    assert {p.stem for p in SHIPPED_DIR.glob("*.yaml")} == set(SHIPPED)
