"""Multiple-choice accuracy: the three schemas, lm-eval prompts, and exact counts whatever the sharding.

The Lightning module is checked against a plain per-choice transformers loop
(sum of the continuation tokens' log-probs; argmax; argmax of loglik / chars)
with batch sizes that do not divide the 7 items. A random tiny Llama answers
at chance, so the test items' answers are set from the reference itself
(a third to its acc prediction, a third to its acc_norm prediction, a third to
neither): both counts are then mixed, neither 0 nor 7, and a scorer that
confused choices, items or the two metrics could not pass by luck.
"""

from __future__ import annotations

import dataclasses
import json

import lightning as L
import pytest
import torch

from lightning_merge.config import ConfigError
from lightning_merge.data import DataError
from lightning_merge.evaluate import ShardSampler
from lightning_merge.multiple_choice import (MCItem, MCSetConf, MultipleChoiceEval, build_mc_tensors,
                                             detect_schema, evaluate_mc, fewshot_for, format_prompt,
                                             load_items, load_mc)

torch.set_num_threads(1)
pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers"),
              pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec")]

QUESTIONS = [  # (question, choices, answer, subject); choice lengths differ so acc_norm can differ from acc
    ("What does a stack push do?", ["adds an item", "pops", "sorts the whole list", "x"], 0, "logic"),
    ("Which keyword defines a function?", ["class", "def", "import os", "return a + b"], 1, "logic"),
    ("What is 2 + 2?", ["3", "22", "4", "four hundred"], 2, "math"),
    ("The quick brown fox jumps over?", ["the lazy dog", "a cat", "nothing at all", "it"], 0, "logic"),
    ("range(10) yields how many items?", ["9", "10", "11", "an infinite number"], 1, "math"),
    ("Checkpoint merging averages what?", ["tokens", "weights", "losses", "the data"], 1, "logic"),
    ("What does print do?", ["writes text", "reads a file", "nothing", "raises"], 0, "math"),
]
DEV = [
    ("Which module joins paths?", ["sys", "os", "re", "json"], 1, "logic"),
    ("What is 1 + 1?", ["2", "3", "11", "zero"], 0, "math"),
]


def write_mmlu(root, split, rows):
    """cais/mmlu columns: question, subject, choices, answer (int)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{split}.jsonl", "w") as fh:
        for q, ch, a, s in rows:
            fh.write(json.dumps({"question": q, "subject": s, "choices": ch, "answer": a}) + "\n")


def write_ceval(root, split, rows, blank=False):
    """ceval/ceval-exam columns: id, question, A-D, answer (letter, blank on test), explanation."""
    import pandas as pd

    (root / split).mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"id": i, "question": q, **dict(zip("ABCD", ch)), "answer": "" if blank else "ABCD"[a],
                   "explanation": ""} for i, (q, ch, a, _) in enumerate(rows)]
                 ).to_csv(root / split / f"computer_network_{split}.csv", index=False)


def write_cmmlu(root, split, rows):
    """haonan-li/cmmlu columns: Question, A-D, Answer (letter); the release CSVs keep an index column."""
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{"Question": q, **dict(zip("ABCD", ch)), "Answer": "ABCD"[a]} for q, ch, a, _ in rows]
                 ).to_csv(root / f"{split}.csv", index=True)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc")
    write_mmlu(root / "mmlu", "test", QUESTIONS)
    write_mmlu(root / "mmlu", "dev", DEV)
    write_ceval(root / "ceval", "val", QUESTIONS)
    write_ceval(root / "ceval", "dev", DEV)
    write_ceval(root / "ceval", "test", QUESTIONS, blank=True)
    write_cmmlu(root / "cmmlu", "test", QUESTIONS)
    write_cmmlu(root / "cmmlu", "dev", DEV)
    return root


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, max_position_embeddings=256,
                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(cfg).eval()


def make_trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                     num_sanity_val_steps=0)


def reference_lls(model, tokenizer, items, dev=(), k=0, continuation="text"):
    """Plain loop: one forward per (item, choice); returns per-choice logliks and char lengths."""
    out = []
    with torch.inference_mode():
        for item in items:
            context = format_prompt(item, fewshot_for(item, dev, k), continuation)
            targets = item.choices if continuation == "text" else list("ABCD")
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            lls = []
            for t in targets:
                cont = tokenizer(context + " " + t, add_special_tokens=False)["input_ids"][len(ctx):]
                logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
                lp = torch.log_softmax(logits.float(), dim=-1)
                lls.append(sum(lp[len(ctx) - 1 + j, tok].double().item() for j, tok in enumerate(cont)))
            out.append((lls, [len(t) for t in targets]))
    return out


def argmax(xs):
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, like torch/np argmax


def mixed_answers(items, ref):
    """Answers that make both counts mixed: item i % 3 == 0 is right by acc, 1 by acc_norm, 2 by neither."""
    out = []
    for i, (it, (lls, chars)) in enumerate(zip(items, ref)):
        pred, pred_norm = argmax(lls), argmax([l / c for l, c in zip(lls, chars)])
        answer = (pred, pred_norm, min({0, 1, 2, 3} - {pred, pred_norm}))[i % 3]
        out.append(dataclasses.replace(it, answer=answer))
    return out


def reference_counts(items, ref):
    acc = sum(argmax(lls) == it.answer for it, (lls, _) in zip(items, ref))
    norm = sum(argmax([l / c for l, c in zip(lls, cs)]) == it.answer for it, (lls, cs) in zip(items, ref))
    return acc, norm


# --------------------------------------------------------------------------- schemas and prompts

@pytest.mark.parametrize("schema,split", [("mmlu", "test"), ("ceval", "val"), ("cmmlu", "test")])
def test_schemas_are_detected_and_normalised(sets, schema, split):
    items = load_items(MCSetConf(path=str(sets / schema), split=split), split)
    assert [(it.question, it.choices, it.answer) for it in items] == [(q, c, a) for q, c, a, _ in QUESTIONS]
    assert all(isinstance(it.answer, int) for it in items)
    # The subject comes from the column (MMLU), the file stem (C-Eval folder layout) or nowhere.
    subjects = {"mmlu": [s for *_, s in QUESTIONS], "ceval": ["computer_network"] * 7, "cmmlu": [None] * 7}
    assert [it.subject for it in items] == subjects[schema]
    # Naming the schema explicitly gives the same items.
    assert load_items(MCSetConf(path=str(sets / schema), split=split, schema=schema), split) == items


def test_detect_schema_from_columns():
    assert detect_schema(["question", "subject", "choices", "answer"], "x") == "mmlu"
    assert detect_schema(["id", "question", "A", "B", "C", "D", "answer", "explanation"], "x") == "ceval"
    assert detect_schema(["Unnamed: 0", "Question", "A", "B", "C", "D", "Answer"], "x") == "cmmlu"


def test_one_shot_prompt_text(sets):
    items = load_items(MCSetConf(path=str(sets / "mmlu")), "test")
    dev = load_items(MCSetConf(path=str(sets / "mmlu")), "dev")
    shots = fewshot_for(items[2], dev, 1)
    assert shots == [dev[1]]  # the first dev item of the same subject (math)
    assert format_prompt(items[2], shots) == (
        "What is 1 + 1?\nA. 2\nB. 3\nC. 11\nD. zero\nAnswer: 2\n\n"
        "What is 2 + 2?\nA. 3\nB. 22\nC. 4\nD. four hundred\nAnswer:")
    assert format_prompt(items[2], shots, "letter").startswith("What is 1 + 1?\nA. 2\nB. 3\nC. 11\nD. zero\n"
                                                              "Answer: A\n\nWhat is 2 + 2?")
    # Without subjects, the first k of the dev split.
    plain = [dataclasses.replace(d, subject=None) for d in dev]
    assert fewshot_for(dataclasses.replace(items[2], subject=None), plain, 1) == [plain[0]]


def test_tensors_mark_continuation_and_truncate_left(tokenizer):
    item = MCItem("What is 2 + 2?", ["3", "22", "4", "four hundred"], 2)
    data = build_mc_tensors([item], tokenizer)
    context = format_prompt(item)
    ctx = tokenizer(context)["input_ids"]
    for c, choice in enumerate(item.choices):
        whole = tokenizer(context + " " + choice)["input_ids"]
        n = int(data.lengths[0, c])
        assert data.input_ids[0, c, :n].tolist() == ctx + whole[len(ctx):]
        assert data.cont_mask[0, c].nonzero().squeeze(1).tolist() == list(range(len(ctx), n))
        assert data.choice_chars[0, c] == len(choice)  # lm-eval's len(choice), without the space
    m = int(data.cont_mask.sum(-1).max()) + 2  # shorter than every row, longer than every continuation
    assert m + 1 < int(data.lengths.min())
    short = build_mc_tensors([item], tokenizer, max_length=m)
    assert short.lengths.tolist() == [[m + 1] * 4]  # the model sees m tokens and predicts the last
    for c in range(4):
        n = int(short.lengths[0, c])
        full = data.input_ids[0, c, : int(data.lengths[0, c])].tolist()
        assert short.input_ids[0, c, :n].tolist() == full[-n:]
        assert short.cont_mask[0, c].sum() == data.cont_mask[0, c].sum()


def test_hub_style_dataset_with_configs(tmp_path):
    """The ``name`` + ``config_name`` path, offline: a folder laid out like ceval/ceval-exam on the hub."""
    import pandas as pd

    root = tmp_path / "ceval-exam"
    (root / "computer_network").mkdir(parents=True)
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: computer_network\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: computer_network/{s}-00000-of-00001.parquet\n"
                  for s in ("test", "val", "dev"))
        + "---\n")
    for s, rows in (("test", QUESTIONS), ("val", QUESTIONS), ("dev", DEV)):
        pd.DataFrame([{"id": i, "question": q, **dict(zip("ABCD", ch)), "answer": "" if s == "test" else "ABCD"[a],
                       "explanation": ""} for i, (q, ch, a, _) in enumerate(rows)]
                     ).to_parquet(root / "computer_network" / f"{s}-00000-of-00001.parquet")
    conf = MCSetConf(name=str(root), config_name="computer_network", split="val")
    items = load_items(conf, "val")
    assert [it.answer for it in items] == [a for _, _, a, _ in QUESTIONS]
    assert {it.subject for it in items} == {"computer_network"}
    with pytest.raises(DataError, match=r"no split 'validation'; the splits are \['dev', 'test', 'val'\]"):
        load_items(conf, "validation")
    with pytest.raises(DataError, match="blank in all 7 rows"):
        load_items(conf, "test")


# --------------------------------------------------------------------------- exact scoring

@pytest.fixture(scope="module")
def scored(sets, model, tokenizer):
    """Items with mixed answers, their tensors and the reference counts (0-shot text, 1-shot letter)."""
    out = {}
    items = load_items(MCSetConf(path=str(sets / "mmlu")), "test")
    dev = load_items(MCSetConf(path=str(sets / "mmlu")), "dev")
    for k, cont in ((0, "text"), (1, "letter")):
        ref = reference_lls(model, tokenizer, items, dev, k, cont)
        fixed = mixed_answers(items, ref)
        data = build_mc_tensors(fixed, tokenizer, dev=dev, num_fewshot=k, continuation=cont)
        out[k, cont] = (data, reference_counts(fixed, ref))
    return out


@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("mode", [(0, "text"), (1, "letter")])
def test_module_equals_plain_loop(scored, model, batch_size, mode):
    data, (acc, norm) = scored[mode]
    assert 0 < acc < 7 and 0 < norm < 7  # mixed by construction
    res = evaluate_mc(make_trainer(), MultipleChoiceEval(model), data, batch_size)
    assert (res["correct"], res["correct_norm"], res["total"]) == (acc, norm, 7)
    assert res["acc"] == acc / 7 and res["acc_norm"] == norm / 7
    if mode[1] == "letter":
        assert norm == acc  # every letter is one character long


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_counts_sum_to_one_process(scored, model, monkeypatch, world):
    data, (acc, norm) = scored[0, "text"]
    module, trainer = MultipleChoiceEval(model), make_trainer()
    totals = [0, 0, 0]
    for rank in range(world):
        monkeypatch.setattr(ShardSampler, "_rank_world", staticmethod(lambda r=rank: (r, world)))
        res = evaluate_mc(trainer, module, data, batch_size=2)
        totals = [t + res[k] for t, k in zip(totals, ("correct", "correct_norm", "total"))]
    assert totals == [acc, norm, 7]


def test_load_mc_end_to_end(sets, tokenizer):
    data = load_mc(MCSetConf(path=str(sets / "ceval"), split="val", num_fewshot=1, max_items=3), tokenizer)
    assert data.num_items == 3 and data.input_ids.shape[1] == 4
    assert data.answer.tolist() == [QUESTIONS[i][2] for i in (0, 3, 6)]  # evenly spaced, both ends


# --------------------------------------------------------------------------- errors

def test_errors_name_the_problem(sets, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_items(MCSetConf(path=str(tmp_path / "nope.jsonl")), "test")
    with pytest.raises(DataError, match=r"no split 'validation'.*\['dev', 'test', 'val'\]"):
        load_items(MCSetConf(path=str(sets / "ceval"), split="validation"), "validation")
    with pytest.raises(DataError, match="blank in all 7 rows.*data.mc.split=val"):
        load_items(MCSetConf(path=str(sets / "ceval")), "test")
    empty = tmp_path / "empty" / "test.jsonl"
    empty.parent.mkdir()
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_items(MCSetConf(path=str(empty.parent)), "test")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"prompt": "q", "options": ["a", "b"], "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"columns \['prompt', 'options', 'label'\] match no .*mmlu: question"):
        load_items(MCSetConf(path=str(odd)), "test")
    with pytest.raises(DataError, match="single file.*few-shot"):
        load_mc(MCSetConf(path=str(sets / "mmlu" / "test.jsonl"), num_fewshot=1), None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": "E"}) + "\n")
    with pytest.raises(DataError, match="row 0: answer 'E'"):
        load_items(MCSetConf(path=str(bad)), "test")
    bad.write_text(json.dumps({"question": "q", "choices": "abcd", "answer": 0}) + "\n")
    with pytest.raises(DataError, match="row 0: the choices must be a list of strings"):
        load_items(MCSetConf(path=str(bad)), "test")
    with pytest.raises(DataError, match="nonexistent/set.*could not be loaded through datasets"):
        load_items(MCSetConf(name="nonexistent/set"), "test")  # HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(ConfigError, match="data.mc.schema"):
        MCSetConf(path="x", schema="arc")
    with pytest.raises(ConfigError, match="data.mc.continuation"):
        MCSetConf(path="x", continuation="choice")
    with pytest.raises(ConfigError, match="data.mc.dev_split"):
        MCSetConf(path="x", num_fewshot=5, dev_split=None)
    with pytest.raises(ConfigError, match="data.mc.path"):
        MCSetConf(path="x", name="cais/mmlu")
