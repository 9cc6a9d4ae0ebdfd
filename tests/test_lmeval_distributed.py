"""lm-eval on the resident merge equals ``lm_eval.simple_evaluate(model=HFLM(pretrained=folder))``, at 1-3 ranks.

The merge ``0.3 x A + 0.7 x B`` of two tiny Llamas is written with ``write_merged`` and scored by lm-eval's
own HFLM in this process: the reference. The tool then scores the same merge, made in place on the
resident sources, through the CLI (``mode=evaluate report.lmeval.tasks=[...]``) under DDP at 1, 2 and 3
gloo ranks, and through raw DeepSpeed ZeRO-3 on 2 CPU ranks under torchrun (``zero3_worker.py``: each
rank merges its own partitions; every forward and generation step is collective). Every metric must be
equal, exactly: ``acc`` (MMLU layout, two subjects, 1-shot), ``acc`` and ``acc_norm`` (a cloze task with
choices of very different lengths), ``exact_match`` (GSM8K layout, generative, both filters: the answers
of half the items are the reference's own extraction, so the metric is neither 0 nor 1 and any other
generation changes it) and ``word_perplexity`` (rolling log-likelihood over documents longer than the
model's positions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
pytest.importorskip("accelerate")  # lm-eval's HFLM imports it

WEIGHTS = [0.3, 0.7]
TASKS = ["mmlu_local", "cloze_local", "gsm8k_local", "text_local"]
CHECK = {"mmlu_local": ["acc,none"], "cloze_local": ["acc,none", "acc_norm,none"],
         "gsm8k_local": ["exact_match,strict-match", "exact_match,flexible-extract"],
         "text_local": ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"]}
PROSE = [
    "Checkpoint merging averages the weights of models saved along one training run, and the average often "
    "scores better than any single checkpoint on held out text.",
    "A Gaussian process models the loss as a function of the merge weight and proposes the next weight "
    "where the expected improvement is largest.",
    "Every rank evaluates its own share of the requests, and the sums are gathered so the result does not "
    "depend on how many ranks there are.",
    "The quick brown fox jumps over the lazy dog while the careful engineer measures every figure twice.",
    "Pretraining teams keep many checkpoints and want to know what an annealing phase would buy them.",
    "Sharded models hold a slice of every parameter on each rank and gather the rest for each forward.",
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _model(path: Path, seed: int, tokenizer) -> Path:
    """A tiny Llama with 384 positions: room for GSM8K's 256 new tokens after a 128-token context."""
    from conftest import make_llama

    return make_llama(path, seed=seed, tokenizer=tokenizer, positions=384)


def _reference(merged: Path, data: dict, cache: Path, samples: bool = False):
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from lightning_merge.lmeval.tasks import load_tasks

    os.environ["HF_DATASETS_CACHE"] = str(cache)
    loaded = load_tasks(TASKS, data=data)
    hf = HFLM(pretrained=str(merged), device="cpu", batch_size=3, dtype="float32")
    out = lm_eval.simple_evaluate(model=hf, tasks=list(loaded["tasks"].values()), bootstrap_iters=0,
                                  log_samples=samples)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer) -> dict:
    from conftest import CORPUS

    from lightning_merge.lmeval.tasks import build_cloze_items
    from lightning_merge.writer import write_merged
    from lightning_merge.series import CheckpointSeries

    root = tmp_path_factory.mktemp("lmeval_dist")
    cache = root / "hf_datasets"
    paths = [_model(root / "ckpts" / f"step{s}", seed=s, tokenizer=tokenizer) for s in (1, 2)]
    merged = write_merged(CheckpointSeries.from_sources([str(p) for p in paths]), WEIGHTS, root / "merged")
    mm = root / "mmlu"
    for subj, n in (("anatomy", 5), ("astronomy", 4)):
        rows = [{"question": f"In {subj}, which is item {i}?", "subject": subj,
                 "choices": [f"def {i}", f"class {i}", "import os", "print(i)"], "answer": (i * 3) % 4}
                for i in range(n + 2)]
        _write(mm / subj / "test.jsonl", rows[:n])
        _write(mm / subj / "dev.jsonl", rows[n:])
    cloze = build_cloze_items(PROSE * 3, root / "cloze.jsonl", n_items=12, seed=1)
    text = _write(root / "text" / "test.jsonl", [{"text": " ".join(PROSE[i:] + PROSE[:i]) * 2} for i in range(3)])
    gsm = root / "gsm8k"
    questions = [f"{c.strip()} How many lines?" for c in CORPUS[:6]]
    _write(gsm / "train.jsonl", [{"question": f"Train {i}: {PROSE[i]}", "answer": f"So.\n#### {i}"} for i in range(6)])
    _write(gsm / "test.jsonl", [{"question": q, "answer": "#### 1234567"} for q in questions])
    data = {"mmlu_local": str(mm), "cloze_local": str(cloze), "gsm8k_local": str(gsm), "text_local": str(text)}
    # The reference's own generations: half the items take its flexible extraction as their answer.
    first = _reference(merged, data, cache, samples=True)
    got = {s["doc_id"]: s["filtered_resps"][0] for s in first["samples"]["gsm8k_local"]
           if s["filter"] == "flexible-extract"}
    _write(gsm / "test.jsonl", [{"question": q, "answer": f"#### {got[i]}" if i % 2 == 0 else "#### 1234567"}
                                for i, q in enumerate(questions)])
    ref = _reference(merged, data, cache)["results"]
    held = _write(root / "heldout.jsonl", [{"text": t} for t in CORPUS[:40]])
    return {"root": root, "paths": paths, "merged": merged, "data": data, "ref": ref, "cache": cache,
            "heldout": held}


def _metrics(res: dict) -> dict:
    """The checked metrics; the reference (tasks passed to simple_evaluate one by one) has no mmlu_local group
    row, so its aggregate is made from the subjects as lm-eval makes it (weighted by size)."""
    if "mmlu_local" not in res:
        from lm_eval.api.metrics import aggregate_subtask_metrics

        subs = [res[f"mmlu_local_{s}"]["acc,none"] for s in ("anatomy", "astronomy")]
        res = {**res, "mmlu_local": {"acc,none": aggregate_subtask_metrics(subs, [5, 4], weight_by_size=True)}}
    return {t: {m: float(res[t][m]) for m in ms} for t, ms in CHECK.items()}


def test_reference_is_not_trivial(setup):
    ref = _metrics(setup["ref"])
    assert 0 < ref["gsm8k_local"]["exact_match,flexible-extract"] < 1
    assert ref["text_local"]["word_perplexity,none"] > 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ddp_equals_lm_eval_hflm_exactly(setup, tmp_path, world):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lightning_merge", "mode=evaluate", "demo.enabled=false",
           f"checkpoints.sources=[{','.join(str(p) for p in setup['paths'])}]", f"merge.weights=[{WEIGHTS[0]},{WEIGHTS[1]}]",
           f"data.heldout.path={setup['heldout']}", "data.heldout.block_size=32", "data.heldout.num_blocks=8",
           "data.search_blocks=4", f"report.lmeval.tasks=[{','.join(TASKS)}]", "lmeval.batch_size=3",
           *[f"lmeval.data.{k}={v}" for k, v in setup["data"].items()], f"output_dir={out}",
           "report.progress=false", *(["strategy=ddp", f"strategy.devices={world}"] if world > 1 else [])]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(setup["cache"]))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    (row,) = results["lmeval"]["rows"]
    assert row["weights"] == WEIGHTS
    got = {t: {m: row["metrics"][t][m] for m in ms} for t, ms in CHECK.items()}
    assert got == _metrics(setup["ref"])


def test_zero3_two_ranks_equal_lm_eval_hflm_exactly(setup, tmp_path):
    pytest.importorskip("deepspeed")
    from test_zero3_cpu import WORKER, free_port

    blocks = torch.randint(0, 200, (4, 16))
    torch.save(blocks, tmp_path / "blocks.pt")
    spec = {"strategy": "zero3", "sources": [str(p) for p in setup["paths"]], "weights": [WEIGHTS],
            "blocks": str(tmp_path / "blocks.pt"), "batch_size": 2, "out": str(tmp_path / "out.json"),
            "lmeval": {"tasks": TASKS, "data": setup["data"], "batch_size": 3}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(setup["cache"]),
               PYTHONPATH=os.pathsep.join([str(WORKER.parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           f"--master_port={free_port()}", str(WORKER), str(tmp_path / "spec.json")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    got = out["losses"][0]["lmeval"]
    assert {t: {m: float(got[t][m]) for m in ms} for t, ms in CHECK.items()} == _metrics(setup["ref"])
