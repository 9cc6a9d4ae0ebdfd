"""``search.objective=lmeval`` end to end: a search on an lm-eval task, killed and resumed, with its report table.

The CLI searches the merge of three tiny checkpoints for the best ``acc_norm`` of a cloze task (the shipped
offline ``cloze_local``) and reports ``text_local``'s word perplexity for the final candidates. It is
SIGKILLed twice mid-search (a trial's result computed but not recorded; recorded but not told to Ax) and
re-run; the finished run must hold every trial once, and its figures must be lm-eval's own: the best
merge's objective equals ``HFLM`` on the written merged folder, and the report rows equal ``HFLM`` on the
merges of their weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("accelerate")  # lm-eval's HFLM (the reference) imports it

PROSE = [
    "Checkpoint merging averages the weights of models saved along one training run, and the average often "
    "scores better than any single checkpoint on held out text.",
    "A Gaussian process models the loss as a function of the merge weight and proposes the next weight "
    "where the expected improvement is largest after every trial.",
    "Every rank evaluates its own share of the requests, and the sums are gathered so the result does not "
    "depend on how many ranks there are in the job.",
    "The quick brown fox jumps over the lazy dog while the careful engineer measures every figure twice.",
    "Pretraining teams keep many checkpoints and want to know what an annealing phase would buy them soon.",
]


def env(**extra: str) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> dict:
    from lightning_merge.lmeval.tasks import build_cloze_items

    root = tmp_path_factory.mktemp("lmeval_search")
    cloze = build_cloze_items(PROSE * 4, root / "cloze.jsonl", n_items=16, seed=2)
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(PROSE[i:] + PROSE[:i])}) + "\n" for i in range(3)))
    return {"cloze_local": str(cloze), "text_local": str(text), "cache": str(root / "hf_datasets")}


def command(tiny_run, task_data, out: Path) -> list[str]:
    return [sys.executable, "-m", "lightning_merge", f"checkpoints.sources=[{tiny_run['ckdir']}]",
            "checkpoints.last=3", "search.space=simplex", f"data.heldout.path={tiny_run['heldout']}",
            "data.heldout.block_size=32", "data.heldout.num_blocks=8", "data.search_blocks=4", "demo.enabled=false",
            "search.trials=5", "search.acquisition=ei", "report.progress=false", "search.objective=lmeval",
            "lmeval.task=cloze_local", "lmeval.metric=acc_norm", "lmeval.batch_size=4",
            f"lmeval.data.cloze_local={task_data['cloze_local']}", f"lmeval.data.text_local={task_data['text_local']}",
            "report.lmeval.tasks=[text_local]", f"output_dir={out}"]


def _hflm(folder: Path, task: str, data: dict) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from lightning_merge.lmeval.tasks import load_tasks

    loaded = load_tasks([task], data={task: data[task]})
    hf = HFLM(pretrained=str(folder), device="cpu", batch_size=4, dtype="float32")
    return lm_eval.simple_evaluate(model=hf, tasks=list(loaded["tasks"].values()), bootstrap_iters=0)["results"][task]


def test_lmeval_search_resumes_after_kills_and_reports_lm_evals_numbers(tiny_run, task_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", task_data["cache"])
    out = tmp_path / "run"
    cmd = command(tiny_run, task_data, out)
    for spec in ("evaluated:3", "completed:2"):
        proc = subprocess.run(cmd, env=env(LIGHTNING_MERGE_KILL_AT=spec), capture_output=True, text=True, timeout=900)
        assert proc.returncode == -signal.SIGKILL, (spec, proc.returncode, proc.stderr[-3000:])
    final = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]

    lines = [json.loads(x) for x in (out / "trials.jsonl").read_text().splitlines()]
    assert max(Counter(r["trial"] for r in lines if r["status"] == "completed").values()) == 1
    recs = {r["trial"]: r for r in lines}
    search = [r for r in recs.values() if r["status"] == "completed" and not r["origin"].startswith("baseline:")]
    assert len(search) == 5
    for r in recs.values():
        if r["status"] == "completed":
            assert r["objective"] == pytest.approx(1.0 - r["lmeval_value"], abs=1e-12)

    results = json.loads((out / "results.json").read_text())
    best = results["best"]
    ref = _hflm(Path(results["merged_dir"]), "cloze_local", task_data)
    # The merge written in bf16/fp32 as the sources; lm-eval on the saved folder gives the search's figure.
    assert best["lmeval_value"] == ref["acc_norm,none"]
    assert best["search_objective"] == pytest.approx(1.0 - ref["acc_norm,none"], abs=1e-12)

    rows = results["lmeval"]["rows"]
    assert [r["kind"] for r in rows] == ["checkpoint"] * 3 + ["baseline", "search"]
    assert rows[-1]["weights"] == best["weights"]
    ref_text = _hflm(Path(results["merged_dir"]), "text_local", task_data)
    assert rows[-1]["metrics"]["text_local"]["word_perplexity,none"] == ref_text["word_perplexity,none"]
    report = (out / "report.md").read_text()
    assert "## lm-eval tasks (report.lmeval.tasks)" in report and "text_local word_perplexity" in report
    card = (Path(results["merged_dir"]) / "README.md").read_text()
    assert "## lm-eval tasks" in card
    # A re-run of the finished search scores nothing again: the report rows come from lmeval_report.jsonl.
    n = len((out / "lmeval_report.jsonl").read_text().splitlines())
    again = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len((out / "lmeval_report.jsonl").read_text().splitlines()) == n == 5
