"""The lm-eval checks that run before any model exists: same-split refusal, bad tasks and files, contamination."""

from __future__ import annotations

import json
import logging

import pytest

from lightning_merge.config import ConfigError
from lightning_merge.lmeval.run import prepare, report_candidates
from test_config import _compose

PROSE = ("Checkpoint merging averages the weights of models saved along one training run, and the average often "
         "scores better than any single checkpoint on held out text.")


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets")


def test_searching_on_a_reported_task_is_refused_unless_allowed():
    args = ("search.objective=lmeval", "lmeval.task=gsm8k_local", "report.lmeval.tasks=[gsm8k_local]")
    with pytest.raises(ConfigError, match="lmeval.allow_same_split=true"):
        _compose(*args)
    assert _compose(*args, "lmeval.allow_same_split=true").lmeval.allow_same_split


def test_objective_needs_a_task_and_a_metric_key():
    with pytest.raises(ConfigError, match="lmeval.task"):
        _compose("search.objective=lmeval")
    with pytest.raises(ConfigError, match="lmeval.metric"):
        _compose("search.objective=lmeval", "lmeval.task=x", "lmeval.metric='a,b,c'")
    assert _compose("lmeval.metric=acc").lmeval.metric_key == "acc,none"
    assert _compose("lmeval.metric=exact_match", "lmeval.filter=strict-match").lmeval.metric_key == \
        "exact_match,strict-match"
    assert _compose("lmeval.metric='exact_match,flexible-extract'").lmeval.metric_key == "exact_match,flexible-extract"


def test_bad_tasks_and_files_are_refused_naming_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"lmeval.data.gsm8k_local=/path"):
        prepare(_compose("search.objective=lmeval", "lmeval.task=gsm8k_local"), [])
    with pytest.raises(ConfigError, match=r"lmeval.data.text_local=.*missing: no such file"):
        prepare(_compose(f"lmeval.data.text_local={tmp_path / 'missing'}", "report.lmeval.tasks=[text_local]"), [])
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": PROSE}) + "\n")
    with pytest.raises(ConfigError, match="lmeval.metric"):
        prepare(_compose("search.objective=lmeval", "lmeval.task=text_local", f"lmeval.data.text_local={text}",
                         "lmeval.metric=acc"), [])
    plan = prepare(_compose("search.objective=lmeval", "lmeval.task=text_local", f"lmeval.data.text_local={text}",
                            "lmeval.metric=word_perplexity"), [])
    assert plan.higher_is_better is False and plan.report is None  # minimised as the metric itself


def test_reported_tasks_overlapping_the_heldout_text_are_warned_about(tmp_path, caplog):
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"text": PROSE}) + "\n" + json.dumps({"text": "something else entirely"}) + "\n")
    cfg = _compose(f"lmeval.data.text_local={text}", "report.lmeval.tasks=[text_local]")
    with caplog.at_level(logging.WARNING):
        prepare(cfg, ["unrelated words here", "intro: " + PROSE.upper() + " and more"])
    (msg,) = [r.getMessage() for r in caplog.records if "contamination" in r.getMessage()]
    assert "1 document(s) of lm-eval task text_local" in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare(cfg, ["unrelated words here"])
    assert not [r for r in caplog.records if "contamination" in r.getMessage()]


def test_report_candidates_are_the_checkpoints_the_best_baseline_and_the_best_merge():
    cands = [{"name": "a", "kind": "checkpoint", "weights": [1, 0], "heldout_loss": 3.0, "lmeval_value": 0.5},
             {"name": "b", "kind": "checkpoint", "weights": [0, 1], "heldout_loss": 2.9, "lmeval_value": 0.4},
             {"name": "uniform", "kind": "baseline", "weights": [.5, .5], "heldout_loss": 2.8, "lmeval_value": 0.45},
             {"name": "ema", "kind": "baseline", "weights": [.8, .2], "heldout_loss": 2.85, "lmeval_value": 0.6},
             {"name": "best merge", "kind": "search", "weights": [.4, .6], "heldout_loss": 2.7, "lmeval_value": 0.7}]
    names = lambda rows: [r["name"] for r in rows]  # noqa: E731
    assert names(report_candidates(cands, "heldout_loss")) == ["a", "b", "uniform", "best merge"]
    assert names(report_candidates(cands, "lmeval", higher_is_better=True)) == ["a", "b", "ema", "best merge"]
    assert names(report_candidates(cands, "lmeval", higher_is_better=False)) == ["a", "b", "uniform", "best merge"]
